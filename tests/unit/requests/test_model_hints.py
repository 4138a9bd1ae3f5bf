"""What an unknown model's validation error says beyond OpenAI's sentence: a near miss of a model the
owner may see, and a provider whose model server does not answer; over fake Files, Models and an
inference router holding fake providers, as the stack's router holds its own."""

import asyncio
from collections.abc import Iterable
from typing import Any

import httpx
import openai
import pytest
from openai.types.batch_error import BatchError

from llama_stack_provider_batches.requests import model_hints
from llama_stack_provider_batches.requests.input_reader import read_checked_input
from llama_stack_provider_batches.requests.model_hints import closest_model, shown_url
from llama_stack_provider_batches.requests.stack_apis import StackAPIs
from tests.unit.conftest import FakeFiles, FakeInference, FakeModels, FakeResponse
from tests.unit.helpers import chat_line, jsonl, make_batch

CLOSED_URL = "http://127.0.0.1:9/v1"  # the discard port: nothing answers there


class FakeBackendProvider:
    """A remote inference provider as the stack's router holds it: its backend's URL, and a model listing
    that answers `models`, raises `failure`, or hangs when `hangs`."""

    def __init__(self, base_url: str, models: Iterable[str] = (), failure: Exception | None = None) -> None:
        self.base_url = base_url
        self.models = list(models)
        self.failure = failure
        self.hangs = False
        self.listings = 0

    def get_base_url(self) -> str:
        return self.base_url

    async def list_provider_model_ids(self) -> Iterable[str]:
        self.listings += 1
        if self.hangs:
            await asyncio.sleep(3600)
        if self.failure is not None:
            raise self.failure
        return self.models


class RoutingInference(FakeInference):
    """The inference router: its routing table holds the providers by their run.yaml id."""

    def __init__(self, providers: dict[str, Any]) -> None:
        super().__init__()
        self.routing_table = FakeResponse(impls_by_provider_id=providers)


def unreachable(url: str = CLOSED_URL) -> openai.APIConnectionError:
    return openai.APIConnectionError(request=httpx.Request("GET", f"{url}/models"))


async def validation_errors(models: Any, lines: list[dict[str, Any]], inference: Any = None) -> list[BatchError]:
    files = FakeFiles()
    apis = StackAPIs(inference=inference or FakeInference(), models=models)
    batch = make_batch(input_file_id=files.add(jsonl(lines)))
    return (await read_checked_input(files, apis, batch)).errors  # type: ignore[arg-type]


# --- near misses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "meant"),
    [
        ("local/m-chta", "local/m-chat"),  # two letters swapped
        ("local/m-cht", "local/m-chat"),  # one left out
        ("local/M-Chat", "local/m-chat"),  # another case
        ("locl/m-chat", "local/m-chat"),  # the prefix misspelt
        ("m-chat", "local/m-chat"),  # no prefix
        ("m-chta", "local/m-chat"),  # no prefix, and misspelt
        ("local/m-embd", "local/m-embed"),
    ],
)
def test_a_near_miss_is_matched_to_the_model_meant(typed: str, meant: str) -> None:
    assert closest_model(typed, ["local/m-chat", "local/m-embed", "local/m-guard"]) == meant


@pytest.mark.parametrize("typed", ["local/llama3.2:3b", "local/m", "other/gpt-4o", "local/m-chat"])
def test_a_name_unlike_any_known_model_gets_no_suggestion(typed: str) -> None:
    # local/m-chat itself: a name the Models API did not find is not suggested back to the caller.
    assert closest_model(typed, ["local/m-chat", "local/m-embed", "local/m-guard"]) is None


async def test_a_misspelt_model_fails_validation_with_a_did_you_mean() -> None:
    errors = await validation_errors(
        FakeModels({"local/m-chat", "local/m-embed"}), [chat_line("a", model="local/m-chta")]
    )
    assert [(e.code, e.line, e.param) for e in errors] == [("model_not_found", 1, "body.model")]
    assert errors[0].message == (
        "The provided model 'local/m-chta' is not supported by the Batch API. Did you mean 'local/m-chat'?"
    )


