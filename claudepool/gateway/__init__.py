"""The gateway: the one path from the workers to the provider (the metering chokepoint).

Workers hold a credential of their own, never the provider's key; the daemon forwards their model
calls to ``[upstream]`` with the key it alone holds, after checking the credential, the endpoint and
the lease the worker serves.

- `settings`: the ``[upstream]`` section, resolved into the `Upstream` of each pool;
- `credentials`: one random credential per live worker, looked up by digest;
- `attribution`: which request a worker's call is made for (its pool's lease);
- `calls`: one call's record and the hooks that see it (where per-call metering attaches);
- `forward`: the shared client session, the header allow-lists, the byte-for-byte relay;
- `server`: the listener, the checks, the refusals;
- `metrics`: calls, their duration and refusals, on the injected registry;
- `usage`: one call's usage read from its answer's bytes as they are relayed;
- `ratelimits`: the provider account's rate limits as answers report them, exported per account;
- `caps`: the account's optional caps (requests and input tokens per minute), interactive before batch;
- `batches`: a client of the provider's Message Batches API (half-price calls, results within 24 h).
"""
