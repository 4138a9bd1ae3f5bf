"""`llama-batches`: a command line for OpenAI-compatible Batch APIs (this stack, another llama-stack, OpenAI).

Built on the OpenAI Python SDK only, so it never imports llama_stack and runs wherever the SDK runs.
"""
