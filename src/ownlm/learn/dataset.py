"""Dataset stage: the user's stored conversations → training and held-out examples, with an audit root.

An example is a window of one conversation path (root → leaf of the message tree) that ends in an assistant
reply; every assistant reply in it that is a *target* carries loss. Feedback decides targets: an edited reply
is replaced by the user's edit, a reply with thumbs down or a rating ≤ 2 (and no edit) stays as context but
is never a target. Long paths are cut into windows that fit `max_seq_len`, each starting at a user turn. The
held-out split is by conversation (never by message), decided by a hash of the conversation id so it is
stable as data grows. Augmentation (train split only, learn/augment.py): per train example, the last
exchange on its own, `paraphrases` rephrasings of its last user turn with the reply kept, and its earlier
exchanges reordered. Each augmented example records its source example's hash and its kind; like every
example it is a leaf of the Merkle root (so an inclusion proof covers it too), and it never enters the
held-out split: originals of both splits are made first, augmentation comes after and can neither add to the
held-out split nor displace an original through dedup.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field

from ownlm.learn.augment import KINDS, augment
from ownlm.learn.merkle import merkle_root
from ownlm.errors import ConfigError, InvalidInput
from ownlm.store.redact import redact
from ownlm.learn.tokens import TokenizedExample, example_sha256, tokenize_chat


@dataclass
class DatasetConfig:
    max_seq_len: int = 512  # tokens per example, chat template included
    heldout_fraction: float = 0.15  # share of conversations held out for evaluation (by conversation)
    min_examples: int = 10  # fewer training examples than this is an error
    redact: bool = True  # replace API keys, secrets, e-mails, phone and card numbers with placeholders
    context_variants: bool = True  # add the last exchange of multi-turn examples as its own example
    # rule-based rephrasings of each train example's last user turn (reply kept): facts generalise to unseen
    # questions only when seen asked several ways. 0 = off; the default is provisional until measured.
    paraphrases: int = 3
    reorder_variants: bool = True  # add each train window with 2+ earlier exchanges in another order
    bad_rating: int = 2  # a rating at or below this (without an edit) makes a reply a non-target
    seed: str = "ownlm"  # salt of the held-out hash: another seed, another split

    def __post_init__(self) -> None:
        if not 64 <= self.max_seq_len <= 32768:
            raise ConfigError(f"max_seq_len={self.max_seq_len} is out of range", hint="use 64..32768 tokens")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(f"heldout_fraction={self.heldout_fraction} must be in [0, 1)")
        if self.min_examples < 1:
            raise ConfigError(f"min_examples={self.min_examples} must be at least 1")
        if not 0 <= self.paraphrases <= 16:
            raise ConfigError(f"paraphrases={self.paraphrases} is out of range", hint="use 0 (off) .. 16 per example")


@dataclass
class Example:
    """messages: [{"role", "content", "target": bool}], ending in a target assistant reply."""

    conversation_id: str
    messages: list[dict]
    split: str  # "train" | "heldout"
    augmented: bool = False
    source_sha256: str | None = None  # augmented: the sha256 of the train example it was made from
    augmentation: str | None = None  # augmented: its kind, one of learn.augment.KINDS

    @property
    def sha256(self) -> str:
        return example_sha256(self.messages)


@dataclass
class BuiltDataset:
    examples: list[Example]
    merkle_root: str
    stats: Counter = field(default_factory=Counter)
    config: DatasetConfig = field(default_factory=DatasetConfig)

    def split(self, name: str) -> list[Example]:
        return [e for e in self.examples if e.split == name]


def paths(messages: list[dict]) -> list[list[dict]]:
    """Root→leaf paths of a conversation's message tree. messages: rows with id, parent_id (in rowid order)."""
    children: dict[str | None, list[dict]] = {}
    ids = {m["id"] for m in messages}
    for m in messages:
        parent = m["parent_id"] if m["parent_id"] in ids else None  # a deleted parent makes a new root
        children.setdefault(parent, []).append(m)
    out, stack = [], [(r, [r]) for r in reversed(children.get(None, []))]
    while stack:  # iterative DFS: exports can hold very deep chains
        node, path = stack.pop()
        kids = children.get(node["id"], [])
        if not kids:
            out.append(path)
        for k in reversed(kids):
            stack.append((k, path + [k]))
    return out


def mark_targets(path: list[dict], feedback: dict[str, dict], bad_rating: int, stats: Counter) -> list[dict]:
    """Messages with target flags, edits applied. feedback: message id -> {"edit", "thumbs", "rating"} (latest)."""
    out = []
    for m in path:
        content, target = m["content"], False
        if m["role"] == "assistant":
            fb = feedback.get(m["id"], {})
            if fb.get("edit"):
                content, target = fb["edit"], True
                stats["targets_edited"] += 1
            elif fb.get("thumbs") == -1 or (fb.get("rating") is not None and fb["rating"] <= bad_rating):
                stats["targets_refused_negative_feedback"] += 1
            elif content.strip():
                target = True
        out.append({"role": m["role"], "content": content, "target": target})
    return out


