"""The byte layout of a ``.nsz`` file: a checked JSON header followed by checked binary blobs.

    offset 0   8 bytes   magic b"\\x89NSZ\\r\\n\\x1a\\n" (catches text-mode mangling, like PNG's)
    offset 8   4 bytes   header length H, uint32 little-endian
    offset 12  H bytes   header, UTF-8 JSON (zlib-compressed since format version 2: it then starts
                         with 0x78 instead of "{"); header["blobs"] = {name: [offset, length, crc32]}
    12+H       4 bytes   crc32 of the header bytes
    16+H       ...       the blobs, back to back; offsets are relative to this point

The file must end exactly after the last blob, so truncation and trailing garbage are both detected.
No pickle: reading never executes code.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from .._validation import atomic_write

__all__ = ["MAGIC", "MAX_HEADER_BYTES", "NszError", "write_container", "read_container"]

MAGIC = b"\x89NSZ\r\n\x1a\n"
MAX_HEADER_BYTES = 1 << 20    # a larger decompressed header is refused (1 MiB holds about 3,000 tensor records)


class NszError(ValueError):
    """A ``.nsz`` file is missing, truncated, corrupt or of an unsupported version."""


def write_container(path: str | os.PathLike[str], header: dict[str, Any], blobs: dict[str, bytes],
                    compress_header: bool = True) -> int:
    """Write ``header`` and ``blobs`` atomically (temp file + rename). Returns the file size in bytes."""
    table, offset = {}, 0
    for name, data in blobs.items():
        table[name] = [offset, len(data), zlib.crc32(data)]
        offset += len(data)
    head = json.dumps({**header, "blobs": table}, separators=(",", ":"), sort_keys=True).encode()
    if compress_header:
        head = zlib.compress(head, 9)
    with atomic_write(path) as f:
        f.write(MAGIC + struct.pack("<I", len(head)) + head + struct.pack("<I", zlib.crc32(head)))
        for data in blobs.values():
            f.write(data)
    return os.path.getsize(path)


def _inflate(head: bytes, cap: int) -> bytes | None:
    """zlib-decompress at most ``cap`` bytes; None when the header is larger (a small file must not expand
    without bound: a 200 MB header compresses into 200 KB)."""
    d = zlib.decompressobj()
    out = d.decompress(head, cap)
    if d.unconsumed_tail or (not d.eof and len(out) == cap):
        return None
    if not d.eof:
        raise zlib.error("truncated header stream")
    return out


def read_container(path: str | os.PathLike[str], *,
                   max_header_bytes: int = MAX_HEADER_BYTES) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Read and verify a container; returns ``(header, blobs)``. A header larger than ``max_header_bytes`` once
    decompressed is refused.

    Raises:
        NszError: naming what is wrong (missing file, bad magic, truncated header or blob, crc mismatch).
    """
    p = Path(path)
    if not p.is_file():
        raise NszError(f"{p}: no such file.")
    raw = p.read_bytes()
    if raw[:8] != MAGIC:
        raise NszError(f"{p}: not a .nsz file (bad magic bytes {raw[:8]!r}).")
    if len(raw) < 12:
        raise NszError(f"{p}: truncated inside the header length.")
    (hlen,) = struct.unpack("<I", raw[8:12])
    body = 16 + hlen
    if len(raw) < body:
        raise NszError(f"{p}: truncated: header needs {body} bytes, file has {len(raw)}.")
    head = raw[12:12 + hlen]
    (crc,) = struct.unpack("<I", raw[12 + hlen:body])
    if zlib.crc32(head) != crc:
        raise NszError(f"{p}: header checksum mismatch (the file is corrupt).")
    try:
        text = head if head[:1] == b"{" else _inflate(head, max_header_bytes)
        if text is None or len(text) > max_header_bytes:
            raise NszError(f"{p}: the header is larger than {max_header_bytes:,} bytes once decompressed "
                           "(pass max_header_bytes to read a file you trust).")
        header = json.loads(text)
    except (ValueError, zlib.error, RecursionError) as e:
        if isinstance(e, NszError):
            raise
        raise NszError(f"{p}: header is not valid JSON ({type(e).__name__}: {str(e)[:100]}).") from e
    if not isinstance(header, dict):
        raise NszError(f"{p}: the header is not a mapping.")
    table = header.get("blobs")
    if not isinstance(table, dict):
        raise NszError(f"{p}: header has no blob table.")
    blobs, end = {}, 0
    for name, entry in table.items():
        if not (isinstance(entry, list) and len(entry) == 3 and all(type(v) is int for v in entry)):
            raise NszError(f"{p}: blob {name!r} has a malformed table entry {entry!r}.")
        off, length, bcrc = entry
        if off < 0 or length < 0 or body + off + length > len(raw):
            raise NszError(f"{p}: truncated: blob {name!r} needs bytes up to {body + off + length}, "
                           f"file has {len(raw)}.")
        data = raw[body + off: body + off + length]
        if zlib.crc32(data) != bcrc:
            raise NszError(f"{p}: blob {name!r} checksum mismatch (the file is corrupt).")
        blobs[name] = data
        end = max(end, off + length)
    if body + end != len(raw):
        raise NszError(f"{p}: {len(raw) - body - end} unexpected trailing bytes after the last blob.")
    return header, blobs
