"""Batch requests: the input file's format, and sending each request through the stack API that
serves its endpoint.

    input_file     JSONL lines into an index of requests, or OpenAI's validation errors (pure)
    input_reader   reading the input file and its models through the stack's Files and Models APIs
    token_estimates  a request's input tokens estimated as OpenAI counts prompts (for token quotas)
    model_hints    why a model is unknown: a missing provider prefix, a near miss, a backend not answering
    endpoints      one request sent through the stack, its outcome turned into a result line
    routes         which views of the stack's APIs a request goes through (no completion store, kept lookups)
    resilience     which failures to retry, backoff, adaptive capacity, pacing
    stack_apis     the stack's APIs and the endpoints each serves

May use: domain, config, telemetry, stack, stack_routing. Never api, engine or storage.
"""
