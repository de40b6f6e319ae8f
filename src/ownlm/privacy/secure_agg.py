"""Tier 3: sums of adapter updates that no aggregator sees in the clear.

Two mechanisms on flat float32 vectors (an adapter update laid end to end: tensors sorted by name, each
row-major, float32 — `flatten`, the same order as privacy/aggregate.py's Layout):

1. CKKS (TenSEAL 0.3.18), for a *person's* model. The person's key pair is a TenSEAL context: the secret one
   stays on their device, in the SQLCipher store like the signing keys (`person_keys`); the public one (public
   key only: no secret, no Galois or relinearisation keys) goes to every device and to the aggregator.

       keys = person_keys(store, user_id)                       # created on first use, kept in the store
       c = encrypt(keys.public, weight * vec)                   # on each device: bytes, chunked to the slots
       s = add([c1, c2, ...], keys.public)                      # the aggregator: no secret key, cannot decrypt
       s = add([c1, c2], keys.public, weights=[3, 1])           # or weighted by plaintext multiplication
       mean = decrypt(keys.secret, s, n) / total_weight         # only where the secret context is

   Parameters (`CKKSParams`): N = 8192 (4096 slots), coefficient moduli 60-40-40-60 bits (200 bits: within
   the 218 the homomorphic-encryption standard allows N = 8192 at 128-bit security), scale 2^40: one
   plaintext multiplication (the weights) and any number of additions, error ~1e-7 on values ~0.1.

2. Pairwise masking (Bonawitz et al., CCS 2017, without its dropout recovery), for a model *shared* by
   several people, where no single secret key may decrypt everyone's sum. TenSEAL has no threshold
   decryption (no n-of-n sharing of a CKKS secret key), so: every pair of participants (i, j) agrees on a seed
   by X25519 + HKDF (bound to the round), expands it with AES-256-CTR into a mask, and i adds it while j
   subtracts it. Updates are fixed-point integers (2^-24 resolution) modulo 2^64, so the masks cancel exactly
   in the sum; each masked vector alone is uniformly random. The aggregator learns only the sum. All n must
   report: a missing participant leaves its masks in the sum (`unmask_sum` then refuses), the round is redone.

The aggregator's side (`add`, `SecureSum`) never needs anything secret; tests/test_secure_agg.py runs it as a
separate process and checks what it saw. Wire format of a CKKS payload (no pickle):
MAGIC | u32 header length | header JSON {format, n, chunks, slots, context} | per chunk: u32 length | bytes.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field

import numpy as np

from ownlm.errors import ConfigError, CorruptArtifact, InvalidInput, PrivacyViolation

MAGIC = b"OWNLM-CKKS\x01"
FORMAT = "ownlm-ckks/1"


@dataclass(frozen=True)
class CKKSParams:
    """CKKS parameters; validated so that the encryption stays at 128-bit security."""

    poly_modulus_degree: int = field(default=8192, metadata={"help": "N; N/2 values per ciphertext."})
    coeff_mod_bit_sizes: tuple[int, ...] = field(default=(60, 40, 40, 60), metadata={
        "help": "Bit sizes of the coefficient moduli; each inner one is a level (one multiplication)."})
    scale_bits: int = field(default=40, metadata={"help": "log2 of the encoding scale (precision of the values)."})

    MAX_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}  # HE standard, 128-bit classical security

    def __post_init__(self) -> None:
        if self.poly_modulus_degree not in self.MAX_BITS:
            raise ConfigError(f"invalid CKKS poly_modulus_degree={self.poly_modulus_degree}",
                              hint=f"use one of {', '.join(map(str, self.MAX_BITS))}")
        if sum(self.coeff_mod_bit_sizes) > self.MAX_BITS[self.poly_modulus_degree] or len(self.coeff_mod_bit_sizes) < 3:
            raise ConfigError(f"invalid CKKS coeff_mod_bit_sizes={list(self.coeff_mod_bit_sizes)}: at least 3 moduli, "
                              f"at most {self.MAX_BITS[self.poly_modulus_degree]} bits in all for N={self.poly_modulus_degree}",
                              hint="use the default (60, 40, 40, 60) with N=8192")
        if not 20 <= self.scale_bits <= min(self.coeff_mod_bit_sizes[1:-1]):
            raise ConfigError(f"invalid CKKS scale_bits={self.scale_bits}", hint="use the inner moduli's bit size (40)")

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    def to_dict(self) -> dict:
        return {"poly_modulus_degree": self.poly_modulus_degree, "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
                "scale_bits": self.scale_bits}


@dataclass(frozen=True)
class Keys:
    secret: bytes  # serialized TenSEAL context with the secret key: never leaves the person's devices
    public: bytes  # the same context without it: for devices and aggregators

    @property
    def key_id(self) -> str:
        return context_id(self.public)


def context_id(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:16]


def new_keys(params: CKKSParams = CKKSParams()) -> Keys:
    import tenseal as ts

    ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                     coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    ctx.global_scale = 2.0 ** params.scale_bits
    secret = ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    public = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
    return Keys(secret, public)


def person_keys(store, user_id: str, params: CKKSParams = CKKSParams()) -> Keys:
    """The person's CKKS keys, created on first use and kept in their (encrypted) store."""
    found = store.he_keys(user_id)
    if found is None:
        keys = new_keys(params)
        store.save_he_keys(user_id, keys.secret, keys.public, context_id(keys.public), params.to_dict())
        found = store.he_keys(user_id)
    return Keys(*found)