def windows(msgs: list[dict], n_tokens, max_len: int, stats: Counter) -> list[list[dict]]:
    """Cut a path into windows of at most `max_len` tokens, each starting at a user (or system) turn and
    ending at a target reply. `n_tokens(messages)` counts tokens of a rendered window."""
    out: list[list[dict]] = []
    start = 0
    while start < len(msgs):
        best = None
        for end in range(start, len(msgs)):
            if msgs[end]["target"]:
                if n_tokens(msgs[start : end + 1]) <= max_len:
                    best = end
                else:
                    break
        if best is None:
            # the first exchange alone is too long: skip past its target
            nxt = next((i for i in range(start, len(msgs)) if msgs[i]["target"]), len(msgs) - 1)
            if any(m["target"] for m in msgs[start : nxt + 1]):
                stats["targets_dropped_too_long"] += 1
            start = nxt + 1
            continue
        out.append(msgs[start : best + 1])
        # the next window starts at the user turn after the last reply taken
        start = best + 1
        while start < len(msgs) and msgs[start]["role"] == "assistant":
            start += 1
    return out


def is_heldout(conversation_id: str, cfg: DatasetConfig) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{cfg.seed}:{conversation_id}".encode()).digest()[:8], "big")
    return h / 2**64 < cfg.heldout_fraction


def build(conversations: dict[str, list[dict]], feedback: dict[str, dict], tokenizer, cfg: DatasetConfig) -> BuiltDataset:
    """conversations: conversation id -> message rows (id, parent_id, role, content). Pure: no store access."""
    stats: Counter = Counter()

    def n_tokens(window: list[dict]) -> int:
        return len(tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in window], tokenize=True, return_dict=False))

    originals: list[Example] = []
    seen: set[str] = set()
    heldout_ids = {c for c in conversations if is_heldout(c, cfg)}
    if len(conversations) >= 2 and cfg.heldout_fraction > 0 and not heldout_ids:
        heldout_ids = {min(conversations, key=lambda c: hashlib.sha256(f"{cfg.seed}:{c}".encode()).hexdigest())}
    if heldout_ids == set(conversations):  # never hold out everything
        heldout_ids = set()
    for conv_id in sorted(conversations):
        split = "heldout" if conv_id in heldout_ids else "train"
        stats[f"conversations_{split}"] += 1
        for path in paths(conversations[conv_id]):
            stats["paths"] += 1
            msgs = mark_targets(path, feedback, cfg.bad_rating, stats)
            if cfg.redact:
                for m in msgs:
                    m["content"], hits = redact(m["content"])
                    stats.update({f"redacted_{k.lower()}": v for k, v in hits.items()})
            for window in windows(msgs, n_tokens, cfg.max_seq_len, stats):
                ex = Example(conv_id, window, split)
                if ex.sha256 in seen:
                    stats["duplicates_removed"] += 1
                    continue
                seen.add(ex.sha256)
                originals.append(ex)
                stats[f"examples_{split}"] += 1
    # Augmentation after every original is in `seen`: a variant never displaces an original (of either split)
    examples: list[Example] = []
    for kind in KINDS:
        stats[f"examples_augmented_{kind}"] += 0  # every kind is reported, also when none was made
    for ex in originals:
        examples.append(ex)
        if ex.split != "train":
            continue
        for v in augment(ex.messages, source_sha256=ex.sha256, paraphrases=cfg.paraphrases,
                         context=cfg.context_variants, reorder=cfg.reorder_variants, salt=cfg.seed):
            aug = Example(ex.conversation_id, v.messages, "train", True, ex.sha256, v.kind)
            if aug.sha256 in seen:
                stats["augmented_duplicates_removed"] += 1
                continue
            if v.kind != "context" and n_tokens(v.messages) > cfg.max_seq_len:  # e.g. a longer question
                stats["augmented_dropped_too_long"] += 1
                continue
            seen.add(aug.sha256)
            examples.append(aug)
            stats["examples_augmented"] += 1
            stats[f"examples_augmented_{v.kind}"] += 1
    check_augmentation(examples)
    n_train = sum(1 for e in examples if e.split == "train" and not e.augmented)  # variants add no new data
    if n_train < cfg.min_examples:
        raise InvalidInput(
            f"only {n_train} training examples (need at least {cfg.min_examples})",
            hint="capture or import more conversations with assistant replies, or lower --min-examples",
        )
    return BuiltDataset(examples, merkle_root([e.sha256 for e in examples]), stats, cfg)


def check_augmentation(examples: list[Example]) -> None:
    """The augmentation invariants, checked on every build: an augmented example is a train example, names
    its kind, and comes from a (non-augmented) train example of the same dataset. Raises AssertionError."""
    sources = {e.sha256 for e in examples if e.split == "train" and not e.augmented}
    for e in examples:
        if e.augmented or e.augmentation or e.source_sha256:
            if e.split != "train":
                raise AssertionError(f"augmented example {e.sha256[:12]} is in the {e.split} split")
            if not (e.augmented and e.augmentation in KINDS and e.source_sha256 in sources):
                raise AssertionError(f"augmented example {e.sha256[:12]} has no train source or kind")


def tokenize(examples: list[Example], tokenizer) -> list[TokenizedExample]:
    out = []
    for e in examples:
        ids, labels = tokenize_chat(tokenizer, e.messages)
        out.append(TokenizedExample(ids, labels, e.conversation_id, e.sha256))
    return out


def config_dict(cfg: DatasetConfig) -> dict:
    return asdict(cfg)
