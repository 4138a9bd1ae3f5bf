"""The events a batch sends when it ends, in OpenAI's shape, and how they are signed.

An event is `{"id": "evt_...", "object": "event", "type": "batch.completed", "created_at": ...,
"data": {"id": "batch_..."}}`, one per terminal status. Deliveries are signed as OpenAI signs them,
with the Standard Webhooks scheme (the `standardwebhooks` package): headers `webhook-id` (the
event's id, the same at every retry, so receivers can drop repeats), `webhook-timestamp` (of this
attempt) and `webhook-signature` (`v1,<base64 HMAC-SHA256>`; two of them while a rotated secret is
still honoured), which the OpenAI SDK's `client.webhooks.unwrap` verifies unchanged.
"""

import base64
import json
import secrets
import uuid
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

# The terminal status a batch event reports, by event type.
BATCH_EVENT_TYPES: dict[str, str] = {
    "completed": "batch.completed",
    "failed": "batch.failed",
    "expired": "batch.expired",
    "cancelled": "batch.cancelled",
}
EVENT_TYPES: tuple[str, ...] = tuple(BATCH_EVENT_TYPES.values())
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def event_type_for(status: str) -> str | None:
    """The event a batch entering `status` sends, if any."""
    return BATCH_EVENT_TYPES.get(status)


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def event_body(event_id: str, event_type: str, created_at: int, batch_id: str) -> bytes:
    """The JSON body of a delivery: OpenAI's event object."""
    event = {"id": event_id, "object": "event", "type": event_type, "created_at": created_at, "data": {"id": batch_id}}
    return json.dumps(event, separators=(",", ":")).encode()


def new_secret() -> str:
    """A signing secret as OpenAI hands them out: `whsec_` and base64 of random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_hint(secret: str) -> str:
    """OpenAI's `signing_secret_hint`: enough to tell secrets apart, never enough to use one."""
    return f"{SECRET_PREFIX}...{secret[-4:]}"


def signed_headers(
    event_id: str, body: bytes, signing_secrets: list[str], now: datetime | None = None
) -> dict[str, str]:
    """The headers of one delivery attempt, signed with each of `signing_secrets` (the current one,
    and a rotated one still honoured)."""
    moment = now or datetime.now(UTC)
    signatures = " ".join(Webhook(secret).sign(event_id, moment, body) for secret in signing_secrets)
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signatures,
        "content-type": "application/json",
    }
