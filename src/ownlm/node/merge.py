"""Model merging (`ownlm merge`): personal models combined into one signed artifact with peft's methods.

Two or more installed lora1 models (a user's work and home models, two versions, or several users' models as a
new user's starting point) are merged by peft's `PeftModel.add_weighted_adapter`:
- linear: A = sum sqrt(w_i s_i) A_i, B = sum sqrt(w_i s_i) B_i (peft's "efficient but rough": the product
  has cross terms); ties / dare_linear / dare_ties: the same on trimmed (density), sign-elected (ties) or randomly
  dropped and rescaled (dare) factors. These need the sources' ranks to be equal.
- cat: A and B stacked, so B A = sum w_i s_i B_i A_i exactly, at the sum of the ranks; svd: that sum taken
  apart again by SVD at the target rank. Both take any ranks.
The merged fp32 factors are brought back to the served format: above the target rank (cat, by default the
largest source rank) the product B A is truncated by SVD (sqrt of the singular values on each side), then the
factors are compressed post hoc to lora1 (signs + scales, as for imported adapters) within the artifact's size
budget (MAX_ARTIFACT_BYTES), and the scales distilled (bitdelta/distill.py) against the uncompressed merged model
as teacher. The result is bundled, signed with the target user's key and installed as their next version by
the loop's own functions (artifact.bundle.make_bundle, node.install.install).

The manifest's `merge` field records the method, weights, density, ranks and each source (model id, user,
version, sha256 of its delta file and of its manifest, its dataset's Merkle root); `dataset.sources` lists the
training data roots of every source, theirs included, so that the right to delete (node.install._holds_deleted,
store.delete_data) refuses or removes a merged model whose sources learned from data deleted since.
"""

from __future__ import annotations

import copy
import hashlib
import math
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ownlm.errors import MergeConfigError, MergeIncompatible, NotFound, TrainedOnDeletedData

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties")
EQUAL_RANKS = ("linear", "ties", "dare_linear", "dare_ties")  # peft refuses unequal ranks for these
# The personal artifact's payload budget: r=8 on q/v of the 135M base is 57.6 KB of signs plus its scales.
MAX_ARTIFACT_BYTES = 64_000
MERGED = "merged"


