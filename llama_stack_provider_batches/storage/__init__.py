"""Storage and leases: everything the provider keeps, in one SQL database shared by every worker
and replica, and the lease protocol that lets one process at a time run a batch or a shard.

    store       the small interface the engine and the API use (BatchStore), with result chunks and ids
    sql_store   its implementation over SQLAlchemy (SQLite or PostgreSQL)
    shards      shard rows: creation, leases, progress
    token_quota enqueued input tokens per user and model, counted from the shards; admission within limits
    database    the tables, the statements' entry points and the database's clock
    connections how statements reach PostgreSQL (asyncio engine) or SQLite (a transaction per thread call)
    leases      keeping a lease while work runs, and stopping at store-call boundaries
    upgrade     moving an earlier release's kvstore data into the database, once
    webhooks    webhook endpoints, events and deliveries
    secrets     signing secrets encrypted at rest with the operator's key
    retention   when batches ended and their files expire, and removing what is due

May use: domain, config, telemetry, stack. Never api, engine or requests.
"""