def device_keys(store, user_id: str, user_name: str) -> Keys:
    """The person's key pair as this device holds it (made by `person_keys` here, or imported: privacy/securefed.py);
    ConfigError when this device has none."""
    found = store.he_keys(user_id)
    if found is None:
        raise ConfigError(f"this device has no tier-3 (CKKS) key for {user_name}, so it cannot take part in a "
                          "secure round", hint="on the device that has it: `ownlm federate key export --to "
                          "<this device's `ownlm node pubkey` file>`, then `ownlm federate key import FILE` here "
                          "(or `ownlm federate key init` on the first device)")
    return Keys(*found)


def _context(data: bytes, secret: bool):
    import tenseal as ts

    try:
        ctx = ts.context_from(data)
    except Exception as e:  # TenSEAL raises its own exception types for malformed bytes
        raise CorruptArtifact(f"not a TenSEAL context ({e})", hint="pass the bytes `new_keys` made") from None
    if secret and not ctx.is_private():
        raise PrivacyViolation("this context has no secret key: it cannot decrypt",
                               hint="decrypt on the person's own device, with person_keys(...).secret")
    return ctx


def public_context(data: bytes):
    """A context for encrypting and adding. Refuses one that holds a secret key (it must not travel)."""
    ctx = _context(data, secret=False)
    if ctx.is_private():
        raise PrivacyViolation("this context holds the secret key, which must not leave the person's devices",
                               hint="share Keys.public, never Keys.secret")
    return ctx


# --- CKKS payloads -----------------------------------------------------------------------------------------------


def _pack(header: dict, chunks: list[bytes]) -> bytes:
    head = json.dumps(header, sort_keys=True).encode()
    parts = [MAGIC, struct.pack(">I", len(head)), head]
    for c in chunks:
        parts += [struct.pack(">I", len(c)), c]
    return b"".join(parts)


def _unpack(data: bytes) -> tuple[dict, list[bytes]]:
    try:
        if not data.startswith(MAGIC):
            raise ValueError("no ownlm CKKS magic")
        at = len(MAGIC)
        (hl,) = struct.unpack_from(">I", data, at)
        header = json.loads(data[at + 4: at + 4 + hl])
        at += 4 + hl
        chunks = []
        for _ in range(int(header["chunks"])):
            (cl,) = struct.unpack_from(">I", data, at)
            chunks.append(data[at + 4: at + 4 + cl])
            if len(chunks[-1]) != cl:
                raise ValueError("truncated")
            at += 4 + cl
        if at != len(data) or header.get("format") != FORMAT:
            raise ValueError("trailing bytes or another format")
        return header, chunks
    except (ValueError, KeyError, TypeError, struct.error) as e:
        raise CorruptArtifact(f"not an ownlm CKKS payload ({e})", hint="the update was damaged or is not encrypted") from None


def slots_of(ctx) -> int:
    """Values per ciphertext (N/2) of a TenSEAL context."""
    return ctx.seal_context().data.key_context_data().parms().poly_modulus_degree() // 2


def encrypt(public: bytes, vec: np.ndarray) -> bytes:
    """Encrypt a flat float vector under the person's public context: one ciphertext per `slots` values."""
    import tenseal as ts

    ctx = public_context(public)
    x = np.asarray(vec, dtype=np.float64).ravel()
    if not np.all(np.isfinite(x)):
        raise InvalidInput("the update has non-finite values", hint="check the training run (it diverged)")
    slots = slots_of(ctx)
    chunks = [ts.ckks_vector(ctx, x[i:i + slots].tolist()).serialize() for i in range(0, len(x), slots)]
    return _pack({"format": FORMAT, "n": len(x), "chunks": len(chunks), "slots": slots, "context": context_id(public)}, chunks)


