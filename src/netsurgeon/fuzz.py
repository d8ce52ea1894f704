"""Fuzzing the ``.nsz`` reader with files an attacker can write: headers edited with the CRCs recomputed,
streams altered with their table and CRCs recomputed, and raw truncations and bit flips.

Shared by ``tests/coding/test_fuzz.py`` (hypothesis, seconds) and ``bench/fuzz_nsz.py`` (100,000+ inputs
under a memory limit). A reader passes when every input either loads (finite weights) or raises
:class:`~netsurgeon.coding.container.NszError`; anything else is a finding.
"""

from __future__ import annotations

import json
import os
import random
import struct
import zlib
from pathlib import Path
from typing import Any

from .coding.container import MAGIC, NszError

__all__ = ["NASTY", "RECORD_FIELDS", "build_corpus", "mutate", "check_file", "split_file"]

NASTY: list[Any] = [-1, 0, 1, 3, 7, 8, 16, 17, 32, 33, 255, 2**31, 10**10, 2**63, -2**63, 10**100, 1.5, -0.0,
                    float("nan"), float("inf"), "bogus", "", "float64", "int8", None, True, False, [], [0], [1],
                    [-1], [2, 3], [[1]], [20000, 15000], [1, 3000, 3000], [10**10], {}, {"a": 1},
                    "x" * 2000]
RECORD_FIELDS = ("name", "shape", "codec", "value_dtype", "index_bits", "numel", "nonzero", "entries", "bytes",
                 "code_bits", "huffman", "codebook_size", "bytes_fixed", "unknown_field")
ARCH_FIELDS = ("name", "input_shape", "num_classes", "kwargs", "factory")


