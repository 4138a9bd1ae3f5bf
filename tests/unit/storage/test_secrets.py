import stat
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from llama_stack_provider_batches.storage.secrets import SecretBox, SecretKeyError


def test_a_sealed_secret_opens_with_the_same_key_only(tmp_path: Path) -> None:
    key = Fernet.generate_key()
    sealed = SecretBox(key).seal("whsec_abc")
    assert "whsec_abc" not in sealed and SecretBox(key).open(sealed) == "whsec_abc"
    with pytest.raises(SecretKeyError, match="replicas"):
        SecretBox(Fernet.generate_key()).open(sealed)


def test_without_a_key_one_is_made_once_in_a_file_only_its_user_reads(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "webhook.key"
    first = SecretBox.from_config(None, str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = SecretBox.from_config("", str(path))  # run.yaml's empty `${env.BATCHES_WEBHOOK_KEY:=}`
    assert again.open(first.seal("whsec_x")) == "whsec_x"


def test_a_configured_key_that_is_not_a_fernet_key_is_refused_at_start() -> None:
    with pytest.raises(SecretKeyError, match="Fernet"):
        SecretBox.from_config("not a key", "/nonexistent")
