"""The provider config: the token quota (one limit for every model, or one per model id), and the
operator's webhook endpoints, checked at start."""

from typing import Any

import pytest
from pydantic import ValidationError

from llama_stack_provider_batches import BatchesProviderConfig, get_provider_impl
from llama_stack_provider_batches.config import OperatorWebhookEndpoint, WebhooksConfig
from llama_stack_provider_batches.stack import Api
from tests.unit.conftest import FakeFiles, FakeInference, FakeModels

SECRET = "whsec_dGVzdC1zZWNyZXQ="


def config(**fields: Any) -> BatchesProviderConfig:
    return BatchesProviderConfig.model_validate({**BatchesProviderConfig.sample_run_config(), **fields})


def test_one_token_limit_holds_for_every_model_and_run_yamls_text_is_read_as_a_number() -> None:
    assert config(max_enqueued_tokens_per_user="5000").token_limit("local/m-chat") == 5000
    assert config(max_enqueued_tokens_per_user=7).token_limit("other") == 7
    assert config().token_limit("local/m-chat") is None
    assert config(max_enqueued_tokens_per_user=7).token_limit(None) is None  # a moderation on the default model


def test_a_mapping_limits_the_models_it_names_only() -> None:
    limits = config(max_enqueued_tokens_per_user={"local/m-chat": 900})
    assert (limits.token_limit("local/m-chat"), limits.token_limit("local/m-embed")) == (900, None)


@pytest.mark.parametrize("limit", [0, -5, {"m": 0}])
def test_a_limit_below_one_is_refused_with_the_settings_name(limit: Any) -> None:
    with pytest.raises(ValidationError, match="max_enqueued_tokens_per_user"):
        config(max_enqueued_tokens_per_user=limit)


def test_an_empty_mapping_sets_no_quota_at_all() -> None:
    assert config(max_enqueued_tokens_per_user={}).max_enqueued_tokens_per_user is None


@pytest.mark.parametrize(
    ("url", "secret", "reason"),
    [
        ("http://hooks.example.com/h", SECRET, "url is refused: The URL must use https"),
        ("https://10.0.0.1/h", SECRET, "url is refused: The URL's host 10.0.0.1 is not a public address"),
        ("https://hooks.example.com/h", "dGVzdC1zZWNyZXQ=", "must start with 'whsec_'"),
        ("https://hooks.example.com/h", "whsec_not base64!", "padded base64"),
        ("https://hooks.example.com/h", "whsec_dGVzdA", "padded base64"),  # OpenAI's unwrap could not decode it
        ("https://hooks.example.com/h", "whsec_", "empty"),
    ],
)
def test_an_operator_endpoint_that_could_never_be_delivered_to_is_refused_naming_why_but_not_its_secret(
    url: str, secret: str, reason: str
) -> None:
    ok = OperatorWebhookEndpoint(url="http://127.0.0.1:9000/h", secret=SECRET)
    webhooks = WebhooksConfig(
        allowed_hosts=["127.0.0.1"], endpoints=[ok, OperatorWebhookEndpoint(url=url, secret=secret)]
    )
    with pytest.raises(ValueError, match=r"^webhooks\.endpoints\[1\]: ") as refused:
        webhooks.check_endpoints()
    assert reason in str(refused.value) and (secret == "whsec_" or secret not in str(refused.value))


def test_operator_endpoints_that_can_be_delivered_to_pass() -> None:
    WebhooksConfig(
        allowed_hosts=["127.0.0.1"],
        endpoints=[
            OperatorWebhookEndpoint(url="https://hooks.example.com/h", secret=SECRET),
            OperatorWebhookEndpoint(url="http://127.0.0.1:9000/h", secret="whsec_" + "A" * 44),
        ],
    ).check_endpoints()


async def test_a_bad_operator_endpoint_stops_the_provider_at_start() -> None:
    bad = OperatorWebhookEndpoint(url="https://hooks.example.com/h", secret="not-whsec")
    deps = {Api.inference: FakeInference(), Api.files: FakeFiles(), Api.models: FakeModels(set())}
    with pytest.raises(ValueError, match=r"webhooks\.endpoints\[0\]: its secret must start"):
        await get_provider_impl(config(webhooks={"endpoints": [bad.model_dump()]}), deps)
