"""Opening the encrypted store: SQLCipher with a raw 32-byte key, WAL, migrations, one writer at a time.

One `Store` per process holds one connection. Writes are serialised by a lock and run in `BEGIN IMMEDIATE`
transactions; a write returns only after COMMIT, and with `synchronous=FULL` a committed transaction survives
a killed process and a power cut. `secure_delete` makes SQLite overwrite deleted content, and temp data stays
in memory, so deleted messages leave no decryptable remnants in the database pages.
"""

from __future__ import annotations

import json
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import sqlcipher3

from ownlm.errors import StoreError, WrongPassphrase
from ownlm.fsutil import mkdir_private
from ownlm.store.keys import load_or_create_key, set_passphrase
from ownlm.store.migrations import migrate

DB_FILE = "store.db"


def _connect(path: Path, key: bytes) -> sqlcipher3.Connection:
    db = sqlcipher3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    # A raw key (x'..') skips SQLCipher's own PBKDF2: the key is already 256 random bits.
    db.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
    try:
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlcipher3.DatabaseError:
        db.close()
        raise WrongPassphrase(
            f"the key does not open {path} (wrong key, or not an ownlm store)",
            hint="use the passphrase or store.key that created this home",
        ) from None
    for pragma in (
        "journal_mode = WAL",
        "synchronous = FULL",
        "foreign_keys = ON",
        "secure_delete = ON",
        "temp_store = MEMORY",
        "busy_timeout = 30000",
    ):
        db.execute(f"PRAGMA {pragma}")
    return db


def _private_home(home: Path) -> None:
    """Create the home 0700, or take group and other access away from one that exists (made by hand or by an
    older version): everything in it is the user's data, and a private home also covers files whose writer
    took no mode."""
    mkdir_private(home)
    mode = home.stat().st_mode
    if mode & 0o077:
        os.chmod(home, mode & 0o700)


class StoreBase:
    """Connection, transactions and maintenance. Feature methods live in the mixins of `ownlm.store`."""

    def __init__(self, home: Path, passphrase: str | None = None):
        self.home = Path(home)
        self.path = self.home / DB_FILE
        _private_home(self.home)
        if self.path.exists() and not (self.home / "store.key").exists() and not (self.home / "store.key.json").exists():
            raise StoreError(
                f"{self.path} exists but its key file is missing", hint="restore store.key or store.key.json from a backup"
            )
        key = load_or_create_key(self.home, passphrase)
        self._key = key  # kept only to re-wrap it (ownlm passphrase set/remove)
        self._lock = threading.RLock()
        if not self.path.exists():  # create it 0600 ourselves: SQLite would create it 0644 (its WAL copies the mode)
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        try:
            self.db = _connect(self.path, key)
        except sqlcipher3.DatabaseError as e:
            raise StoreError(f"cannot open {self.path}: {e}", hint="check the file is an ownlm store") from None
        os.chmod(self.path, 0o600)
        with self._lock:
            self.migrations_applied = migrate(self.db)
        # A second connection for reads: in WAL mode readers never wait for the writer's transaction.
        self._read_db = _connect(self.path, key)
        self._read_lock = threading.Lock()
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None

    def protect_key(self, passphrase: str | None) -> None:
        """Wrap the key with `passphrase`, or keep it in the 0600 key file when None."""
        set_passphrase(self.home, self._key, passphrase)
        with self._lock:
            self.audit(self.db, None, "key_protection_changed", passphrase=passphrase is not None)

    def close(self) -> None:
        if self._writer is not None:
            self._jobs.put(None)
            self._writer.join()
        with self._lock, self._read_lock:
            self._read_db.close()
            self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def tx(self) -> Iterator[sqlcipher3.Connection]:
        """A write transaction: serialised in-process, IMMEDIATE so it never fails half-way on a lock."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def submit(self, fn: Callable, max_batch: int = 64) -> Future:
        """Group commit: run `fn(db)` in the writer thread; the future resolves after its COMMIT.

        Concurrent writers (e.g. many capture requests) share one transaction and one fsync instead of paying
        one each. Each job runs under its own SAVEPOINT, so a failing job is rolled back alone and gets its
        exception; the others commit.
        """
        fut: Future = Future()
        self._jobs.put((fn, fut))
        if self._writer is None:
            with self._lock:
                if self._writer is None:
                    self._writer = threading.Thread(target=self._write_loop, args=(max_batch,), daemon=True, name="ownlm-writer")
                    self._writer.start()
        return fut

    def _write_loop(self, max_batch: int) -> None:
        while True:
            batch = [self._jobs.get()]
            if batch[0] is None:
                return
            while len(batch) < max_batch:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            stop = batch[-1] is None
            batch = [job for job in batch if job is not None]
            results: list[tuple[Future, object, BaseException | None]] = []
            try:
                with self.tx() as db:
                    for fn, fut in batch:
                        db.execute("SAVEPOINT job")
                        try:
                            results.append((fut, fn(db), None))
                            db.execute("RELEASE job")
                        except Exception as e:  # this job only: its writes are undone, the batch goes on
                            db.execute("ROLLBACK TO job")
                            db.execute("RELEASE job")
                            results.append((fut, None, e))
            except BaseException as e:  # the COMMIT itself failed: nothing of the batch is durable
                for _, fut in batch:
                    fut.set_exception(e)
                continue
            for fut, value, err in results:
                fut.set_exception(err) if err is not None else fut.set_result(value)
            if stop:
                return

    def query(self, sql: str, params: tuple | list = ()) -> list[tuple]:
        """Read committed data (from the reader connection; never blocked by a write in progress)."""
        with self._read_lock:
            return self._read_db.execute(sql, params).fetchall()

    def audit(self, db, user_id: str | None, action: str, **detail: object) -> None:
        """Record what happened to the data (inside the caller's transaction). Never pass message content."""
        db.execute(
            "INSERT INTO audit (user_id, at, action, detail) VALUES (?, ?, ?, ?)",
            (user_id, time.time(), action, json.dumps(detail, sort_keys=True)),
        )

    def audit_mark(self) -> int:
        """The newest audit id (0 when empty): remember it, then ask deleted_since(user, mark)."""
        return self.query("SELECT coalesce(max(id), 0) FROM audit")[0][0]

    def deleted_since(self, user_id: str, mark: int) -> bool:
        """Whether any of the user's data was deleted after audit id `mark`."""
        return bool(self.query("SELECT 1 FROM audit WHERE user_id = ? AND action = 'deleted' AND id > ? LIMIT 1",
                               (user_id, mark)))

    def audit_log(self, user_id: str | None = None, limit: int = 100) -> list[dict]:
        sql = "SELECT id, user_id, at, action, detail FROM audit"
        params: list = []
        if user_id is not None:
            sql += " WHERE user_id = ?"
            params.append(user_id)
        rows = self.query(sql + " ORDER BY id DESC LIMIT ?", [*params, limit])
        return [{"id": r[0], "user_id": r[1], "at": r[2], "action": r[3], "detail": json.loads(r[4])} for r in rows]

    def scrub(self) -> None:
        """After a delete: fold the WAL into the database and truncate it, so no old page images remain."""
        with self._lock:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def vacuum(self) -> None:
        with self._lock:
            self.db.execute("VACUUM")
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
