"""The audit trail's maths: a Merkle tree over the sha256 of every example of a dataset.

The leaves are every example in dataset order (learn/dataset.py build()): both splits, and the augmented
variants too (each right after its source), since a model learns from those as much as from the originals.

The root goes into every signed manifest. An inclusion proof shows that one example was in the data a model
was trained on, without revealing the others. Leaves and inner nodes are hashed with different prefixes
(0x00 / 0x01, as RFC 6962 does) so an inner node can never pass for a leaf; an odd node is carried up
unchanged instead of being paired with itself, which would let two different leaf lists share a root.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def leaf_hash(example_sha256: str) -> bytes:
    return hashlib.sha256(b"\x00" + bytes.fromhex(example_sha256)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _levels(leaves: list[str]) -> list[list[bytes]]:
    if not leaves:
        raise ValueError("a Merkle tree needs at least one leaf")
    level = [leaf_hash(x) for x in leaves]
    levels = [level]
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        levels.append(nxt)
        level = nxt
    return levels


def merkle_root(leaves: list[str]) -> str:
    """Hex root over the example hashes (hex sha256 strings), in their dataset order."""
    return _levels(leaves)[-1][0].hex()


@dataclass
class InclusionProof:
    index: int  # position of the leaf in the dataset order
    leaf: str  # the example's sha256 (hex)
    path: list[tuple[str, str]]  # (side of the sibling: "L" | "R", sibling hash hex), bottom-up
    root: str

    def to_json(self) -> dict:
        return {"index": self.index, "leaf": self.leaf, "path": [list(p) for p in self.path], "root": self.root}

    @classmethod
    def from_json(cls, d: dict) -> "InclusionProof":
        return cls(int(d["index"]), str(d["leaf"]), [(str(s), str(h)) for s, h in d["path"]], str(d["root"]))


def prove(leaves: list[str], index: int) -> InclusionProof:
    if not 0 <= index < len(leaves):
        raise IndexError(f"example {index} is not in the dataset (0..{len(leaves) - 1})")
    path = []
    i = index
    for level in _levels(leaves)[:-1]:
        sibling = i ^ 1
        if sibling < len(level):  # a carried-up odd node has no sibling at this level
            path.append(("L" if sibling < i else "R", level[sibling].hex()))
        i //= 2
    return InclusionProof(index, leaves[index], path, merkle_root(leaves))


def verify(proof: InclusionProof, root: str | None = None) -> bool:
    """True when the proof's path leads from its leaf to `root` (default: the root written in the proof)."""
    h = leaf_hash(proof.leaf)
    for side, sibling in proof.path:
        s = bytes.fromhex(sibling)
        h = node_hash(s, h) if side == "L" else node_hash(h, s)
    return h.hex() == (root or proof.root)
