"""Sealed bundles: one `.ownlm` file, encrypted to one node with post-quantum hybrid HPKE.

HPKE (RFC 9180) with KEM ML-KEM-768 + X25519 (X-Wing), HKDF-SHA256, AES-256-GCM, from `cryptography`. HPKE
there is single-shot and holds the whole message in memory, so a bundle seals only a random 256-bit content
key with HPKE and encrypts the payload with it in AES-256-GCM chunks.

File layout (all integers big-endian):
    b"OWNLM" + u8 format version (1)
    u32 header length + header JSON: {suite, recipient (node key id), sealed_key (b64 HPKE ciphertext),
                                      nonce_prefix (b64, 8 bytes), chunk_size}
    chunks: u32 length + AES-256-GCM ciphertext (with tag), nonce = nonce_prefix || u32 index,
            AAD = sha256(magic + header) || u64 index || u8 last-chunk flag
The AAD binds every chunk to this header and to its position, and marks the last one: a flipped byte, a
swapped, dropped or truncated chunk all fail authentication.

The plaintext payload is a tiny container: u32 index length + index JSON {"files": [[name, size], ...]} +
the files' bytes in that order.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ownlm.errors import CorruptArtifact, InvalidInput, StoreError, WrongRecipient

MAGIC = b"OWNLM"
VERSION = 1
SUITE_NAME = "MLKEM768_X25519/HKDF_SHA256/AES_256_GCM"
CHUNK = 1 << 20
INFO = b"ownlm bundle v1 content key"


def suite() -> hpke.Suite:
    return hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)


def check_mlkem() -> None:
    """Fail early, with a fix, when the installed OpenSSL lacks ML-KEM."""
    try:
        mlkem.MLKEM768PrivateKey.generate()
    except Exception as e:  # UnsupportedAlgorithm on older OpenSSL builds
        raise StoreError(f"this cryptography build has no ML-KEM ({e})", hint="install cryptography>=50 (ships OpenSSL with ML-KEM)") from None


@dataclass(frozen=True)
class NodeKey:
    """A node's HPKE key pair. Hybrid private keys have no serializer: we keep the ML-KEM seed (64 bytes)
    and the raw X25519 key (32 bytes), from which both halves are rebuilt."""

    mlkem_seed: bytes
    x25519_raw: bytes

    @classmethod
    def generate(cls) -> "NodeKey":
        check_mlkem()
        return cls(mlkem.MLKEM768PrivateKey.generate().private_bytes_raw(), x25519.X25519PrivateKey.generate().private_bytes_raw())

    def private(self) -> hpke.MLKEM768X25519PrivateKey:
        return hpke.MLKEM768X25519PrivateKey(
            mlkem.MLKEM768PrivateKey.from_seed_bytes(self.mlkem_seed), x25519.X25519PrivateKey.from_private_bytes(self.x25519_raw)
        )

    def public_json(self) -> dict:
        m = mlkem.MLKEM768PrivateKey.from_seed_bytes(self.mlkem_seed).public_key().public_bytes_raw()
        x = x25519.X25519PrivateKey.from_private_bytes(self.x25519_raw).public_key().public_bytes_raw()
        return {"kem": "MLKEM768_X25519", "mlkem768": base64.b64encode(m).decode(), "x25519": base64.b64encode(x).decode(),
                "key_id": hashlib.sha256(m + x).hexdigest()[:16]}


def load_public(doc: dict) -> tuple[hpke.MLKEM768X25519PublicKey, str]:
    """A node's public key from its JSON (`ownlm node pubkey`); returns (key, key id)."""
    try:
        if doc.get("kem") != "MLKEM768_X25519":
            raise ValueError(f"kem {doc.get('kem')!r}")
        m, x = base64.b64decode(doc["mlkem768"]), base64.b64decode(doc["x25519"])
        key = hpke.MLKEM768X25519PublicKey(mlkem.MLKEM768PublicKey.from_public_bytes(m), x25519.X25519PublicKey.from_public_bytes(x))
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidInput(f"not an ownlm node public key ({e})", hint="export it on the node with `ownlm node pubkey`") from None
    return key, hashlib.sha256(m + x).hexdigest()[:16]


def pack_files(files: dict[str, bytes]) -> bytes:
    index = json.dumps({"files": [[n, len(b)] for n, b in files.items()]}).encode()
    return struct.pack(">I", len(index)) + index + b"".join(files.values())


