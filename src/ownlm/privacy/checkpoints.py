"""A trainer's training checkpoints, kept sealed so that a round killed mid-way resumes where it stopped.

A round on a remote trainer or a Ray worker (the trainer role, privacy/trainer.py) erases its work directory
whatever happens, and a killed process's directory is erased by the next one (`erase_stale_jobs`). Without more,
a retried round starts again from step 0. So after each checkpoint, the trainer seals it — the adapter, the
optimizer state and the loop state (learn/steps.py) — to *its own* HPKE key (artifact/seal.py, the bundle format:
no new cryptography) and keeps it under home/trainer/checkpoints/<job id>.sealed, where the job id is a digest of
what defines the job's computation (user, base, dataset Merkle root, version, training settings). A retry of the
same job, on the same trainer (the only one that can open the job), opens it and resumes; train() itself checks
the checkpoint's fingerprint against data, config and base and ignores one that does not match.

What is kept is what a sealed job already is: ciphertext only this trainer's key opens, holding no conversation
text (LoRA factors and AdamW moments; the loop state names batches by example index). It is erased when the job
ends (done or failed in Python), when the node says the round is over (`cluster.agent.TrainerAgent.sweep`), and
after `MAX_AGE_S` in any case.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from ownlm.artifact.seal import NodeKey, open_bundle, seal
from ownlm.errors import CorruptArtifact
from ownlm.fsutil import atomic_write, mkdir_private

MAX_AGE_S = 24 * 3600.0  # a job not retried within a day will not be: its round has long failed on the node
SUFFIX = ".sealed"


def job_id(job: dict) -> str:
    """Hex digest naming a job by what its training computes (not by its random seal): the same job retried, or
    re-sent by the node after a restart, gets the same id. Computable from job.json on both sides."""
    keys = ("user", "base_sha256", "merkle_root", "model_version", "previous", "train_config")
    canon = json.dumps({k: job.get(k) for k in keys}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(b"ownlm job v1\0" + canon.encode()).hexdigest()


class SealedCheckpoints:
    """home/trainer/checkpoints/: one sealed file per job in flight on this trainer."""

    def __init__(self, root: Path, key: NodeKey):
        self.root = Path(root)
        self.key = key

    def path(self, jid: str) -> Path:
        if len(jid) != 64 or any(c not in "0123456789abcdef" for c in jid):  # names a file: hex only
            raise ValueError(f"not a job id: {jid!r}")
        return self.root / (jid + SUFFIX)

    def save(self, jid: str, ckpt_root: Path) -> None:
        """Seal the newest complete checkpoint under `ckpt_root` (learn/steps.save_checkpoint's layout)."""
        from ownlm.learn.steps import LATEST

        latest = (ckpt_root / LATEST).read_text().strip()
        # The bundle format holds flat names only: the step directory's files, and LATEST naming that directory.
        files = {LATEST: (latest + "\n").encode()}
        for f in sorted((ckpt_root / latest).iterdir()):
            files[f.name] = f.read_bytes()
        mkdir_private(self.root)
        atomic_write(self.path(jid), seal(files, self.key.public_json()))

    def restore(self, jid: str, ckpt_root: Path) -> bool:
        """Write the job's sealed checkpoint back under `ckpt_root`; False when there is none or it does not open
        (then it is erased: training starts from step 0)."""
        from ownlm.learn.steps import LATEST

        p = self.path(jid)
        if not p.exists():
            return False
        try:
            files = open_bundle(p.read_bytes(), self.key)
        except (CorruptArtifact, OSError, ValueError):
            self.erase(jid)
            return False
        latest = files.pop(LATEST, b"").decode().strip()
        if not latest.startswith("step-") or not latest[5:].isdigit():
            self.erase(jid)
            return False
        for name, data in files.items():  # unpack_files admits no '/' and no leading '.' in a name
            atomic_write(ckpt_root / latest / name, data)
        atomic_write(ckpt_root / LATEST, latest + "\n")  # last: LATEST names only a complete directory
        return True

    def erase(self, jid: str) -> None:
        self.path(jid).unlink(missing_ok=True)

    def erase_stale(self, max_age_s: float = MAX_AGE_S) -> list[Path]:
        """Erase sealed checkpoints older than `max_age_s` (their jobs will not be retried)."""
        gone = []
        now = time.time()
        for p in sorted(self.root.glob("*" + SUFFIX)) if self.root.is_dir() else []:
            if now - p.stat().st_mtime > max_age_s:
                p.unlink(missing_ok=True)
                gone.append(p)
        return gone
