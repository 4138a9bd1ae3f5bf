"""The shared domain types, below everything else: a batch's statuses and the moves between them,
its owner, its results and the lines of its result files, its stored record, and the errors every
layer raises.

    lifecycle   statuses and the only allowed moves (every status change goes through `transition`)
    ownership   owners, scopes and the stack's access policy applied to batches
    records     StoredBatch, and the shape of a batch id
    results     result entries, tallies and the stored chunk format
    formats     output and error file lines exactly as OpenAI writes them
    errors      InvalidParameterError, LimitReachedError, status_code_of, quoting caller text
    outages     which failures are a dependency's outage (a pause, never a failure), and the gate
    webhook_events   the events a batch sends when it ends, and their signatures
    webhook_urls     which webhook URLs may be sent to (no server-side request forgery)

May use: stack only.
"""
