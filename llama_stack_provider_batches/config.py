"""Operator settings, as written under the batches provider entry of run.yaml.

`kvstore`, `max_concurrent_batches` and `max_concurrent_requests_per_batch` are the fields of
llama-stack's built-in `inline::reference` provider, with the same names, so an existing run.yaml
needs only the `module:` line. One default differs on purpose: the built-in provider runs one batch
at a time, this one runs them side by side unless `max_concurrent_batches` is set (an explicit
value is honoured). Every setting added here has a default that is safe for production.
"""

import base64
import binascii
from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from .domain.webhook_events import SECRET_PREFIX
from .domain.webhook_urls import AllowedHosts, UnsafeURL, check_url
from .stack import KVStoreReference, SqlStoreReference

# Batches running side by side in one process when `max_concurrent_batches` is unset: each holds its
# input file in memory while it runs, so even "no limit" needs one.
BATCHES_SIDE_BY_SIDE = 32
# One slot in this many is kept for owners with no batch running in the process (runner.py).
NEW_OWNER_SHARE = 4


OGX_TABLE_SUFFIX = "_jobs"  # after the table name of OGX's built-in provider's `sqlstore`


class OperatorWebhookEndpoint(BaseModel):
    """An endpoint the operator configures: it receives the events of every user's batches."""

    url: str = Field(description="Where events are sent (the allow list applies, as to users' endpoints).")
    secret: str = Field(description="Its signing secret, `whsec_` and base64, as OpenAI's are; read it from the env.")
    event_types: list[str] = Field(
        default_factory=lambda: ["batch.completed", "batch.failed", "batch.expired", "batch.cancelled"],
        description="Which batch events it receives.",
    )

    def problem(self, allowed: AllowedHosts) -> str | None:
        """Why this endpoint cannot be sent to, in words that never show its secret (nor its URL, which
        may carry a token); None if it can."""
        try:
            check_url(self.url, allowed)
        except UnsafeURL as exc:
            return f"its url is refused: {exc}"
        if not self.secret.startswith(SECRET_PREFIX):
            return f"its secret must start with {SECRET_PREFIX!r}, as OpenAI's do"
        try:
            key = base64.b64decode(self.secret.removeprefix(SECRET_PREFIX), validate=True)
        except binascii.Error:
            return f"its secret must be {SECRET_PREFIX!r} and then padded base64, as OpenAI's are"
        return None if key else "its secret is empty"


class WebhooksConfig(BaseModel):
    """Webhooks: events sent when batches end (`/v1/webhook_endpoints`, as OpenAI's)."""

    allowed_hosts: list[str] = Field(
        default_factory=list,
        description=(
            "Hosts, addresses or networks (`127.0.0.1`, `10.0.0.0/8`, `hooks.internal`) endpoints may reach besides"
            " public https URLs, over http too. Anything else that resolves to a private, loopback or link-local"
            " address is refused, at create and at each delivery."
        ),
    )
    endpoints: list[OperatorWebhookEndpoint] = Field(
        default_factory=list, description="Endpoints of the operator's, which receive every batch's events."
    )

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        """From run.yaml's `${env.X:=}`: a comma-separated string, or nothing."""
        if value is None:
            return []
        if isinstance(value, str):
            return [host.strip() for host in value.split(",") if host.strip()]
        return value

    max_endpoints_per_user: int = Field(default=10, ge=0, description="Endpoints one user may register.")
    retry_hours: float = Field(
        default=72.0, gt=0, description="How long an event is retried for a receiver that fails, before it is dropped."
    )
    first_retry_seconds: float = Field(
        default=5.0, gt=0, description="Pause before a failed delivery is tried again; it doubles, up to an hour."
    )
    attempt_timeout_seconds: float = Field(default=10.0, gt=0, description="How long one delivery attempt may take.")
    max_concurrent_deliveries: int = Field(default=16, ge=1, description="Deliveries in flight, per process.")
    # Named with "secret" so that the stack's log of its configuration redacts it.
    secrets_key: str | None = Field(
        default=None,
        description=(
            "The key (Fernet: 32 url-safe base64 bytes) that encrypts signing secrets in the store, so that a dump"
            " of the database alone cannot sign events. Unset: a key file `secrets_key_file`, made at the first"
            " start. Every replica must use the same key."
        ),
    )
    secrets_key_file: str = Field(
        default="~/.llama/batches-webhook-secrets.key",
        description="Where the key is kept when `secrets_key` is unset (created with mode 0600).",
    )

    def check_endpoints(self) -> None:
        """Refuse the operator's endpoints that could never be delivered to: the server stops at start
        with the reason, rather than retrying them for `retry_hours`. Not a validator: pydantic's errors
        show the input, secrets included."""
        allowed = AllowedHosts.parse(self.allowed_hosts)
        for n, endpoint in enumerate(self.endpoints):
            problem = endpoint.problem(allowed)
            if problem is not None:
                raise ValueError(f"webhooks.endpoints[{n}]: {problem}")


