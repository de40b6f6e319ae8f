"""The learning loop's jobs in the store: one open job per user, persisted so a restart can resume them."""

from __future__ import annotations

import json
import secrets
import time

from ownlm.errors import Busy


class JobsMixin:
    def enqueue_job(self, user_id: str, reason: str) -> str:
        """A queued job for the user; refused while one is queued or running."""
        with self.tx() as db:
            open_job = db.execute("SELECT id FROM jobs WHERE user_id = ? AND state IN ('queued', 'running')", (user_id,)).fetchone()
            if open_job:
                raise Busy(f"a job for this user is already {self.job(open_job[0])['state']}",
                                      hint="wait for it to finish (see /api/personalization/status)")
            jid = "job_" + secrets.token_hex(6)
            db.execute("INSERT INTO jobs (id, user_id, state, reason, created_at) VALUES (?, ?, 'queued', ?, ?)",
                       (jid, user_id, reason, time.time()))
        return jid

    def update_job(self, job_id: str, **fields: object) -> None:
        if "result" in fields and not isinstance(fields["result"], (str, type(None))):
            fields["result"] = json.dumps(fields["result"])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.tx() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def job(self, job_id: str) -> dict:
        rows = self.query("SELECT id, user_id, state, stage, progress, reason, watermark, created_at, started_at,"
                          " finished_at, result FROM jobs WHERE id = ?", (job_id,))
        return self._job_row(rows[0])

    def jobs(self, user_id: str, limit: int = 20) -> list[dict]:
        rows = self.query("SELECT id, user_id, state, stage, progress, reason, watermark, created_at, started_at,"
                          " finished_at, result FROM jobs WHERE user_id = ? ORDER BY created_at DESC LIMIT ?", (user_id, limit))
        return [self._job_row(r) for r in rows]

    def open_jobs(self) -> list[dict]:
        rows = self.query("SELECT id, user_id, state, stage, progress, reason, watermark, created_at, started_at,"
                          " finished_at, result FROM jobs WHERE state IN ('queued', 'running') ORDER BY created_at")
        return [self._job_row(r) for r in rows]

    @staticmethod
    def _job_row(r) -> dict:
        keys = ("id", "user_id", "state", "stage", "progress", "reason", "watermark", "created_at", "started_at",
                "finished_at", "result")
        d = dict(zip(keys, r))
        d["result"] = json.loads(d["result"]) if d["result"] else None
        return d

    def samples_since(self, user_id: str, since: str = "deployed") -> int:
        """Assistant replies captured after the dataset of the last deployed round (since='deployed', what
        status shows) or of the last round that got as far as its dataset, deployed or refused
        (since='attempt', the scheduler's trigger: a refused round is not retried on the same data)."""
        states = "('deployed')" if since == "deployed" else "('deployed', 'refused', 'failed')"
        mark = self.query(f"SELECT coalesce(max(watermark), 0) FROM jobs WHERE user_id = ? AND state IN {states}", (user_id,))[0][0]
        return self.query("SELECT count(*) FROM messages WHERE user_id = ? AND role = 'assistant' AND rowid > ?",
                          (user_id, mark))[0][0]

    def message_watermark(self, user_id: str) -> int:
        return self.query("SELECT coalesce(max(rowid), 0) FROM messages WHERE user_id = ?", (user_id,))[0][0]

    def next_run_at(self, user_id: str) -> float | None:
        rows = self.query("SELECT next_run_at FROM loop_state WHERE user_id = ?", (user_id,))
        return rows[0][0] if rows else None

    def set_next_run(self, user_id: str, when: float) -> None:
        with self.tx() as db:
            db.execute("INSERT OR REPLACE INTO loop_state (user_id, next_run_at) VALUES (?, ?)", (user_id, when))
