"""Decrypt every page of a SQLCipher 4 database (and its WAL) with its raw key, for deletion tests.

SQLite's sqlite_dbpage table is not compiled into the sqlcipher3 wheel, and a SELECT shows only live rows;
to prove deleted text is gone from free space too, the test reads the pages itself. SQLCipher 4 defaults:
4096-byte pages, AES-256-CBC, a 16-byte IV and a 64-byte HMAC-SHA512 reserved at the end of each page; the
first 16 bytes of the file are the salt (and are not encrypted). With a raw key the key is used as is.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

PAGE, RESERVE, SALT = 4096, 80, 16


def _decrypt_page(key: bytes, page: bytes, first: bool) -> bytes:
    iv = page[PAGE - RESERVE : PAGE - RESERVE + 16]
    body = page[SALT if first else 0 : PAGE - RESERVE]
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    return dec.update(body) + dec.finalize()


def decrypted_pages(db_path: Path, key: bytes) -> list[bytes]:
    """Plaintext of every page in the database file and every frame in its -wal file."""
    out = []
    data = db_path.read_bytes()
    for i in range(0, len(data) - PAGE + 1, PAGE):
        out.append(_decrypt_page(key, data[i : i + PAGE], first=(i == 0)))
    wal = db_path.with_name(db_path.name + "-wal")
    if wal.exists():
        w = wal.read_bytes()
        frame = 24 + PAGE
        for off in range(32, len(w) - frame + 1, frame):  # 32-byte WAL header, 24-byte frame headers
            pgno = int.from_bytes(w[off : off + 4], "big")
            out.append(_decrypt_page(key, w[off + 24 : off + frame], first=(pgno == 1)))
    return out
