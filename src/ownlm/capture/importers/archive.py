"""Exports that arrive as a .zip (ChatGPT's and Claude's "export data" downloads): find the conversations
file inside and read it into memory, bounded.

Nothing is extracted to disk, so a member's name (`../x`, an absolute path) never becomes a path. Before a
member is read, its declared uncompressed size is checked against a cap and against its compressed size (a
zip bomb declares a huge ratio); reading stops at the declared size in any case (zipfile then fails the
CRC check if the header lied), so a member can never yield more than the cap.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath

from ownlm.errors import ImportFormatError, PayloadTooLarge

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; the end record of an empty archive
# What the ChatGPT and Claude exports call their conversations file (both ship one, at the top or in a folder).
EXPORT_MEMBERS = ("conversations.json",)
# A zip holding just one of these is a compressed export of any format (e.g. a ShareGPT .json).
SINGLE_SUFFIXES = (".json", ".jsonl")
MAX_MEMBER_BYTES = 1 << 30  # uncompressed; about what a JSON export can be and still be decoded in memory
MAX_RATIO = 100  # uncompressed / compressed: chat JSON deflates ~5-20x, a zip bomb ~1000x
RATIO_FLOOR = 8 << 20  # below 8 MiB uncompressed any ratio is harmless
LISTED = 10  # members named in an error


def is_zip(raw: bytes) -> bool:
    return raw[:4] in ZIP_MAGIC


def read_export(path: Path, raw: bytes, limit: int = MAX_MEMBER_BYTES) -> tuple[str, bytes]:
    """(member name, its bytes) of the export inside the zip archive `raw` (read from `path`); the member may
    unpack to `limit` bytes at most."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            info = _pick(path, [i for i in zf.infolist() if not i.is_dir()])
            _check_size(path, info, limit)
            if info.flag_bits & 0x1:
                raise ImportFormatError(f"{info.filename} in {path} is encrypted",
                                        hint="extract it with its password and import the extracted file")
            with zf.open(info) as member:
                data = member.read(limit + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError) as exc:
        raise ImportFormatError(f"{path} is a damaged or unsupported zip archive ({exc})",
                                hint="download the export again, or extract conversations.json and import that") from None
    if len(data) > limit:  # unreachable unless zipfile stops honouring the declared size
        raise PayloadTooLarge(f"{info.filename} in {path} is over {_size(limit)} uncompressed",
                              hint="extract it and import the extracted file")
    return info.filename, data


def _pick(path: Path, members: list[zipfile.ZipInfo]) -> zipfile.ZipInfo:
    known = [i for i in members if PurePosixPath(i.filename).name.lower() in EXPORT_MEMBERS]
    if known:  # the shallowest one: the export's own, not a copy inside an attachment folder
        return min(known, key=lambda i: (len(PurePosixPath(i.filename).parts), i.filename))
    if len(members) == 1 and PurePosixPath(members[0].filename).suffix.lower() in SINGLE_SUFFIXES:
        return members[0]
    names = [i.filename for i in members]
    held = ", ".join(names[:LISTED]) + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")
    raise ImportFormatError(
        f"{path} is a zip archive without a chat export in it (it holds {held or 'nothing'})",
        hint="ChatGPT and Claude exports hold conversations.json; pass their .zip as downloaded, "
             "or extract the export file and import it",
    )


def _check_size(path: Path, info: zipfile.ZipInfo, limit: int) -> None:
    size, packed = info.file_size, max(info.compress_size, 1)
    if size > limit:
        raise PayloadTooLarge(
            f"{info.filename} in {path} is {_size(size)} uncompressed, over the {_size(limit)} "
            "ownlm reads from an archive", hint="extract it and import the extracted file")
    if size > RATIO_FLOOR and size / packed > MAX_RATIO:
        raise PayloadTooLarge(
            f"{info.filename} in {path} claims {_size(size)} from {_size(packed)} compressed "
            f"({size // packed}x): not a chat export (a zip bomb?)", hint="pass the export as downloaded")


def _size(n: int) -> str:
    return f"{n / (1 << 20):,.0f} MiB" if n >= 1 << 20 else f"{n:,} bytes"