def unpack_files(payload: bytes) -> dict[str, bytes]:
    try:
        (n,) = struct.unpack(">I", payload[:4])
        index = json.loads(payload[4 : 4 + n])["files"]
        out, pos = {}, 4 + n
        for name, size in index:
            if not isinstance(name, str) or "/" in name or name.startswith(".") or pos + size > len(payload):
                raise ValueError(f"bad entry {name!r}")
            out[name] = payload[pos : pos + size]
            pos += size
        if pos != len(payload):
            raise ValueError("trailing bytes")
        return out
    except (struct.error, ValueError, KeyError, TypeError) as e:
        raise CorruptArtifact(f"bundle payload is malformed ({e})", hint="rebuild the bundle") from None


def _aad(header_digest: bytes, index: int, last: bool) -> bytes:
    return header_digest + struct.pack(">QB", index, int(last))


def seal(files: dict[str, bytes], recipient: dict) -> bytes:
    """Encrypt `files` to the node whose public key JSON is `recipient`."""
    pub, rid = load_public(recipient)
    content_key = AESGCM.generate_key(bit_length=256)
    prefix = os.urandom(8)
    header = json.dumps({"suite": SUITE_NAME, "recipient": rid, "chunk_size": CHUNK,
                         "sealed_key": base64.b64encode(suite().encrypt(content_key, pub, info=INFO + rid.encode())).decode(),
                         "nonce_prefix": base64.b64encode(prefix).decode()}, sort_keys=True).encode()
    head = MAGIC + bytes([VERSION]) + struct.pack(">I", len(header)) + header
    digest = hashlib.sha256(head).digest()
    payload, aead, out = pack_files(files), AESGCM(content_key), [head]
    n = max(1, -(-len(payload) // CHUNK))
    for i in range(n):
        ct = aead.encrypt(prefix + struct.pack(">I", i), payload[i * CHUNK : (i + 1) * CHUNK], _aad(digest, i, i == n - 1))
        out.append(struct.pack(">I", len(ct)) + ct)
    return b"".join(out)


def read_header(bundle: bytes) -> tuple[dict, int]:
    """(header, offset of the first chunk); CorruptArtifact for anything that is not a v1 bundle."""
    if len(bundle) < 10 or bundle[:5] != MAGIC:
        raise CorruptArtifact("not an ownlm bundle (bad magic)", hint="pass a .ownlm file made by `ownlm bundle`")
    if bundle[5] != VERSION:
        raise CorruptArtifact(f"bundle format version {bundle[5]} is not supported", hint="upgrade ownlm on this node")
    (n,) = struct.unpack(">I", bundle[6:10])
    try:
        header = json.loads(bundle[10 : 10 + n])
        if header["suite"] != SUITE_NAME:
            raise ValueError(f"suite {header['suite']}")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptArtifact(f"bundle header is damaged ({e})", hint="fetch the bundle again") from None
    return header, 10 + n


def open_bundle(bundle: bytes, node_key: NodeKey) -> dict[str, bytes]:
    """Decrypt and authenticate a bundle with this node's key; returns its files."""
    header, pos = read_header(bundle)
    rid = node_key.public_json()["key_id"]
    if header.get("recipient") != rid:
        raise WrongRecipient(
            f"the bundle is sealed to node key {header.get('recipient')}, this node is {rid}",
            hint="seal it to this node's public key (`ownlm node pubkey`)",
        )
    try:
        content_key = suite().decrypt(base64.b64decode(header["sealed_key"]), node_key.private(), info=INFO + rid.encode())
        prefix = base64.b64decode(header["nonce_prefix"])
    except (InvalidTag, ValueError, KeyError) as e:
        raise CorruptArtifact(f"the bundle's sealed key does not open ({type(e).__name__})", hint="the bundle was altered") from None
    digest, aead, parts, i = hashlib.sha256(bundle[:pos]).digest(), AESGCM(content_key), [], 0
    while pos < len(bundle):
        if pos + 4 > len(bundle):
            raise CorruptArtifact("the bundle is truncated", hint="fetch it again")
        (n,) = struct.unpack(">I", bundle[pos : pos + 4])
        chunk = bundle[pos + 4 : pos + 4 + n]
        pos += 4 + n
        last = pos >= len(bundle)
        try:
            parts.append(aead.decrypt(prefix + struct.pack(">I", i), chunk, _aad(digest, i, last)))
        except InvalidTag:
            raise CorruptArtifact(
                f"chunk {i} of the bundle fails authentication (altered or truncated)", hint="fetch the bundle again"
            ) from None
        i += 1
    if not parts:
        raise CorruptArtifact("the bundle has no content", hint="fetch it again")
    return unpack_files(b"".join(parts))
