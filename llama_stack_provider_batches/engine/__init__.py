"""The execution engine: what runs a batch once it is stored, in every process that has capacity.

    runner          BatchRunner: claims batches and shards, starts their jobs, sweeps leases
    job             one batch's job: validation, shards, the end
    attempts        a failed job tried again, a bounded number of times
    shard_run       one shard's requests, each sent once the scheduler grants a slot
    shard_helpers   free slots running shards of batches whose jobs run elsewhere
    result_log      a shard's results stored in chunks as they finish
    finalization    result files and the batch's last status
    scheduler       this process's capacity per model, shared fairly between users and batches
    governor        interactive traffic first: fewer batch requests while the loop is busy
    parking         leases held while a batch waits for its turn
    startup         background work started on the server's event loop
    webhook_delivery   webhook events fanned out and delivered, with bounded retries
    housekeeping    the sweep: retention of batch records, expiry of result files, leftovers

May use: storage, requests, telemetry, config, domain, stack. Never api.
"""