@dataclass
class MergeConfig:
    """How models are merged. Validated on creation; `weights_for` checks the weights against the models."""

    method: str = field(default="linear", metadata={"help": f"peft's combination type: one of {', '.join(METHODS)}."})
    weights: tuple[float, ...] | None = field(
        default=None, metadata={"help": "One weight per model (default: equal weights summing to 1). Negative "
                                        "weights subtract a model's change."})
    density: float | None = field(
        default=None, metadata={"help": f"Share of each delta kept, in (0, 1]: required by {', '.join(NEEDS_DENSITY)}, "
                                        "refused by the others."})
    rank: int | None = field(
        default=None, metadata={"help": "Rank of the merged model (default: the largest source rank). cat's summed "
                                        "rank and anything above this is cut back by SVD."})
    distill_steps: int = field(
        default=8, metadata={"help": "Scale-distillation steps after the 1-bit compression (0: mean |x| scales). Each "
                                     "step runs the 135M base three times over 4 x 128 tokens (tens of seconds on 2 busy "
                                     "CPU cores), so the default is small; on a GPU, take 100 or more."})
    distill_seq_len: int = field(default=128, metadata={"help": "Tokens per distillation sequence."})
    distill_batch: int = field(default=4, metadata={"help": "Sequences per distillation step."})
    seed: int = field(default=0, metadata={"help": "Seeds dare's random drops and the distillation batches."})
    max_bytes: int = field(default=MAX_ARTIFACT_BYTES, metadata={"help": "Payload budget of the merged artifact."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MergeConfigError(f"unknown merge method {self.method!r}", hint=f"use one of {', '.join(METHODS)}")
        if self.method in NEEDS_DENSITY:
            if self.density is None:
                raise MergeConfigError(f"method {self.method} needs a density", hint="pass --density, e.g. 0.5")
        elif self.density is not None:
            raise MergeConfigError(f"method {self.method} takes no density",
                                   hint=f"drop --density, or use one of {', '.join(NEEDS_DENSITY)}")
        if self.density is not None and not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise MergeConfigError(f"density {self.density!r} is not in (0, 1]", hint="pass --density 0.5, say")
        for name, low in (("rank", 1), ("distill_steps", 0), ("distill_seq_len", 1), ("distill_batch", 1), ("max_bytes", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise MergeConfigError(f"invalid {name} {value!r}", hint=f"{name} must be a whole number >= {low}")
        if self.weights is not None:
            self.weights = tuple(self.weights)
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in self.weights):
                raise MergeConfigError(f"weights {list(self.weights)} are not all finite numbers",
                                       hint="pass --weights 0.5,0.5")
            if not any(self.weights):
                raise MergeConfigError("all weights are zero: the merge would be the base model",
                                       hint="give at least one model a non-zero weight")

    def weights_for(self, n: int) -> list[float]:
        if n < 2:
            raise MergeConfigError(f"a merge needs at least two models, got {n}", hint="name two models to merge")
        if self.weights is None:
            return [1.0 / n] * n
        if len(self.weights) != n:
            raise MergeConfigError(f"{len(self.weights)} weights for {n} models", hint=f"pass {n} comma-separated weights")
        return [float(w) for w in self.weights]


@dataclass
class Merged:
    delta: object  # bitdelta.Delta (lora1)
    report: dict  # method, weights, density, ranks, distillation figures, seconds


def lora1_budget(delta, rank: int) -> int:
    """Payload bytes of a lora1 delta on the same weights as `delta` at `rank` (its scale granularity, fp16)."""
    from ownlm.bitdelta.lora1 import lora1_nbytes

    return lora1_nbytes(list(delta.param_shapes.values()), rank, delta.granularity)


def check_compatible(deltas: list, base_sha256: str) -> None:
    """MergeIncompatible unless every delta is lora1 for this base, on the same weights of the same shapes."""
    for i, d in enumerate(deltas):
        if d.mode != "lora1":
            raise MergeIncompatible(f"model {i + 1} is a {d.mode} delta, not a LoRA", hint="only lora1 models merge")
        if d.base_sha256 != base_sha256:
            raise MergeIncompatible(f"model {i + 1} was made for base {d.base_sha256[:16]}…, not {base_sha256[:16]}…",
                                    hint="merge models of the same base (`ownlm info` shows this node's)")
    first = deltas[0]
    for i, d in enumerate(deltas[1:], 2):
        if d.param_shapes != first.param_shapes:
            raise MergeIncompatible(f"model {i} changes other weights than model 1 ({', '.join(d.target_modules)} vs "
                                    f"{', '.join(first.target_modules)})", hint="merge models trained on the same modules")


def merge_deltas(base, deltas: list, config: MergeConfig, distill_ids: list[int] | None = None) -> Merged:
    """The pure merge: lora1 deltas on `base` (a basemodel.BaseModel, float32) -> one lora1 delta (see module doc).

    distill_ids: token ids of the text the scales are distilled on (default: the shipped WikiText-2 slice)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from ownlm.bitdelta import CompressConfig, DistillConfig, compress_lora, distill
    from ownlm.bitdelta.distill import text_batches
    from ownlm.bitdelta.lora1 import PEFT_PREFIX, LoraAdapter
    from ownlm.node.export import write_peft

    t0 = time.perf_counter()
    weights = config.weights_for(len(deltas))
    check_compatible(deltas, base.sha256)
    ranks = [d.lora_r for d in deltas]
    if config.method in EQUAL_RANKS and len(set(ranks)) > 1:
        raise MergeIncompatible(f"method {config.method} needs models of one rank, these have ranks {ranks}",
                                hint="use --method cat or svd, which take any ranks")
    target = config.rank or max(ranks)
    merged_rank = sum(ranks) if config.method == "cat" else target if config.method == "svd" else ranks[0]
    if target > merged_rank:
        raise MergeConfigError(f"rank {target} is above the merged rank {merged_rank} of method {config.method}",
                               hint=f"pass --rank {merged_rank} or less, or use --method cat")
    need = lora1_budget(deltas[0], target)
    if need > config.max_bytes:
        raise MergeConfigError(f"a rank-{target} model is {need:,} bytes of payload, above the {config.max_bytes:,}-byte budget",
                               hint="pass a smaller --rank")

    work = Path(tempfile.mkdtemp(prefix="ownlm-merge-"))  # 0700: the factors are derived from users' data
    model = copy.deepcopy(base.model)  # peft injects its layers in place; the caller's base stays as it was
    try:
        names = [f"m{i}" for i in range(len(deltas))]
        for name, d in zip(names, deltas):
            write_peft(d, base.source.path, work / name)  # the export path: peft loads exactly what is served
        peft_model = PeftModel.from_pretrained(model, str(work / names[0]), adapter_name=names[0])
        for name in names[1:]:
            peft_model.load_adapter(str(work / name), adapter_name=name)
        with torch.random.fork_rng(devices=[]):  # dare's random drops, seeded, without moving the caller's RNG
            torch.manual_seed(config.seed)
            peft_model.add_weighted_adapter(names, weights, MERGED, combination_type=config.method,
                                            density=config.density, svd_rank=target if config.method == "svd" else None)
        peft_model.set_adapter(MERGED)
        peft_model.eval()
        factors = {}
        for path, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and MERGED in module.lora_A:
                a = module.lora_A[MERGED].weight.detach().float().cpu()
                b = module.lora_B[MERGED].weight.detach().float().cpu() * module.scaling[MERGED]
                factors[path.removeprefix(PEFT_PREFIX)] = truncate(a, b, target)
        adapter = LoraAdapter(r=target, alpha=float(target), factors=factors)  # scaling 1: B A is the delta
        delta = compress_lora(adapter, CompressConfig(mode="lora1", scales=deltas[0].granularity), base.sha256)
        figures = {"steps": 0}
        if config.distill_steps:
            dcfg = DistillConfig(steps=config.distill_steps, batch_size=config.distill_batch, seq_len=config.distill_seq_len,
                                 seed=config.seed)
            ids = distill_ids if distill_ids is not None else _wikitext_ids(base.tokenizer)
            # teacher: the base with peft's merged adapter in fp32 (for cat, at the full summed rank)
            delta, rep = distill(base.model, peft_model, delta, text_batches(ids, dcfg), dcfg)
            figures = {"steps": rep.steps, "loss": rep.loss, "before": rep.loss_before, "after": rep.loss_after,
                       "seconds": round(rep.seconds, 2)}
    finally:
        del model
        shutil.rmtree(work, ignore_errors=True)
    report = {"method": config.method, "weights": weights, "density": config.density, "rank": target,
              "merged_rank": merged_rank, "source_ranks": ranks, "seed": config.seed, "payload_bytes": delta.nbytes,
              "distill": figures, "seconds": round(time.perf_counter() - t0, 2)}
    return Merged(delta, report)


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of rank <= `rank`: unchanged if already, else the best rank-`rank` B' A' of B A (SVD), the square
    root of the singular values on each side."""
    if a.shape[0] <= rank:
        return a, b
    u, s, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (root[:, None] * vh[:rank]).float().contiguous(), (u[:, :rank] * root).float().contiguous()


def _wikitext_ids(tokenizer) -> list[int]:
    from ownlm.evaluate.general import load_general

    return tokenizer(load_general("wikitext2"))["input_ids"]


# --- the node side: installed models in, a signed merged model installed -------------------------------------


@dataclass
class Source:
    user: object  # store.User
    model: dict  # the registry row (store.model)
    delta: object  # its lora1 Delta, verified


@dataclass
class MergeOutcome:
    installed: object  # node.install.InstallResult
    manifest: dict
    report: dict
    sources: list[Source]


def resolve_sources(store, settings, default_user, refs: list[str]) -> list[Source]:
    """Each ref is `MODEL` (an id or version number of `default_user`) or `USER:MODEL`; the model is found, its
    delta verified against this node's base, and refused if it learned from data deleted since."""
    from ownlm.basemodel import base_sha256, resolve_base
    from ownlm.bitdelta import load_delta
    from ownlm.node.install import _holds_deleted

    node_base = base_sha256(resolve_base(settings.base), settings.home)
    out = []
    for ref in refs:
        name, sep, which = ref.rpartition(":")
        user = store.get_user(name) if sep else default_user
        try:
            model = store.model(user.id, which)
        except NotFound:
            raise NotFound(f"user {user.name} has no model {which!r}",
                           hint=f"see `ownlm models --user {user.name}` (an id or a version number; USER:MODEL for another user's)") from None
        delta = load_delta(model["path"])
        if delta.base_sha256 != node_base:
            raise MergeIncompatible(f"{user.name}'s {model['id']} was made for base {delta.base_sha256[:16]}…, this node "
                                    f"serves {node_base[:16]}…", hint="merge models of the base this node serves")
        if _holds_deleted(store, user.id, model["manifest"]):
            raise TrainedOnDeletedData(f"{user.name}'s {model['id']} learned from conversations deleted since",
                                       hint="merge models trained on the data that remains")
        out.append(Source(user, model, delta))
    if len({(s.user.id, s.model["id"]) for s in out}) < len(out):
        raise MergeConfigError("the same model is named twice", hint="name each model once (weights say how much)")
    return out


def source_record(source: Source) -> dict:
    """What the merged manifest records of one source: enough to find and check it again."""
    from ownlm.artifact.manifest import canonical
    from ownlm.bitdelta.format import TENSORS

    manifest = source.model["manifest"]
    return {"model_id": source.model["id"], "user": source.user.name, "user_id": source.user.id,
            "version": source.model["version"], "delta_sha256": manifest["files"][TENSORS]["sha256"],
            "manifest_sha256": hashlib.sha256(canonical(manifest)).hexdigest(),
            "merkle_root": (manifest.get("dataset") or {}).get("merkle_root", "")}


def merge_models(store, settings, refs: list[str], user, config: MergeConfig, into=None, base=None,
                 distill_ids: list[int] | None = None) -> MergeOutcome:
    """Merge the models `refs` (see resolve_sources; bare ones are `user`'s) and install the result, signed with
    the key of `into` (default `user`), as that user's next version; they are routed to it."""
    from ownlm.artifact.bundle import make_bundle
    from ownlm.basemodel import load_base
    from ownlm.bitdelta import load_delta, save_delta
    from ownlm.fsutil import mkdir_private
    from ownlm.node.install import install
    from ownlm.store.models import training_roots

    into = into or user
    config.weights_for(len(refs))  # bad weights fail before anything is loaded
    sources = resolve_sources(store, settings, user, refs)
    base = base or load_base(settings)
    merged = merge_deltas(base, [s.delta for s in sources], config, distill_ids)
    work = settings.home / "jobs" / f"merge-{secrets.token_hex(6)}"
    mkdir_private(work)
    try:
        save_delta(merged.delta, work / "delta")
        load_delta(work / "delta", expect_base_sha256=base.sha256)  # what is signed reads back whole
        data_roots = []
        for s in sources:
            for uid, root in training_roots(s.model["manifest"], s.user.id):
                if {"user_id": uid, "merkle_root": root} not in data_roots:
                    data_roots.append({"user_id": uid, "merkle_root": root})
        record = {**{k: merged.report[k] for k in ("method", "weights", "density", "rank", "merged_rank", "seed")},
                  "distill_steps": merged.report["distill"]["steps"], "sources": [source_record(s) for s in sources],
                  "data": data_roots}
        trained = [s.model["manifest"].get("training") or {} for s in sources]
        report = {"samples": sum(t.get("samples") or 0 for t in trained), "tokens": sum(t.get("tokens") or 0 for t in trained),
                  "duration_s": merged.report["seconds"], "loss": None, "heldout_loss_base": None,
                  "heldout_loss_personal": None, "dataset": {"merkle_root": ""}}
        latest = store.models(into.id)
        data, manifest = make_bundle(
            delta_dir=work / "delta", report=report, user_name=into.name, signing_key=store.signing_key(into.id),
            recipient=store.node_key().public_json(), base_name=base.source.name,
            version=store.max_version(into.id) + 1, previous=latest[0]["id"] if latest else None, merge=record)
        res = install(store, settings, data, keep=settings.personalization.keep_versions)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with store.tx() as db:
        store.audit(db, into.id, "merged", model=res.model_id, method=config.method,
                    sources=[f"{s.user.name}:{s.model['id']}" for s in sources])
    return MergeOutcome(res, manifest, merged.report, sources)
