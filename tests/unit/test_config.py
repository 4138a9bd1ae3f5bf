"""The provider config's token quota: one limit for every model, or one per model id."""

from typing import Any

import pytest
from pydantic import ValidationError

from llama_stack_provider_batches import BatchesProviderConfig


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
