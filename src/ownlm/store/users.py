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
DEFAULT_USER = "me"  # the user a command that brings data creates in a home that has none


@dataclass(frozen=True)
class User:
    id: str
    name: str
    privacy_tier: int


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class UsersMixin:
    def dp_epsilon(self, user_id: str) -> float | None:
        """The user's own DP choice: None (follow the node's personalization.dp_epsilon), 0 (off) or an epsilon."""
        row = self.query("SELECT dp_epsilon FROM users WHERE id = ?", (user_id,))
        return row[0][0] if row else None

    def set_dp_epsilon(self, user_id: str, epsilon: float | None) -> None:
        """Record the user's DP choice (see `dp_epsilon`) and audit it."""
        if epsilon is not None and (isinstance(epsilon, bool) or not epsilon >= 0 or epsilon != epsilon):
            raise InvalidInput(f"epsilon {epsilon!r} is not a number >= 0", hint="give e.g. 8 (weaker) or 1 (stronger), or 'off'")
        with self.tx() as db:
            old = db.execute("SELECT dp_epsilon FROM users WHERE id = ?", (user_id,)).fetchone()
            db.execute("UPDATE users SET dp_epsilon = ? WHERE id = ?", (epsilon, user_id))
            self.audit(db, user_id, "dp_changed", old=old[0] if old else None, new=epsilon)

    def community(self, user_id: str) -> dict:
        """The user's community-model choices (privacy/community.py): both False unless they opted in."""
        row = self.query("SELECT community_contribute, community_start FROM users WHERE id = ?", (user_id,))
        return {"contribute": bool(row[0][0]), "start": bool(row[0][1])} if row else {"contribute": False, "start": False}

    def set_community(self, user_id: str, *, contribute: bool | None = None, start: bool | None = None) -> dict:
        """Record (and audit) the user's community choices; None leaves one as it is. The tier rule is the
        caller's (privacy/community.py `set_choice`): the store only keeps what was decided."""
        old = self.community(user_id)
        new = {"contribute": old["contribute"] if contribute is None else bool(contribute),
               "start": old["start"] if start is None else bool(start)}
        with self.tx() as db:
            db.execute("UPDATE users SET community_contribute = ?, community_start = ? WHERE id = ?",
                       (int(new["contribute"]), int(new["start"]), user_id))
            self.audit(db, user_id, "community_changed", old=old, new=new)
        return new

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

    def resolve_user(self, name: str | None, create_tier: int | None = None) -> User:
        """The user a command acts for: `name` when given, else the home's only user.

        One user per home is the common case (and what `ownlm demo` leaves), so it needs no name. With
        `create_tier` (commands that bring data: import, chat) a missing user is created with that privacy
        tier: `name`, or DEFAULT_USER in a home that has no user yet.
        """
        if name is not None:
            if create_tier is not None:
                return self.get_or_create_user(name, create_tier)
            try:
                return self.get_user(name)
            except NotFound:
                names = [u.name for u in self.list_users()]
                raise NotFound(
                    f"no user {name!r}" + (f" on this node (its users: {', '.join(names)})" if names else ""),
                    hint=(f"pass --user {names[0]}" if len(names) == 1 else "pass --user NAME")
                    + f", or create {name!r} with `ownlm token create {name}`",
                ) from None
        users = self.list_users()
        if len(users) == 1:
            return users[0]
        if not users:
            if create_tier is not None:
                return self.create_user(DEFAULT_USER, create_tier)
            raise NotFound("this home has no users yet",
                           hint="import a history with `ownlm import FILE`, or create a user with `ownlm token create NAME`")
        shown = ", ".join(u.name for u in users[:10]) + (f" and {len(users) - 10} more" if len(users) > 10 else "")
        raise InvalidInput(
            f"this home has {len(users)} users ({shown}): say which one",
            hint="pass --user NAME, or make one the default with OWNLM_USER=NAME or user = \"NAME\" in settings.toml",
        )

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