def split_file(raw: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A valid file's header (without its blob table) and blobs, from its bytes."""
    (hlen,) = struct.unpack("<I", raw[8:12])
    head = raw[12:12 + hlen]
    header = json.loads(head if head[:1] == b"{" else zlib.decompress(head))
    body = 16 + hlen
    table = header.pop("blobs")
    return header, {k: raw[body + o: body + o + n] for k, (o, n, _) in table.items()}


def build_corpus(directory: str | os.PathLike[str]) -> list[Path]:
    """Valid files of every codec on three small models (dense, sparse float16, k-means + Huffman, int8, binary),
    then LeNet-300-100 in int4 groups (``grouped``) and 2:4 + int4 (``grouped_nm``)."""
    import torch

    from .models import build_model
    from .nsz import save_compressed
    from .pruning.magnitude import prune_magnitude
    from .quantization.binary import Binarize
    from .quantization.groupwise import quantize_model_rtn
    from .quantization.kmeans import share_weights
    from .quantization.uniform import quantize_model_int8

    out, d = [], Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for name, kwargs in (("lenet300", {}), ("digits_cnn", {}), ("resnet_small", {"width": 4, "blocks": [1, 1]})):
        for variant in ("dense", "sparse16", "shared", "int8", "binary"):
            torch.manual_seed(0)
            m = build_model(name, (1, 8, 8), **kwargs)
            if variant == "binary":  # XNOR-Net: 1-bit weights, per-filter scales, binary inputs in the arch record
                cb = Binarize("alpha", "scaled")
                cb.prepare(m)
                cb.finalize(m)
            elif variant != "dense":
                prune_magnitude(m, sparsity=0.9, scope="global")
            if variant == "shared":
                share_weights(m, bits={"conv": 5, "fc": 4})
            if variant == "int8":
                quantize_model_int8(m)
            path = d / f"{name}_{variant}.nsz"
            save_compressed(m, path, value_dtype="float16" if variant == "sparse16" else "float32")
            out.append(path)
    for pattern in (None, "2:4"):  # group-quantized int4, and 2:4 then int4 (the grouped_nm form); after the rest
        torch.manual_seed(0)
        m = build_model("lenet300", (1, 8, 8))
        if pattern:
            prune_magnitude(m, pattern=pattern)
        quantize_model_rtn(m, bits=4, group_size=16)
        path = d / f"lenet300_int4{'_24' if pattern else ''}.nsz"
        save_compressed(m, path)
        out.append(path)
    return out


def mutate(raw: bytes, rng: random.Random) -> bytes:
    """One crafted variant of a valid file: a header field, a record field, an architecture or meta field, the
    record list, a stream's bytes (CRCs recomputed for all of these), or a raw truncation or bit flip."""
    kind = rng.choice(("record", "record", "record", "top", "arch", "meta", "tensors", "blob", "blob", "raw"))
    if kind == "raw":
        b = bytearray(raw)
        if rng.random() < 0.5:
            return bytes(b[:rng.randrange(len(b))])
        i = rng.randrange(len(b))
        b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    header, blobs = split_file(raw)
    value = rng.choice(NASTY)
    records = header["tensors"]
    if kind == "record":
        r = rng.randrange(len(records))
        field = rng.choice(RECORD_FIELDS)
        if field != "unknown_field" and rng.random() < 0.4 and isinstance(records[r].get(field), int) \
                and not isinstance(records[r].get(field), bool):
            value = records[r][field] + rng.choice((-1, 1, 2, -2, 1000, 2**20))  # plausible lies
        records[r][field] = value
    elif kind == "top":
        header[rng.choice(("format", "version", "tensors", "arch", "meta"))] = value
    elif kind == "arch":
        arch = header.get("arch") or {}
        arch[rng.choice(ARCH_FIELDS)] = value
        header["arch"] = arch
    elif kind == "meta":
        header["meta"] = rng.choice(({"data": value}, {"pipeline": value}, {"pipeline": [value]}, value))
    elif kind == "tensors":
        i = rng.randrange(len(records))
        op = rng.choice(("drop", "dup", "swap"))
        if op == "drop":
            records.pop(i)
        elif op == "dup":
            records.append(dict(records[i]))
        else:
            j = rng.randrange(len(records))
            records[i]["name"], records[j]["name"] = records[j]["name"], records[i]["name"]
    else:  # a stream's bytes
        key = rng.choice(sorted(blobs))
        data = bytearray(blobs[key])
        op = rng.choice(("flip", "cut", "grow", "fill", "drop"))
        if op == "flip" and data:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == "cut":
            data = data[:rng.randrange(len(data) + 1)]
        elif op == "grow":
            data += bytes(rng.randrange(1, 64))
        elif op == "fill" and data:
            data = bytearray([rng.choice((0, 255))] * len(data))
        if op == "drop":
            blobs.pop(key)
        else:
            blobs[key] = bytes(data)
    return _pack(header, blobs)


def _pack(header: dict[str, Any], blobs: dict[str, bytes]) -> bytes:
    table, offset = {}, 0
    for name, data in blobs.items():
        table[name] = [offset, len(data), zlib.crc32(data)]
        offset += len(data)
    head = zlib.compress(json.dumps({**header, "blobs": table}, separators=(",", ":")).encode(), 6)
    return MAGIC + struct.pack("<I", len(head)) + head + struct.pack("<I", zlib.crc32(head)) + b"".join(blobs.values())


def check_file(path: str | os.PathLike[str]) -> str:
    """Read ``path`` the ways a user does (header only, decode, load as a module); return ``"ok"`` or
    ``"NszError"``, or the name of any other exception type (a finding)."""
    import torch

    from .modelfile import load_compressed
    from .nsz import read_header

    try:
        read_header(path)
        model = load_compressed(path, keep_codecs=True)
        for t in model.state_dict().values():
            if t.is_floating_point() and not torch.isfinite(t).all():
                return "non-finite weights"
        return "ok"
    except NszError:
        return "NszError"
    except Exception as e:  # noqa: BLE001  anything else is what the fuzzer looks for
        return type(e).__name__

