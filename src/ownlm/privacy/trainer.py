"""ownlm in the *trainer role*: take a sealed training job, train, and hand back only a signed, sealed bundle.

A job is what a node may send under privacy tier 0 (cloud) or 2 (TEE): one HPKE-sealed file (the same
format as a model bundle, `ownlm.artifact.seal`) addressed to this trainer's key, holding `job.json`:

    {"version": 1, "user": name, "base_sha256": hex, "node_pubkey": {...node HPKE key JSON...},
     "train_config": {lr, epochs, max_steps, time_budget_s, qat}, "merkle_root": hex,
     "model_version": int, "previous": model id | null,
     "examples": [{"conversation_id", "split": "train"|"heldout", "messages": [{role, content, target}]}]}

The trainer opens it, checks it (its base, the examples' Merkle root), trains a LoRA (`ownlm.learn.train`), compresses
it to a lora1 BitDelta (`ownlm.evaluate.gate.compress_adapter`), signs the manifest with the trainer's own signing key
and seals the bundle to the node's key (`make_bundle`). Whatever happens, the job's work directory is then
erased (files overwritten with zeros, fsynced, removed) and nothing of the job is kept: no data, no adapter, no
log line with content. (Overwriting is best effort on SSDs and copy-on-write file systems; the trainer's home
belongs on an encrypted volume, or in a TEE's encrypted memory/disk under tier 2.)

The trainer's keys live in `home/trainer/keys.json` (0600): an HPKE key pair (ML-KEM-768 + X25519, like a
node's) for jobs, and an Ed25519 signing key whose public PEM the node must trust for each user it trains
(`ownlm trust add FILE --user NAME`).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import shutil
import threading
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from ownlm.artifact import sign
from ownlm.artifact.seal import NodeKey, load_public, open_bundle
from ownlm.privacy.checkpoints import SealedCheckpoints, job_id
from ownlm.errors import CorruptArtifact, DeltaMismatch, InvalidInput
from ownlm.fsutil import mkdir_private
from ownlm.settings import Settings
from ownlm.store.keys import _write_private

log = logging.getLogger(__name__)
JOB_FILE = "job.json"
JOB_VERSION = 1
# Only these training settings may come from a node; the rest (rank, modules...) are the trainer's.
JOB_TRAIN_KEYS = ("lr", "epochs", "max_steps", "time_budget_s", "qat")
# How often a job's training is checkpointed (and sealed away, privacy/checkpoints.py): a killed round rerun on this
# trainer loses at most this many steps (~3 s each on 2 cores at the default recipe); a checkpoint of the default
# adapter with its AdamW moments is ~5.5 MB to write and seal, small beside 8 steps.
CHECKPOINT_EVERY_STEPS = 8


class TrainerKeys:
    """The trainer's HPKE key (jobs are sealed to it) and signing key (bundles are signed with it)."""

    def __init__(self, hpke: NodeKey, signing):
        self.hpke, self.signing = hpke, signing

    @classmethod
    def load_or_create(cls, home: Path) -> "TrainerKeys":
        path = home / "trainer" / "keys.json"
        if path.exists():
            doc = json.loads(path.read_text())
            hpke = NodeKey(base64.b64decode(doc["mlkem_seed"]), base64.b64decode(doc["x25519"]))
            return cls(hpke, serialization.load_pem_private_key(doc["signing_pem"].encode(), password=None))
        mkdir_private(path.parent)
        hpke, signing = NodeKey.generate(), sign.generate("ed25519")
        pem = signing.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        _write_private(path, json.dumps({"mlkem_seed": base64.b64encode(hpke.mlkem_seed).decode(),
                                         "x25519": base64.b64encode(hpke.x25519_raw).decode(), "signing_pem": pem}).encode())
        return cls(hpke, signing)


def erase_tree(path: Path) -> None:
    """Overwrite every file under `path` with zeros (fsynced), then remove the tree. Best effort, see module doc."""
    if not path.exists():
        return
    for root, _dirs, files in os.walk(path):
        for name in files:
            p = Path(root) / name
            try:
                if p.is_symlink():
                    continue
                size = p.stat().st_size
                with open(p, "r+b") as f:
                    f.write(b"\0" * size)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError:
                pass
    shutil.rmtree(path, ignore_errors=True)


def erase_stale_jobs(jobs_dir: Path) -> list[Path]:
    """Erase the work directories of jobs whose process is gone (a trainer killed mid-job, e.g. a Ray worker
    SIGKILLed: its `finally` never ran). A directory is named `<pid>-<random>` by the process that owns it."""
    erased = []
    for d in sorted(jobs_dir.iterdir()) if jobs_dir.is_dir() else []:
        pid = d.name.partition("-")[0]
        if pid.isdigit() and _alive(int(pid)):
            continue
        erase_tree(d)
        erased.append(d)
    return erased


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parse_job(raw: bytes) -> dict:
    """job.json → dict, with its shape checked (InvalidInput says which field is wrong)."""
    try:
        job = json.loads(raw)
        if job.get("version") != JOB_VERSION:
            raise ValueError(f"job format version {job.get('version')!r}")
        for key, typ in (("user", str), ("base_sha256", str), ("node_pubkey", dict), ("train_config", dict),
                         ("merkle_root", str), ("model_version", int), ("examples", list)):
            if not isinstance(job.get(key), typ):
                raise ValueError(f"field {key!r} is missing or not a {typ.__name__}")
        for e in job["examples"]:
            if e.get("split") not in ("train", "heldout") or not isinstance(e.get("messages"), list):
                raise ValueError("an example lacks split or messages")
        extra = sorted(set(job["train_config"]) - set(JOB_TRAIN_KEYS))
        if extra:
            raise ValueError(f"train_config may only set {', '.join(JOB_TRAIN_KEYS)}, not {', '.join(extra)}")
        load_public(job["node_pubkey"])
    except (ValueError, TypeError, AttributeError) as e:
        raise InvalidInput(f"the training job is malformed ({e})", hint="send it with ownlm.privacy.remote.train_remotely") from None
    return job