class BatchesProviderConfig(BaseModel):
    """Configuration of the batches provider."""

    @model_validator(mode="before")
    @classmethod
    def _from_ogx_builtin(cls, data: Any) -> Any:
        """Take OGX's built-in provider's `sqlstore` as the backend of `sql_store`, in a table of its own:
        the built-in provider's table of that name has another layout."""
        if isinstance(data, dict) and "sqlstore" in data and "sql_store" not in data:
            data = dict(data)
            reference = dict(data.pop("sqlstore") or {})
            reference["table_name"] = f"{reference.get('table_name') or 'batches'}{OGX_TABLE_SUFFIX}"
            data["sql_store"] = reference
        return data

    kvstore: KVStoreReference | None = Field(
        default=None,
        description=(
            "llama-stack's built-in provider's store (a `kv_*` backend and a namespace). Batches an earlier"
            " release kept there are moved into `sql_store` at start-up; nothing new is written to it."
        ),
    )
    sql_store: SqlStoreReference = Field(
        default_factory=lambda: SqlStoreReference(backend="sql_default", table_name="batches"),
        description=(
            "Where batches, their leases and their results live: a `sql_*` backend (SQLite, shared safely by every"
            " process on one host, or PostgreSQL across hosts) and a table name. The stack's `sql_default` unless set."
        ),
    )
    lease_seconds: float = Field(
        default=15.0,
        ge=1,
        description=(
            "How long a process that stops renewing its lease on a batch (it died) keeps it before another"
            " process takes the batch over."
        ),
    )
    max_concurrent_batches: int | None = Field(
        default=None,
        ge=1,
        description=(
            "At most this many batches run at the same time in each process (a slot left free runs a part, a"
            f" shard, of a batch another process runs); one in {NEW_OWNER_SHARE} is kept for users with none"
            f" running there. Unset: batches run side by side, up to {BATCHES_SIDE_BY_SIDE} per process, sharing"
            " the model capacity (`capacity_per_model`) fairly."
        ),
    )
    capacity_per_model: int = Field(
        default=64,
        ge=1,
        description=(
            "Batch requests in flight to one model at the same time, from each process: what the model's backend"
            " takes from batches, shared fairly between users, then between one user's batches."
        ),
    )
    capacity_by_model: dict[str, int] = Field(
        default_factory=dict,
        description=(
            "`capacity_per_model` for particular models (`provider_id/model_id`), which often sit on other servers."
        ),
    )
    interactive_lag_target_ms: float | None = Field(
        default=2.0,
        gt=0,
        description=(
            "Batch requests in flight are cut while the server's event loop lags more than this, and none"
            " starts for a moment after an HTTP request does, so that interactive requests on the same server"
            " keep their latency; unset to turn both off."
        ),
    )
    max_active_batches_per_user: int | None = Field(
        default=None,
        ge=1,
        description="Unfinished batches one user may have; one more is refused with HTTP 429. Unset: no limit.",
    )
    max_queued_requests_per_user: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Requests not yet run in one user's unfinished batches, counting those of the batch being created;"
            " a create beyond it is refused with HTTP 429. Unset: no limit."
        ),
    )
    max_enqueued_tokens_per_user: int | dict[str, int] | None = Field(
        default=None,
        description=(
            "Estimated input tokens one user may have waiting in unfinished batches, per model: one number"
            " for every model, or a mapping from model id to its limit (models not listed have none). A batch"
            " that would pass it fails validation with `token_limit_exceeded`; its tokens count until its"
            " requests have results. Unset: no limit, and no estimate is made."
        ),
    )
    token_encodings: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "The tiktoken encoding that estimates a model's tokens, by model id (such as `o200k_base` for a"
            " GPT-4o); every other model uses cl100k_base. The encoding's file must be in tiktoken's cache."
        ),
    )
    requests_per_shard: int = Field(
        default=250,
        ge=1,
        description=(
            "Requests per shard: the part of a batch another process may take over to run beside its own"
            " (250: a 5,000-request batch on two workers ran 1.62 times one worker's rate, against 1.48 with 1,000)."
        ),
    )
    max_concurrent_requests_per_batch: int = Field(
        default=10, ge=1, description="Requests of one batch in flight at the same time, at most (per process)."
    )
    completion_window_seconds: int = Field(
        default=24 * 3600,
        ge=1,
        description="How long a batch may run before it expires. OpenAI's `24h` window; shorter for tests.",
    )
    cancel_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        description="After a cancel or expiry, how long requests in flight may still finish before they are abandoned.",
    )

    shutdown_grace_seconds: float = Field(
        default=3.0,
        ge=0,
        description=(
            "When the server stops, how long requests in flight may still finish before the batch is left to"
            " resume at the next start. The stack gives each provider 5 s to shut down."
        ),
    )

    max_job_attempts: int = Field(
        default=5,
        ge=1,
        description=(
            "How many times in a row processing one batch may fail on an unexpected error (a bug, a record the"
            " store refuses) before the batch ends `failed` with the results it has. Counted across restarts;"
            " a batch that made progress since its last failure counts again from one. An outage of the database"
            " or the file store is not counted: see `outage_grace_seconds`."
        ),
    )
    job_retry_initial_seconds: float = Field(
        default=1.0, gt=0, description="Pause before processing a batch again after its first failure; it doubles."
    )
    job_retry_max_seconds: float = Field(
        default=30.0, gt=0, description="Longest pause between two attempts at processing a batch."
    )
    outage_grace_seconds: float = Field(
        default=6 * 3600.0,
        ge=0,
        description=(
            "How long past its deadline (`expires_at`) a batch waits out an outage of the database or the file"
            " store (to write its result files, say) before it ends `failed`, with its counts and the results it"
            " stored. Until then it stays in its status and goes on within seconds of the dependency's return."
        ),
    )
    max_waiting_batches_with_credentials: int = Field(
        default=100,
        ge=1,
        description=(
            "Batches created with per-request credentials wait on the server that received them (the credentials"
            " are never stored); beyond this many waiting there, such a create is refused with HTTP 429."
        ),
    )

    max_attempts: int = Field(
        default=5, ge=1, description="Attempts per request when the backend fails transiently (429, 5xx, timeouts)."
    )
    backoff_initial_seconds: float = Field(default=0.5, gt=0, description="Ceiling of the first retry's pause.")
    backoff_max_seconds: float = Field(default=30.0, gt=0, description="Largest pause between two attempts.")
    request_timeout_seconds: float = Field(
        default=600.0, gt=0, description="How long one attempt may take before it is cut off and retried."
    )
    max_in_flight_requests: int | None = Field(
        default=None,
        ge=1,
        description="Batch requests in flight across all batches and models, from each process.",
    )
    requests_per_second_per_model: float | None = Field(
        default=None, gt=0, description="Optional pace of batch requests per model."
    )
    model_lookup_seconds: float = Field(
        default=2.0,
        ge=0,
        description=(
            "How long the stack's answer to a model lookup (which provider serves it, whether the owner may use it)"
            " is reused by the batch requests of one owner, instead of asking the stack's registry for each request."
            " A model removed or a policy changed reaches running batches within this time. 0: look up every request."
        ),
    )

    retention_days: float | None = Field(
        default=30.0,
        ge=0,
        description=(
            "How long a batch's record (and its idempotency key) is kept after the batch ends; then it is removed"
            " and the batch is not found any more. Unset or 0: kept forever. Its files follow the Files API's"
            " own retention, or the batch's `output_expires_after`."
        ),
    )
    min_output_expires_after_seconds: int = Field(
        default=3600,
        ge=1,
        description=(
            "The shortest `output_expires_after.seconds` a create may ask for: OpenAI's hour unless an operator"
            " (or a test) wants shorter."
        ),
    )
    sweep_interval_seconds: float = Field(
        default=60.0,
        gt=0,
        description="How often each process removes what retention and `output_expires_after` say is due.",
    )
    webhooks: WebhooksConfig = Field(
        default_factory=WebhooksConfig, description="Webhooks: events sent to users' and the operator's endpoints."
    )

    @field_validator("max_enqueued_tokens_per_user")
    @classmethod
    def _positive_token_limits(cls, value: int | dict[str, int] | None) -> int | dict[str, int] | None:
        limits = value.values() if isinstance(value, dict) else [] if value is None else [value]
        if any(limit < 1 for limit in limits):
            raise ValueError("max_enqueued_tokens_per_user: every limit must be at least 1")
        return value or None  # an empty mapping limits nothing: no estimates, no locks

    def token_limit(self, model: str | None) -> int | None:
        """The enqueued-token limit of one user on `model`; None: no limit."""
        limits = self.max_enqueued_tokens_per_user
        if limits is None or model is None:
            return None
        return limits.get(model) if isinstance(limits, dict) else limits

    def batches_here(self) -> int:
        """How many batches may run at the same time in one process."""
        return self.max_concurrent_batches or BATCHES_SIDE_BY_SIDE

    def slots_for_new_owners(self) -> int:
        """Of those, how many only owners with no batch running in the process may take."""
        return self.batches_here() // NEW_OWNER_SHARE

    @classmethod
    def sample_run_config(cls, __distro_dir__: str = "", **_: Any) -> dict[str, Any]:
        """The config block `llama stack` writes into a generated run.yaml."""
        return {"kvstore": {"backend": "kv_default", "namespace": "batches"}}
