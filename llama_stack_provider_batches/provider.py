"""The provider spec llama-stack reads when run.yaml names `module: llama_stack_provider_batches`."""

from .stack import Api, InlineProviderSpec, optional_apis


def get_provider_spec() -> InlineProviderSpec:
    """Describe this package to the stack: a batches provider needing inference, files and models, and
    using the Responses and Safety APIs where the stack has them (for `/v1/responses`, `/v1/moderations`)."""
    return InlineProviderSpec(
        api=Api.batches,
        provider_type="inline::reference",
        pip_packages=["llama-stack-provider-batches"],
        module="llama_stack_provider_batches",
        config_class="llama_stack_provider_batches.config.BatchesProviderConfig",
        api_dependencies=[Api.inference, Api.files, Api.models],
        optional_api_dependencies=optional_apis(),
        description="Durable OpenAI-compatible Batch API with idempotent creation.",
    )