class Trainer:
    """One trainer: its keys, its loaded base (kept for every job) and, under tier 2, its attester."""

    def __init__(self, settings: Settings, attester=None, base=None):
        from ownlm.basemodel import load_base

        self.settings = settings
        self.keys = TrainerKeys.load_or_create(settings.home)
        self.base = base if base is not None else load_base(settings)
        self.attester = attester
        self.jobs_dir = settings.home / "trainer" / "jobs"
        self.checkpoints = SealedCheckpoints(settings.home / "trainer" / "checkpoints", self.keys.hpke)
        self._lock = threading.Lock()  # one job at a time: the base model is shared

    def pubkey(self) -> dict:
        return self.keys.hpke.public_json()

    def signing_key_pem(self) -> str:
        return sign.public_pem(self.keys.signing)

    def attestation(self, nonce: bytes) -> dict | None:
        """Evidence binding this trainer's HPKE key and `nonce`, or None when it runs in no TEE."""
        return None if self.attester is None else self.attester.evidence(self.pubkey(), nonce)

    def run(self, sealed_job: bytes) -> bytes:
        """Open, check and run one job; return the sealed bundle. The job's data is erased whatever happens (and if
        this process is killed, by the next trainer process that starts: `erase_stale_jobs`)."""
        erase_stale_jobs(self.jobs_dir)
        self.checkpoints.erase_stale()
        work = self.jobs_dir / f"{os.getpid()}-{secrets.token_hex(8)}"
        try:
            files = open_bundle(sealed_job, self.keys.hpke)
            if set(files) != {JOB_FILE}:
                raise CorruptArtifact(f"a training job holds exactly {JOB_FILE}, not {sorted(files)}")
            job = parse_job(files.pop(JOB_FILE))
            if job["base_sha256"] != self.base.sha256:
                raise DeltaMismatch(
                    f"the job is for base {job['base_sha256'][:16]}…, this trainer has base {self.base.sha256[:16]}…",
                    hint="send the job to a trainer with the node's base model (`ownlm info` shows its sha256)",
                )
            with self._lock:
                try:
                    return self._train(job, work)
                finally:  # done or failed here: a rerun would not resume. Only a killed process leaves it behind.
                    self.checkpoints.erase(job_id(job))
        finally:
            erase_tree(work)

    def _train(self, job: dict, work: Path) -> bytes:
        from ownlm.artifact.bundle import make_bundle
        from ownlm.learn.merkle import merkle_root
        from ownlm.learn.dataset import Example, tokenize
        from ownlm.evaluate.gate import compress_adapter
        from ownlm.learn.train import CHECKPOINT_DIR, TrainConfig, train

        examples = [Example(str(e.get("conversation_id", "")), e["messages"], e["split"]) for e in job["examples"]]
        root = merkle_root([e.sha256 for e in examples]) if examples else ""
        if root != job["merkle_root"]:
            raise CorruptArtifact("the job's examples do not match its Merkle root", hint="rebuild the job on the node")
        tok = self.base.tokenizer
        train_ex = tokenize([e for e in examples if e.split == "train"], tok)
        held_ex = tokenize([e for e in examples if e.split == "heldout"], tok)
        tcfg = TrainConfig(**job["train_config"], checkpoint_every_steps=CHECKPOINT_EVERY_STEPS)
        mkdir_private(work)
        jid = job_id(job)
        # A rerun of a killed attempt resumes from its sealed checkpoint (train() checks that it matches).
        resumed = self.checkpoints.restore(jid, work / "train" / CHECKPOINT_DIR)
        if resumed:
            log.info("trainer: resuming job %s from its sealed checkpoint", jid[:12])
        report = train(self.base, train_ex, held_ex, tcfg, work / "train", resume=resumed,
                       dataset={"merkle_root": root}, on_checkpoint=lambda ckpt: self.checkpoints.save(jid, ckpt))
        compress_adapter(work / "train" / "adapter", work / "delta", self.base)
        report_dict = json.loads(report.to_json())
        report_dict.pop("adapter_dir", None)  # a path on the trainer: meaningless to the node
        data, _manifest = make_bundle(
            delta_dir=work / "delta", report=report_dict, user_name=job["user"], signing_key=self.keys.signing,
            recipient=job["node_pubkey"], base_name=self.base.source.name, version=job["model_version"],
            previous=job.get("previous"),
        )
        log.info("trainer: job done (%d examples, %d bytes out)", len(examples), len(data))
        return data
