import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from openai import OpenAI
from openai._exceptions import InvalidWebhookSignatureError

from llama_stack_provider_batches.domain.webhook_events import (
    EVENT_TYPES,
    event_body,
    event_type_for,
    new_event_id,
    new_secret,
    secret_hint,
    signed_headers,
)

CLIENT = OpenAI(api_key="none", base_url="http://127.0.0.1:9/v1")


def test_each_terminal_status_has_its_event_and_no_other_status_has_one() -> None:
    assert [event_type_for(s) for s in ("completed", "failed", "expired", "cancelled")] == list(EVENT_TYPES)
    assert {event_type_for(s) for s in ("validating", "in_progress", "finalizing", "cancelling")} == {None}


@given(st.sampled_from(EVENT_TYPES), st.from_regex(r"batch_[0-9a-f]{32}", fullmatch=True), st.integers(0, 2**31))
def test_openai_sdk_unwraps_every_event_as_its_own_type(event_type: str, batch_id: str, created_at: int) -> None:
    secret, event_id = new_secret(), new_event_id()
    body = event_body(event_id, event_type, created_at, batch_id)
    event = CLIENT.webhooks.unwrap(body, signed_headers(event_id, body, [secret]), secret=secret)
    assert (event.id, event.type, event.created_at, event.data.id) == (event_id, event_type, created_at, batch_id)
    assert json.loads(body)["object"] == "event"


def test_while_a_rotated_secret_is_kept_either_secret_verifies() -> None:
    old, new = new_secret(), new_secret()
    body = event_body("evt_1", "batch.failed", 1, "batch_1")
    headers = signed_headers("evt_1", body, [new, old])
    for secret in (old, new):
        CLIENT.webhooks.verify_signature(body, headers, secret=secret)
    with pytest.raises(InvalidWebhookSignatureError):
        CLIENT.webhooks.verify_signature(body, headers, secret=new_secret())


def test_a_tampered_body_or_an_old_timestamp_is_refused() -> None:
    secret = new_secret()
    body = event_body("evt_2", "batch.completed", 1, "batch_2")
    with pytest.raises(InvalidWebhookSignatureError):
        CLIENT.webhooks.verify_signature(
            body.replace(b"batch_2", b"batch_3"), signed_headers("evt_2", body, [secret]), secret=secret
        )
    stale = signed_headers("evt_2", body, [secret], now=datetime(2020, 1, 1, tzinfo=UTC))
    with pytest.raises(InvalidWebhookSignatureError):
        CLIENT.webhooks.verify_signature(body, stale, secret=secret)


def test_secrets_are_openais_shape_and_the_hint_does_not_give_them_away() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and len(secret) > 40 and secret != new_secret()
    hint = secret_hint(secret)
    assert hint.startswith("whsec_") and hint.endswith(secret[-4:]) and len(hint) < 15
