"""What a `model_not_found` validation error adds to OpenAI's sentence, to say why the stack does not
know a model and what was likely meant:

- a name without its provider prefix (`m-chat`): models are named `<provider_id>/<model>`;
- a near miss of a model the batch's owner may see (`local/m-chta`): "Did you mean 'local/m-chat'?";
- a provider whose model server does not answer (`local/llama3.2:3b` while MODEL_URL names nothing):
  the stack registers a backend's models only when it can list them, so every model of that backend
  is unknown; the error names the backend instead of leaving the user to guess.

Hints cost one listing of the stack's models and one listing per provider named, whatever the number
of unknown models; none of them fails validation (without them the error is OpenAI's sentence alone).
"""

import asyncio
import difflib
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

from ..domain.errors import quoted
from ..stack import ModelBackend, model_backend
from .stack_apis import StackAPIs

PREFIX_HINT = " Models are named '<provider_id>/<model>', as GET /v1/models lists them."
# How alike (difflib's ratio, 0..1) a known model's name must be to be suggested: a swapped or missing
# letter in `local/m-chat` scores above 0.9; two different models of one provider (`local/m-chat`,
# `local/m-guard`) score about 0.7, as their shared prefix counts too.
CLOSE_MATCH_CUTOFF = 0.8
BACKEND_LIST_SECONDS = 5.0  # how long validation waits for a backend's model list (a refused connection: ~2 s)
MAX_REASON_CHARS = 200


async def model_hints(apis: StackAPIs, unknown: Sequence[str | None]) -> dict[str | None, str]:
    """For each model of `unknown` (names the Models API did not find), the text its error adds; "" for none."""
    named = [model for model in unknown if model]
    if not named:
        return {}
    known = await visible_models(apis)
    providers = {model.split("/", 1)[0] for model in named if "/" in model}
    trouble = await backends_in_trouble(apis, providers)
    hints: dict[str | None, str] = {}
    for model in named:
        hint = PREFIX_HINT if "/" not in model else ""
        suggestion = closest_model(model, known)
        if suggestion is not None:
            hint += f" Did you mean {quoted(suggestion)}?"
        if "/" in model:
            hint += trouble.get(model.split("/", 1)[0], "")
        hints[model] = hint
    return hints


async def visible_models(apis: StackAPIs) -> list[str]:
    """The models the Models API lists: those the batch's owner may see (validation runs as the owner,
    and the stack's listing applies the access policy)."""
    try:
        return [model.identifier for model in (await apis.models.list_models()).data]
    except Exception:  # a hint is not worth failing validation for
        return []


def closest_model(model: str, known: Sequence[str]) -> str | None:
    """The known model `model` most likely means, if one is close enough (case aside): for a name
    without a provider prefix, a model of that name under any prefix (`m-chat` is `local/m-chat`);
    otherwise a near spelling of the whole name (`local/m-chta` is `local/m-chat`)."""
    if "/" in model:
        by_name = {name.lower(): name for name in reversed(known)}  # reversed: the first listed wins a tie
    else:
        by_name = {name.split("/", 1)[-1].lower(): name for name in reversed(known)}
    matches = difflib.get_close_matches(model.lower(), by_name, n=1, cutoff=CLOSE_MATCH_CUTOFF)
    if not matches or by_name[matches[0]] == model:
        return None
    return by_name[matches[0]]


async def backends_in_trouble(apis: StackAPIs, provider_ids: set[str]) -> dict[str, str]:
    """For each provider of `provider_ids` whose model server cannot list its models now, the hint saying so."""
    backends = [backend for pid in sorted(provider_ids) if (backend := model_backend(apis.inference, pid))]
    reasons = await asyncio.gather(*(why_unlisted(backend) for backend in backends))
    return {
        backend.provider_id: (
            f" The stack could not list the models of its provider {quoted(backend.provider_id)}: the model"
            f" backend at {shown_url(backend.base_url)} {reason}. The stack registers a backend's models when"
            " it starts: once the backend answers, restart the stack."
        )
        for backend, reason in zip(backends, reasons, strict=True)
        if reason is not None
    }


async def why_unlisted(backend: ModelBackend) -> str | None:
    """Why `backend` cannot list its models now ("did not answer (Connection error.)"); None if it can."""
    try:
        async with asyncio.timeout(BACKEND_LIST_SECONDS):
            await backend.list_model_ids()
    except TimeoutError:
        return f"did not answer within {BACKEND_LIST_SECONDS:g} s"
    except Exception as exc:
        status = getattr(exc, "status_code", None)
        said = " ".join(str(exc).split())[:MAX_REASON_CHARS] or type(exc).__name__
        return f"refused to list them ({said})" if isinstance(status, int) else f"did not answer ({said})"
    return None


def shown_url(url: str) -> str:
    """A backend URL as an error message may show it: without credentials, a query or a fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 address
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a URL one can take apart: nothing of it is shown
        return "(its configured URL)"
    return urlunsplit((parts.scheme, host + port, parts.path, "", ""))
