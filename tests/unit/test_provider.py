import pytest

from llama_stack_provider_batches import BatchesProviderConfig, get_provider_impl
from llama_stack_provider_batches.provider import get_provider_spec
from llama_stack_provider_batches.stack import Api, Batches, optional_apis


def test_spec_is_an_inline_batches_provider_with_its_dependencies() -> None:
    spec = get_provider_spec()
    assert spec.api == Api.batches
    assert set(spec.api_dependencies) == {Api.inference, Api.files, Api.models}
    # Responses and moderations need these; a stack without them still loads the provider.
    assert set(spec.optional_api_dependencies) == set(optional_apis())
    assert Api.responses in spec.optional_api_dependencies
    assert spec.module == "llama_stack_provider_batches"
    assert spec.config_class == "llama_stack_provider_batches.config.BatchesProviderConfig"


def test_upstream_config_is_accepted_unchanged() -> None:
    upstream = {
        "kvstore": {"backend": "kv_default", "namespace": "batches"},
        "max_concurrent_batches": 3,
        "max_concurrent_requests_per_batch": 7,
    }
    config = BatchesProviderConfig(**upstream)
    assert (config.max_concurrent_batches, config.max_concurrent_requests_per_batch) == (3, 7)
    assert config.completion_window_seconds == 24 * 3600
    assert BatchesProviderConfig(kvstore=upstream["kvstore"]).max_concurrent_requests_per_batch == 10
    assert BatchesProviderConfig(**BatchesProviderConfig.sample_run_config()).kvstore.namespace == "batches"


async def test_provider_satisfies_the_batches_protocol(provider) -> None:
    assert isinstance(provider, Batches)


async def test_missing_dependencies_are_named(config: BatchesProviderConfig) -> None:
    with pytest.raises(ValueError, match="files, models"):
        await get_provider_impl(config, {Api.inference: object()}, [])
