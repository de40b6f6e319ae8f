"""Continual learning: what round k+1 of the learning loop trains on, and from which starting point.

Strategies (Personalization.continual):
    retrain   a fresh LoRA on every training example the user has (cost grows with the history);
    continue  the fp32 adapter of the model now serving, trained on the new examples only;
    replay    as continue, plus a seeded random sample of older examples (`replay` x the new count).

bench/continual.py measured them on topic-drifting persona rounds (bench/README.md, "continual.py"); the
default is the winner there. Continuing is only safe when the kept adapter still describes the user's data and
model, so a round falls back to `retrain` (and says why) when:
    - there is no kept adapter, or it was trained for another base or other LoRA settings;
    - the user is not served by the model that adapter became (a rollback, or routed to the base);
    - any of the user's data was deleted after it was trained (right to delete: an adapter continued from
      weights that learned deleted conversations would keep what the user asked us to forget).
A round that the gate refused only because its answers do not show the user's habits yet (it beat the base,
drifted within bounds, compressed faithfully and did not loop) keeps its adapter too, marked with that round's
job: the next round continues from it while the user is still served by the model that served them then.
Without this, a user whose first round is refused starts from scratch every round and never gets a model
(bench/README.md, personas.py: mira's three refused rounds).
The kept adapter lives in home/adapters/<user id>/ with lineage.json; it holds no conversation text.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ownlm.fsutil import atomic_write, make_private, mkdir_private
from ownlm.store.models import adapter_dir, forget  # the store owns what is derived from a user's data on disk

LINEAGE = "lineage.json"
STRATEGIES = ("retrain", "continue", "replay")


@dataclass(frozen=True)
class Lineage:
    """What the kept adapter is. audit_mark: the store's last audit id when it was kept (deletes after it count).

    model_id: the model this adapter became; for an adapter of a refused round (`refused_job` set), the model
    that was serving the user when it was kept ("" for the base)."""

    model_id: str
    dataset_id: str
    base_sha256: str
    lora: dict  # {"r", "alpha", "target_modules"}
    audit_mark: int
    refused_job: str | None = None  # the job of the round refused for its habits only that trained it


@dataclass
class RoundPlan:
    """The examples one round trains on and its starting adapter (None: a fresh LoRA)."""

    strategy: str  # what actually runs: 'retrain', 'continue' or 'replay'
    examples: list
    init_adapter: Path | None
    new: int  # examples not in the kept adapter's dataset
    replayed: int
    why: str

    def summary(self) -> dict:
        return {"strategy": self.strategy, "examples": len(self.examples), "new": self.new, "replayed": self.replayed,
                "why": self.why}


def read_lineage(home: Path, user_id: str) -> Lineage | None:
    path = adapter_dir(home, user_id) / LINEAGE
    try:
        return Lineage(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None  # missing or unreadable: the next round retrains, nothing is lost


def keep_adapter(home: Path, user_id: str, adapter: Path, lineage: Lineage) -> None:
    """Replace the kept adapter with `adapter` (copied) and its lineage; lineage.json is written last."""
    dest = adapter_dir(home, user_id)
    forget(home, user_id)
    mkdir_private(dest.parent)
    shutil.copytree(adapter, dest)  # copies the source's modes: made private below (adapters/ is 0700 meanwhile)
    make_private(dest)
    atomic_write(dest / LINEAGE, json.dumps(asdict(lineage), indent=1))


def plan_round(
    strategy: str,
    train_examples: list,
    *,
    lineage: Lineage | None,
    adapter: Path,
    old_hashes: set[str],
    active_model_id: str | None,
    base_sha256: str,
    lora: dict,
    deleted_since: bool,
    replay: float,
    seed: str,
) -> RoundPlan:
    """Choose the round's examples and starting point (pure: no I/O besides checking `adapter` exists).

    train_examples: the round's tokenized training examples (all of the user's data); each has .sha256.
    old_hashes: sha256 of the training examples of the kept adapter's dataset. seed: makes the replay sample
    the same when a round is resumed after a restart (its training checkpoint must fit).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown continual strategy {strategy!r}")

    def fresh(why: str) -> RoundPlan:
        return RoundPlan("retrain", list(train_examples), None, len(train_examples), 0, why)

    if strategy == "retrain":
        return fresh("configured: retrain on all data")
    if deleted_since:
        return fresh("data was deleted after the previous adapter was trained: retrained without it")
    if lineage is None or not (adapter / "adapter_model.safetensors").is_file():
        return fresh("no previous adapter: first round, or it was removed")
    if lineage.base_sha256 != base_sha256 or lineage.lora != lora:
        return fresh("the previous adapter was trained for another base model or LoRA settings")
    if lineage.refused_job is not None and lineage.model_id != (active_model_id or ""):
        return fresh(f"the user's model changed since round {lineage.refused_job} was refused")
    if lineage.refused_job is None and lineage.model_id != active_model_id:
        return fresh(f"the user is not served by {lineage.model_id} (rolled back or routed to the base)")
    new = [e for e in train_examples if e.sha256 not in old_hashes]
    if not new:
        return fresh("no new training examples since the previous adapter")
    old = [e for e in train_examples if e.sha256 in old_hashes]
    picked: list = []
    if strategy == "replay" and old:
        picked = random.Random(seed).sample(old, min(len(old), round(replay * len(new))))
    source = lineage.model_id if lineage.refused_job is None else f"refused round {lineage.refused_job}"
    why = f"continued from {source} on {len(new)} new examples" + (
        f" + {len(picked)} replayed" if strategy == "replay" else "")
    return RoundPlan(strategy, new + picked, adapter, len(new), len(picked), why)
