"""Users of a node and their bearer tokens. Only a token's sha256 is stored; the token is shown once."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from ownlm.errors import AuthError, InvalidInput, NotFound

TOKEN_PREFIX = "olm_"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


@dataclass(frozen=True)
class User:
    id: str
    name: str
    privacy_tier: int


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class UsersMixin:
    def create_user(self, name: str, tier: int = 1) -> User:
        if not NAME_RE.match(name):
            raise InvalidInput(
                f"user name {name!r} is not allowed", hint="use 1-64 letters, digits, '_', '.', '@' or '-'"
            )
        with self.tx() as db:
            if db.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise InvalidInput(f"user {name!r} already exists", hint="pick another name or use that user")
            uid = "user_" + secrets.token_hex(6)
            db.execute("INSERT INTO users (id, name, created_at, privacy_tier) VALUES (?, ?, ?, ?)",
                       (uid, name, time.time(), tier))
            self.audit(db, uid, "user_created", privacy_tier=tier)
        return User(uid, name, tier)

    def get_user(self, name_or_id: str) -> User:
        rows = self.query(
            "SELECT id, name, privacy_tier FROM users WHERE name = ? OR id = ?", (name_or_id, name_or_id)
        )
        if not rows:
            raise NotFound(f"no user {name_or_id!r}", hint="create one with `ownlm token create NAME`")
        return User(*rows[0])

    def get_or_create_user(self, name: str, tier: int = 1) -> User:
        try:
            return self.get_user(name)
        except NotFound:
            return self.create_user(name, tier)

    def list_users(self) -> list[User]:
        return [User(*r) for r in self.query("SELECT id, name, privacy_tier FROM users ORDER BY created_at")]

    def create_token(self, user_id: str, label: str | None = None) -> str:
        """A new bearer token for `user_id`; the plaintext is returned once and never stored."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.tx() as db:
            db.execute(
                "INSERT INTO tokens (user_id, token_sha256, label, created_at) VALUES (?, ?, ?, ?)",
                (user_id, token_sha256(token), label, time.time()),
            )
            self.audit(db, user_id, "token_created", label=label)
        return token

    def user_for_token(self, token: str | None) -> User:
        if not token:
            raise AuthError("missing bearer token", hint="send 'Authorization: Bearer <token>' (ownlm token create USER)")
        rows = self.query(
            "SELECT u.id, u.name, u.privacy_tier FROM tokens t JOIN users u ON u.id = t.user_id "
            "WHERE t.token_sha256 = ? AND t.revoked_at IS NULL",
            (token_sha256(token),),
        )
        if not rows:
            raise AuthError("invalid or revoked token", hint="create a new one with `ownlm token create USER`")
        return User(*rows[0])

    def revoke_tokens(self, user_id: str) -> int:
        with self.tx() as db:
            n = db.execute(
                "UPDATE tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL", (time.time(), user_id)
            ).rowcount
            self.audit(db, user_id, "tokens_revoked", count=n)
        return n
