"""The encrypted local store (SQLCipher): users, tokens, conversations, messages, feedback, audit log, memory index."""

from __future__ import annotations

import os

from ownlm.settings import Settings
from ownlm.store.conversations import CaptureResult, ConversationsMixin, NewMessage
from ownlm.store.datasets import DatasetsMixin
from ownlm.store.db import DB_FILE, StoreBase
from ownlm.store.jobs import JobsMixin
from ownlm.store.memory import MemoryMixin, Passage
from ownlm.store.models import ModelsMixin
from ownlm.store.users import User, UsersMixin


class Store(UsersMixin, ConversationsMixin, MemoryMixin, DatasetsMixin, ModelsMixin, JobsMixin, StoreBase):
    """One handle on `home/store.db`. Thread-safe; one per process."""


def open_store(settings: Settings, passphrase: str | None = None) -> Store:
    """Open (or create) the store in the settings' home; the passphrase defaults to $OWNLM_PASSPHRASE."""
    return Store(settings.home, passphrase if passphrase is not None else os.environ.get("OWNLM_PASSPHRASE"))


__all__ = ["DB_FILE", "CaptureResult", "NewMessage", "Passage", "Store", "User", "open_store"]