async def test_only_models_the_owner_may_see_are_suggested() -> None:
    # local/m-secret is registered, but the owner may not see it: the stack's listing (in the owner's
    # name) leaves it out and its lookup fails. Its backend lists every model it has, that one too.
    backend = FakeBackendProvider("http://127.0.0.1:8000/v1", models=["m-chat", "m-secret"])
    errors = await validation_errors(
        FakeModels({"local/m-chat"}), [chat_line("a", model="local/m-secrte")], RoutingInference({"local": backend})
    )
    assert errors[0].message == "The provided model 'local/m-secrte' is not supported by the Batch API."


# --- a backend that does not answer --------------------------------------------------------------


async def test_a_model_of_a_provider_whose_backend_does_not_answer_names_that_backend() -> None:
    backend = FakeBackendProvider(CLOSED_URL, failure=unreachable())
    inference = RoutingInference({"local": backend})
    errors = await validation_errors(
        FakeModels({"local/m-chat"}), [chat_line("a", model="local/llama3.2:3b")], inference
    )
    assert [(e.code, e.line, e.param) for e in errors] == [("model_not_found", 1, "body.model")]
    assert errors[0].message == (
        "The provided model 'local/llama3.2:3b' is not supported by the Batch API. The stack could not list"
        " the models of its provider 'local': the model backend at http://127.0.0.1:9/v1 did not answer"
        " (Connection error.). The stack registers a backend's models when it starts: once the backend"
        " answers, restart the stack."
    )


async def test_a_backend_is_asked_once_whatever_the_number_of_its_unknown_models() -> None:
    backend = FakeBackendProvider(CLOSED_URL, failure=unreachable())
    inference = RoutingInference({"local": backend})
    lines = [chat_line(f"r{i}", model=f"local/ghost-{i}") for i in range(30)]
    errors = await validation_errors(FakeModels({"local/m-chat"}), lines, inference)
    assert len(errors) == 30 and all("http://127.0.0.1:9/v1 did not answer" in e.message for e in errors)
    assert backend.listings == 1


async def test_a_backend_that_refuses_to_list_says_so() -> None:
    response = httpx.Response(401, request=httpx.Request("GET", f"{CLOSED_URL}/models"))
    refusal = openai.AuthenticationError("Error code: 401 - bad key", response=response, body=None)
    inference = RoutingInference({"local": FakeBackendProvider(CLOSED_URL, failure=refusal)})
    errors = await validation_errors(FakeModels(set()), [chat_line("a", model="local/llama3.2:3b")], inference)
    assert "the model backend at http://127.0.0.1:9/v1 refused to list them (Error code: 401 - bad key)." in (
        errors[0].message
    )


async def test_a_backend_that_hangs_is_given_up_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_hints, "BACKEND_LIST_SECONDS", 0.05)
    backend = FakeBackendProvider(CLOSED_URL)
    backend.hangs = True
    inference = RoutingInference({"local": backend})
    errors = await validation_errors(FakeModels(set()), [chat_line("a", model="local/llama3.2:3b")], inference)
    assert "the model backend at http://127.0.0.1:9/v1 did not answer within 0.05 s." in errors[0].message


async def test_a_backend_that_answers_or_a_provider_the_stack_lacks_adds_nothing() -> None:
    answering = FakeBackendProvider("http://127.0.0.1:8000/v1", models=["m-chat"])
    inference = RoutingInference({"local": answering, "inline": object()})  # an inline provider: no backend
    lines = [chat_line("a", model="local/llama3.2:3b"), chat_line("b", model="inline/x"), chat_line("c", model="no/x")]
    errors = await validation_errors(FakeModels({"local/m-chat"}), lines, inference)
    assert [e.message for e in errors] == [
        f"The provided model '{model}' is not supported by the Batch API."
        for model in ("local/llama3.2:3b", "inline/x", "no/x")
    ]
    assert answering.listings == 1


def test_a_backend_url_is_shown_without_credentials_or_query() -> None:
    assert shown_url("https://user:secret@models.example:8443/v1?key=abc#x") == "https://models.example:8443/v1"
    assert shown_url("http://[::1]:8000/v1") == "http://[::1]:8000/v1"
    assert shown_url("http://host:notaport/v1") == "(its configured URL)"
