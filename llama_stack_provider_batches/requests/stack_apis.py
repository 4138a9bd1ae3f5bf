"""The stack's APIs that batch requests run through, and which endpoint each one serves.

Chat completions, completions and embeddings run through the inference API, which every stack
has. Responses and moderations need the stack's Responses and Safety APIs, which a stack serves
only when its run.yaml lists them: the provider asks for them as optional dependencies, so it
loads without them and refuses only the batches that would need them.

Requests run through the stack's own API objects (its routers), never around them: routing, the
access policy and the batch owner's identity apply as they do to a client's request.
"""

from dataclasses import dataclass
from typing import Any

from ..stack import STACK, Api, Inference, Models, Responses, Safety, Shields

# The endpoints OpenAI's Batch API accepts that this provider runs, with the stack API serving each.
ENDPOINT_APIS: dict[str, str] = {
    "/v1/chat/completions": "inference",
    "/v1/completions": "inference",
    "/v1/embeddings": "inference",
    "/v1/responses": "responses",
    "/v1/moderations": "safety",
}
API_NAMES: dict[str, str] = {"inference": "Inference", "responses": "Responses", "safety": "Safety"}


class EndpointUnavailableError(Exception):
    """The stack does not serve the API an endpoint needs (its run.yaml lost it since the batch was created)."""

    status_code = 400

    def __init__(self, endpoint: str) -> None:
        super().__init__(unavailable_message(endpoint))


def unavailable_message(endpoint: str) -> str:
    """What a create, a validation or a request of `endpoint` says when the stack lacks its API."""
    api = ENDPOINT_APIS[endpoint]
    if api not in Api.__members__:  # OGX has no Safety API at all
        return f"The endpoint '{endpoint}' needs a {API_NAMES[api]} API, which this stack ({STACK}) does not have."
    return (
        f"The endpoint '{endpoint}' needs the stack's {API_NAMES[api]} API, which this stack does not serve "
        f"(add `{api}` to the apis and providers of its run.yaml)."
    )


@dataclass(frozen=True)
class StackAPIs:
    """The stack APIs the provider uses to validate and run requests; None for an API the stack lacks."""

    inference: Inference
    models: Models
    responses: Responses | None = None
    safety: Safety | None = None
    shields: Shields | None = None

    def serves(self, endpoint: str) -> bool:
        """Whether the stack has the API that `endpoint` needs."""
        return getattr(self, ENDPOINT_APIS[endpoint]) is not None

    def default_moderation_model(self) -> str | None:
        """The shield the safety API uses for a moderation without a model: run.yaml's `safety.default_shield_id`.

        The safety router keeps the stack's safety config; no public call exposes it.
        """
        safety_config: Any = getattr(self.safety, "safety_config", None)
        return getattr(safety_config, "default_shield_id", None)
