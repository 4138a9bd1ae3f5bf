"""The API surface: the Batches API's create, retrieve, cancel and list, and the checks on what a
caller sends.

    service       BatchesService, the object the stack routes /v1/batches to
    validation    parameter checks (HTTP 400 with OpenAI's `param` and `code`)
    idempotency   what makes two creates "the same request" (same batch, or HTTP 409)
    user_limits   per-user limits on waiting work (HTTP 429)
    http_errors   errors answered in OpenAI's shape on the stack's own batches routes
    webhook_endpoints   /v1/webhook_endpoints: OpenAI's webhook endpoints API, for batch events

May use: engine, storage, requests, telemetry, config, domain, stack. Nothing imports it but the
package root, which wires it to the stack.
"""
