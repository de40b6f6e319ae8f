"""The store's key: a random 32-byte SQLCipher raw key, kept wrapped by a passphrase or in a 0600 key file.

Trade-off (documented for users in docs/store.md):
- key file (default): `home/store.key`, mode 0600. Anyone who can read your files as you (or root) can open
  the store; the encryption protects copies of the database that leak without the key file (backups,
  synced folders, a stolen disk image of that one file). The node can start unattended.
- passphrase: `home/store.key.json` holds the key encrypted with AES-256-GCM under a key derived from the
  passphrase with Argon2id (RFC 9106, 64 MiB, 3 passes). Nothing on disk opens the store without the
  passphrase, but every start needs it (OWNLM_PASSPHRASE or a prompt).
OS keyrings are not used: they need a desktop session and do not work on a headless node.
"""

from __future__ import annotations

import base64
import json
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from ownlm.errors import StoreError, WrongPassphrase
from ownlm.fsutil import atomic_write, mkdir_private

KEY_FILE = "store.key"
WRAPPED_KEY_FILE = "store.key.json"
KEY_BYTES = 32
# Argon2id cost: RFC 9106's second recommended option (64 MiB, 3 passes); about 0.2 s here.
ARGON2 = {"memory_cost": 64 * 1024, "iterations": 3, "lanes": 4, "length": 32}


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode())


def _kek(passphrase: str, salt: bytes, params: dict) -> bytes:
    return Argon2id(salt=salt, **params).derive(passphrase.encode())


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path`, mode 0600 from the first byte, atomically."""
    atomic_write(path, data)


def wrap_key(key: bytes, passphrase: str) -> dict:
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    ct = AESGCM(_kek(passphrase, salt, ARGON2)).encrypt(nonce, key, b"ownlm-store-key-v1")
    return {"version": 1, "kdf": "argon2id", "params": ARGON2, "salt": _b64(salt), "nonce": _b64(nonce), "wrapped": _b64(ct)}


def unwrap_key(blob: dict, passphrase: str) -> bytes:
    try:
        kek = _kek(passphrase, _unb64(blob["salt"]), blob["params"])
        return AESGCM(kek).decrypt(_unb64(blob["nonce"]), _unb64(blob["wrapped"]), b"ownlm-store-key-v1")
    except InvalidTag:
        raise WrongPassphrase(
            "the passphrase does not unlock the store", hint="check OWNLM_PASSPHRASE or type it again"
        ) from None
    except (KeyError, TypeError, ValueError) as e:
        raise StoreError(f"the wrapped key file is damaged ({e})", hint=f"restore {WRAPPED_KEY_FILE} from a backup") from None


def is_passphrase_protected(home: Path) -> bool:
    return (home / WRAPPED_KEY_FILE).is_file()


def load_or_create_key(home: Path, passphrase: str | None, create: bool = True) -> bytes:
    """The store key for `home`; on first use create one (wrapped if a passphrase is given)."""
    wrapped, plain = home / WRAPPED_KEY_FILE, home / KEY_FILE
    if wrapped.is_file():
        if passphrase is None:
            raise WrongPassphrase(
                "the store is protected by a passphrase", hint="set OWNLM_PASSPHRASE or run the command in a terminal"
            )
        try:
            blob = json.loads(wrapped.read_text())
        except ValueError as e:
            raise StoreError(f"{wrapped} is not valid JSON ({e})", hint="restore it from a backup") from None
        return unwrap_key(blob, passphrase)
    if plain.is_file():
        key = plain.read_bytes()
        if len(key) != KEY_BYTES:
            raise StoreError(f"{plain} is damaged (expected {KEY_BYTES} bytes)", hint="restore it from a backup")
        return key
    if not create:
        raise StoreError(f"no store key in {home}", hint="run any ownlm command that writes data to create the store")
    mkdir_private(home)
    key = secrets.token_bytes(KEY_BYTES)
    if passphrase:
        _write_private(wrapped, json.dumps(wrap_key(key, passphrase)).encode())
    else:
        _write_private(plain, key)
    return key


def set_passphrase(home: Path, key: bytes, new_passphrase: str | None) -> None:
    """Re-protect the existing key: with a (new) passphrase, or back to a key file when None.

    The new form is written and fsynced before the old one is removed, so a crash leaves one usable.
    """
    wrapped, plain = home / WRAPPED_KEY_FILE, home / KEY_FILE
    if new_passphrase:
        _write_private(wrapped, json.dumps(wrap_key(key, new_passphrase)).encode())
        plain.unlink(missing_ok=True)
    else:
        _write_private(plain, key)
        wrapped.unlink(missing_ok=True)
