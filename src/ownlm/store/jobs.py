"""The learning loop's jobs in the store: one open job per user, persisted so a restart can resume them.

Several processes may share one home (`ownlm serve` and an `ownlm train` from a shell). A job is run by the one
process that holds its lease: `claim_job` takes it atomically (a queued job nobody reserved, or a job whose
owner stopped renewing its lease or — on this host — is no longer alive), `renew_job` extends it while the round
runs, and every write of the running round names its owner, so a process that lost the lease cannot overwrite
the winner's result (`LeaseLost`).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time

from ownlm.errors import Busy

LEASE_S = 60.0  # a running round renews its lease every LEASE_S / 4 seconds
PROCESS_OWNER = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"  # this process, as a job owner


class LeaseLost(Exception):
    """Another process owns this job now: stop running it, write nothing more."""


def owner_alive(owner: str | None) -> bool:
    """False when `owner` ("host:pid:nonce") is a process of this host that no longer exists; else True
    (another host's process can only be judged by its lease)."""
    if not owner:
        return False
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    if owner.startswith(PROCESS_OWNER.rsplit(":", 1)[0] + ":") and owner != PROCESS_OWNER:
        return False  # our pid with another nonce: a process that died and whose pid we reuse
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _samples_since(query, user_id: str, since: str) -> int:
    """samples_since with `query(sql, params) -> rows` on the connection the caller reads from."""
    states = "('deployed')" if since == "deployed" else "('deployed', 'refused', 'failed')"
    mark = query(f"SELECT coalesce(max(watermark), 0) FROM jobs WHERE user_id = ? AND state IN {states}", (user_id,))[0][0]
    return query("SELECT count(*) FROM messages WHERE user_id = ? AND role = 'assistant' AND rowid > ?",
                 (user_id, mark))[0][0]


class JobsMixin:
    def enqueue_job(self, user_id: str, reason: str, owner: str | None = None, lease_s: float = LEASE_S) -> str:
        """A queued job for the user; refused while one is queued or running. With `owner`, the job is
        reserved for that process (another may take it only if the lease runs out before it is claimed)."""
        with self.tx() as db:
            open_job = db.execute("SELECT id FROM jobs WHERE user_id = ? AND state IN ('queued', 'running')", (user_id,)).fetchone()
            if open_job:
                raise Busy(f"a job for this user is already {self.job(open_job[0])['state']}",
                                      hint="wait for it to finish (see /api/personalization/status)")
            jid = "job_" + secrets.token_hex(6)
            now = time.time()
            db.execute("INSERT INTO jobs (id, user_id, state, reason, created_at, owner, lease_until)"
                       " VALUES (?, ?, 'queued', ?, ?, ?, ?)",
                       (jid, user_id, reason, now, owner, now + lease_s if owner else None))
        return jid

    def claim_job(self, job_id: str, owner: str = PROCESS_OWNER, lease_s: float = LEASE_S) -> bool:
        """Take the job's lease for `owner` if it is free: open, and reserved by nobody, by `owner` itself, or by a
        process whose lease ran out or that is gone. True if `owner` now holds it."""
        now = time.time()
        with self.tx() as db:
            row = db.execute("SELECT state, owner, lease_until FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] not in ("queued", "running"):
                return False
            state, holder, until = row
            free = holder is None or holder == owner or (until or 0) < now or not owner_alive(holder)
            if not free:
                return False
            # the WHERE repeats what was read: two claimers in one instant cannot both win
            n = db.execute("UPDATE jobs SET owner = ?, lease_until = ? WHERE id = ? AND owner IS ? AND lease_until IS ?",
                           (owner, now + lease_s, job_id, holder, until)).rowcount
        return n == 1

    def renew_job(self, job_id: str, owner: str = PROCESS_OWNER, lease_s: float = LEASE_S) -> None:
        """Extend `owner`'s lease; raises LeaseLost if another process holds the job now."""
        self.update_job(job_id, as_owner=owner, lease_until=time.time() + lease_s)

    def update_job(self, job_id: str, as_owner: str | None = None, **fields: object) -> None:
        """Set fields of a job. With `as_owner`, only while that process holds the job's lease (else LeaseLost)."""
        if "result" in fields and not isinstance(fields["result"], (str, type(None))):
            fields["result"] = json.dumps(fields["result"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        where, params = ("id = ? AND owner = ?", (job_id, as_owner)) if as_owner else ("id = ?", (job_id,))
        with self.tx() as db:
            n = db.execute(f"UPDATE jobs SET {cols} WHERE {where}", (*fields.values(), *params)).rowcount
        if as_owner and n == 0:
            raise LeaseLost(f"job {job_id} is owned by another process")

    def job(self, job_id: str) -> dict:
        rows = self.query("SELECT id, user_id, state, stage, progress, reason, watermark, created_at, started_at,"
                          " finished_at, result, owner, lease_until FROM jobs WHERE id = ?", (job_id,))
        return self._job_row(rows[0])

    def jobs(self, user_id: str, limit: int = 20) -> list[dict]:
        rows = self.query("SELECT id, user_id, state, stage, progress, reason, watermark, created_at, started_at,"
                          " finished_at, result, owner, lease_until FROM jobs WHERE user_id = ? ORDER BY created_at DESC"
                          " LIMIT ?", (user_id, limit))
        return [self._job_row(r) for r in rows]

    def open_jobs(self) -> list[dict]:
        rows = self.query("SELECT id, user_id, state, stage, progress, reason, watermark, created_at, started_at,"
                          " finished_at, result, owner, lease_until FROM jobs WHERE state IN ('queued', 'running')"
                          " ORDER BY created_at")
        return [self._job_row(r) for r in rows]

    @staticmethod
    def _job_row(r) -> dict:
        keys = ("id", "user_id", "state", "stage", "progress", "reason", "watermark", "created_at", "started_at",
                "finished_at", "result", "owner", "lease_until")
        d = dict(zip(keys, r))
        d["result"] = json.loads(d["result"]) if d["result"] else None
        return d

    def samples_since(self, user_id: str, since: str = "deployed") -> int:
        """Assistant replies captured after the dataset of the last deployed round (since='deployed', what
        status shows) or of the last round that got as far as its dataset, deployed or refused
        (since='attempt', the scheduler's trigger: a refused round is not retried on the same data)."""
        return _samples_since(self.query, user_id, since)

    def enqueue_if_due(self, user_id: str, min_samples: int) -> str | None:
        """The scheduler's trigger, in one write transaction: a queued job for the user when none is open and at
        least `min_samples` replies came after the last attempted round (samples_since 'attempt'); else None.

        Both are read inside the transaction because, read one after the other, a round that ends between the two
        reads is seen neither as open nor by its watermark, and the same data would be trained twice."""
        with self.tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE user_id = ? AND state IN ('queued', 'running')", (user_id,)).fetchone():
                return None
            n = _samples_since(lambda sql, params: db.execute(sql, params).fetchall(), user_id, "attempt")
            if n < min_samples:
                return None
            jid, now = "job_" + secrets.token_hex(6), time.time()
            db.execute("INSERT INTO jobs (id, user_id, state, reason, created_at) VALUES (?, ?, 'queued', ?, ?)",
                       (jid, user_id, f"scheduled: {n} new samples", now))
        return jid

    def message_watermark(self, user_id: str) -> int:
        return self.query("SELECT coalesce(max(rowid), 0) FROM messages WHERE user_id = ?", (user_id,))[0][0]

    def next_run_at(self, user_id: str) -> float | None:
        rows = self.query("SELECT next_run_at FROM loop_state WHERE user_id = ?", (user_id,))
        return rows[0][0] if rows else None

    def set_next_run(self, user_id: str, when: float) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO loop_state (user_id, next_run_at) VALUES (?, ?)", (user_id, when))
