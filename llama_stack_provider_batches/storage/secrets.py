"""Signing secrets at rest: encrypted with a key the database does not hold.

A dump of the database alone must not let anyone sign events as the server. Secrets are stored
encrypted with Fernet (the `cryptography` package: AES-128-CBC and HMAC-SHA256, a maintained
implementation) under the operator's key: `webhooks.secrets_key`, or a key file made at the
first start with mode 0600. Every replica must use the same key.
"""

import os
import time
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken


class SecretKeyError(RuntimeError):
    """The key cannot be read, or does not open what the store holds."""


class SecretBox:
    """Encrypts and decrypts signing secrets with one key."""

    def __init__(self, key: str | bytes) -> None:
        try:
            self._fernet = Fernet(key)
        except ValueError as exc:
            raise SecretKeyError(f"webhooks.secrets_key is not a Fernet key: {exc}") from None

    @classmethod
    def from_config(cls, key: str | None, key_file: str) -> "SecretBox":
        """The configured key, or the key file's (made now, readable by this user only, if missing)."""
        if key:
            return cls(key)
        path = Path(key_file).expanduser()
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:  # O_EXCL: of processes starting together, one writes it and the others read it
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass
            else:
                with os.fdopen(descriptor, "wb") as file:
                    file.write(Fernet.generate_key())
        for _ in range(50):  # another process may be writing it this instant
            content = path.read_bytes().strip()
            if content:
                return cls(content)
            time.sleep(0.02)
        raise SecretKeyError(f"The webhook key file {path} is empty")

    def seal(self, secret: str) -> str:
        return self._fernet.encrypt(secret.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            message = "A stored signing secret does not open with this key: do all replicas share it?"
            raise SecretKeyError(message) from None