def _vectors(ctx, data: bytes, key_id: str) -> tuple[dict, list]:
    import tenseal as ts

    header, chunks = _unpack(data)
    if header["context"] != key_id:
        raise InvalidInput(f"this update was encrypted under key {header['context']}, not {key_id}",
                           hint="every device of a round encrypts with the same person's public context")
    try:
        return header, [ts.ckks_vector_from(ctx, c) for c in chunks]
    except Exception as e:
        raise CorruptArtifact(f"a ciphertext of the update does not load ({e})", hint="the update was damaged") from None


def add(ciphertexts: list[bytes], public: bytes, weights: list[float] | None = None) -> bytes:
    """The (weighted) sum of encrypted updates, computed without any secret key: what an aggregator runs.

    `weights` multiply each update as plaintext scalars (one CKKS level); None adds them as they are (the
    devices may have multiplied their own vectors before encrypting, as privacy/aggregate.py's `weighted`)."""
    if not ciphertexts:
        raise InvalidInput("no updates to add", hint="wait for at least one device's update")
    if weights is not None and len(weights) != len(ciphertexts):
        raise InvalidInput(f"{len(weights)} weights for {len(ciphertexts)} updates", hint="give one weight per update")
    acc = SecureSum(public)
    for k, c in enumerate(ciphertexts):
        acc.add(c, 1.0 if weights is None else float(weights[k]), scale=weights is not None)
    return acc.total()[0]


class SecureSum:
    """An aggregator's running sum of encrypted updates (the interface of privacy/aggregate.py's PlainSum):
    add(payload bytes, weight) and total() -> (encrypted sum bytes, summed weight). Holds the public context only.

    `scale=False` (the default, as PlainSum): the payload is already weight x vector, the weight is only summed;
    `scale=True`: the aggregator multiplies the ciphertext by the weight (plaintext multiplication)."""

    def __init__(self, public: bytes, dim: int | None = None):
        self.ctx, self.key_id, self.dim = public_context(public), context_id(public), dim
        self.sum: list | None = None
        self.weight, self.count = 0.0, 0

    def add(self, payload: bytes, weight: float, scale: bool = False) -> None:
        header, vecs = _vectors(self.ctx, payload, self.key_id)
        if self.dim is not None and header["n"] != self.dim:
            raise InvalidInput(f"an update of {header['n']} values, the round's have {self.dim}",
                               hint="every device must flatten the same adapter layout")
        self.dim = header["n"]
        if scale:
            vecs = [v * float(weight) for v in vecs]
        self.sum = vecs if self.sum is None else [a + b for a, b in zip(self.sum, vecs)]
        self.weight += float(weight)
        self.count += 1

    def total(self) -> tuple[bytes, float]:
        if self.sum is None:
            raise InvalidInput("no updates were added", hint="wait for at least one device's update")
        header = {"format": FORMAT, "n": self.dim, "chunks": len(self.sum), "slots": slots_of(self.ctx),
                  "context": self.key_id, "summands": self.count}
        return _pack(header, [v.serialize() for v in self.sum]), self.weight


def _public_id(ctx) -> str:
    public = ctx.copy()
    public.make_context_public()
    return context_id(public.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False,
                                       save_relin_keys=False))


def public_id_of(secret: bytes) -> str:
    """The key id (`Keys.key_id`) of the public half of a secret context."""
    return _public_id(_context(secret, secret=True))


def read_header(data: bytes) -> dict:
    """The clear header of a payload or sum: {format, n, chunks, slots, context[, summands]}."""
    return _unpack(data)[0]


def decrypt(secret: bytes, data: bytes, n: int) -> np.ndarray:
    """The float32 vector in a payload (an update or a sum), with the person's secret context."""
    ctx = _context(secret, secret=True)
    header, vecs = _vectors(ctx, data, _public_id(ctx))
    if header["n"] != n:
        raise InvalidInput(f"the payload holds {header['n']} values, {n} were expected", hint="check the adapter layout")
    out = np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in vecs]) if vecs else np.zeros(0)
    return out[:n].astype(np.float32)


def decrypt_mean(secret: bytes, total: bytes, weight: float, n: int) -> np.ndarray:
    """The weighted mean from SecureSum.total(): decrypt, then divide by the summed weight."""
    if not weight > 0:
        raise InvalidInput(f"summed weight {weight} is not positive", hint="give each update a positive weight")
    return (decrypt(secret, total, n) / np.float32(weight)).astype(np.float32)


def flatten(tensors: dict) -> tuple[np.ndarray, list[tuple[str, list[int]]]]:
    """Tensors (numpy or torch) laid end to end: sorted by name, each row-major, float32. Returns (vector, layout)."""
    layout, parts = [], []
    for name in sorted(tensors):
        t = tensors[name]
        a = t.detach().cpu().numpy() if hasattr(t, "detach") else np.asarray(t)
        layout.append((name, list(a.shape)))
        parts.append(a.astype(np.float32).ravel())
    return (np.concatenate(parts) if parts else np.zeros(0, np.float32)), layout


def unflatten(vec: np.ndarray, layout: list[tuple[str, list[int]]]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape)) if shape else 1
        out[name] = np.asarray(vec[at:at + size], dtype=np.float32).reshape(shape)
        at += size
    if at != len(vec):
        raise InvalidInput(f"a vector of {len(vec)} values for a layout of {at}", hint="use the layout it was flattened with")
    return out


# --- pairwise masking (a shared model) ---------------------------------------------------------------------------

FIXED_BITS = 24  # fixed-point resolution 2^-24 (~6e-8, float32's); |sum| must stay below 2^39


def mask_keypair() -> tuple[bytes, bytes]:
    """(private, public) raw X25519 keys of one participant for one round."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    k = X25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    return (k.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
            k.public_key().public_bytes(raw, serialization.PublicFormat.Raw))


def _pair_mask(private: bytes, peer_public: bytes, round_id: str, pair: tuple[int, int], n: int) -> np.ndarray:
    """The uint64 mask two participants share: X25519 -> HKDF-SHA256 (bound to round and pair) -> AES-256-CTR."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    key = HKDF(hashes.SHA256(), 32, salt=None, info=f"ownlm-mask/1|{round_id}|{pair[0]}|{pair[1]}".encode()).derive(shared)
    stream = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor().update(b"\0" * (8 * n))
    return np.frombuffer(stream, dtype=np.uint64)


def to_fixed(vec: np.ndarray) -> np.ndarray:
    x = np.asarray(vec, dtype=np.float64)
    if not np.all(np.isfinite(x)) or np.abs(x).max(initial=0) >= 2.0 ** 38:
        raise InvalidInput("the update has non-finite or huge values", hint="check the training run (it diverged)")
    return np.round(x * 2.0 ** FIXED_BITS).astype(np.int64).view(np.uint64)


def from_fixed(u: np.ndarray) -> np.ndarray:
    return (u.view(np.int64).astype(np.float64) / 2.0 ** FIXED_BITS).astype(np.float32)


def masked(vec: np.ndarray, me: int, private: bytes, publics: dict[int, bytes], round_id: str) -> np.ndarray:
    """Participant `me`'s update, fixed point, plus the masks it shares with every other participant
    (`publics`: index -> raw X25519 public key, everyone's, its own included or not). uint64, looks uniform."""
    x = to_fixed(vec)
    out = x.copy()
    with np.errstate(over="ignore"):
        for j, pub in sorted(publics.items()):
            if j == me:
                continue
            pair = (min(me, j), max(me, j))
            m = _pair_mask(private, pub, round_id, pair, len(x))
            out = out + m if me < j else out - m  # uint64 arithmetic wraps: exactly mod 2^64
    return out


def unmask_sum(masked_vectors: dict[int, np.ndarray], participants: set[int]) -> np.ndarray:
    """The sum of everyone's updates from their masked vectors (the aggregator's job; learns only the sum)."""
    if set(masked_vectors) != set(participants):
        missing = sorted(set(participants) - set(masked_vectors))
        raise InvalidInput(f"participants {missing} did not report: their masks do not cancel",
                           hint="pairwise masking without dropout recovery needs every participant; redo the round")
    total = np.zeros_like(next(iter(masked_vectors.values())))
    with np.errstate(over="ignore"):
        for v in masked_vectors.values():
            total = total + v
    return from_fixed(total)


def update_for_aggregator(tier: int, vec: np.ndarray, public: bytes | None) -> bytes | np.ndarray:
    """What a device hands to the federation transport for another machine: the CKKS payload when the person's
    public context is given (always, at tier 3), else the plaintext vector (tiers 0-2 only; tiers.py decides)."""
    from ownlm.privacy.tiers import check_update_form

    check_update_form(tier, "ckks" if public is not None else "plaintext")
    return encrypt(public, vec) if public is not None else np.asarray(vec, dtype=np.float32)
