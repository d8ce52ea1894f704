import os
import struct

import pytest
import torch
from torch import nn

import netsurgeon as ns
from netsurgeon.coding import NszError
from netsurgeon.coding.container import MAGIC, read_container, write_container
from netsurgeon.nsz import read_compressed, save_compressed
from netsurgeon.pruning.magnitude import prune_magnitude


@pytest.fixture
def pruned(tmp_path):
    torch.manual_seed(0)
    m = ns.build_model("lenet300")
    prune_magnitude(m, sparsity=0.9)
    return m


def test_roundtrip_is_exact_and_file_is_smaller(pruned, tmp_path):
    f = save_compressed(pruned, tmp_path / "m.nsz", index_bits=5)
    assert f.file_bytes == os.path.getsize(tmp_path / "m.nsz")
    assert f.dense_bytes == 266_610 * 4
    # 90% of weights gone: values (4 B) + 5-bit gaps + fillers for ~24k nonzeros, dense biases
    assert 8.0 < f.compression < 10.0
    loaded = ns.load_compressed(tmp_path / "m.nsz")
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(loaded(x), pruned(x))
    assert ns.stats.count_nonzero(loaded) == ns.stats.count_nonzero(pruned)
    recs = {r.name: r for r in f.records}
    assert recs["fc1.weight"].codec == "sparse" and recs["fc1.weight"].index_bits == 5
    assert recs["fc1.bias"].codec == "dense"
    assert recs["fc1.weight"].nonzero == 23_520


def test_float16_values_and_auto_bits_are_smaller(pruned, tmp_path):
    a = save_compressed(pruned, tmp_path / "a.nsz")
    b = save_compressed(pruned, tmp_path / "b.nsz", value_dtype="float16")
    assert b.file_bytes < 0.6 * a.file_bytes
    for bits in (3, 5, 8):
        assert a.file_bytes <= save_compressed(pruned, tmp_path / "c.nsz", index_bits=bits).file_bytes
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(ns.load_compressed(tmp_path / "b.nsz")(x), pruned(x), atol=5e-3, rtol=5e-3)


def test_dense_model_is_stored_dense_with_small_overhead(tmp_path):
    m = ns.build_model("lenet5")
    f = save_compressed(m, tmp_path / "d.nsz")
    assert all(r.codec == "dense" for r in f.records)
    assert f.dense_bytes < f.file_bytes < f.dense_bytes + 2_000


def test_file_holds_no_pickle(pruned, tmp_path):
    save_compressed(pruned, tmp_path / "m.nsz")
    raw = (tmp_path / "m.nsz").read_bytes()
    assert raw.startswith(MAGIC) and b"\x80\x04" not in raw[:64]


@pytest.mark.parametrize("cut", [4, 11, 30, 200, -1, -1000])
def test_truncated_file_is_refused(pruned, tmp_path, cut):
    p = tmp_path / "m.nsz"
    save_compressed(pruned, p)
    raw = p.read_bytes()
    p.write_bytes(raw[:cut])
    with pytest.raises(NszError, match="truncated|bad magic|checksum"):
        read_compressed(p)


def test_corrupt_bytes_are_detected(pruned, tmp_path):
    p = tmp_path / "m.nsz"
    save_compressed(pruned, p)
    raw = bytearray(p.read_bytes())
    raw[-500] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(NszError, match="blob '.*' checksum mismatch"):
        read_compressed(p)
    raw = bytearray((tmp_path / "m.nsz").read_bytes())
    raw[20] ^= 0x01
    p.write_bytes(bytes(raw))
    with pytest.raises(NszError, match="header checksum mismatch"):
        read_compressed(p)
    p.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(NszError, match="not a .nsz file"):
        read_compressed(p)
    with pytest.raises(NszError, match="no such file"):
        read_compressed(tmp_path / "absent.nsz")


def test_trailing_bytes_and_future_version(tmp_path):
    p = tmp_path / "x.nsz"
    write_container(p, {"format": "netsurgeon.nsz", "version": 99, "tensors": []}, {"a": b"abc"})
    assert read_container(p)[1] == {"a": b"abc"}
    with pytest.raises(NszError, match="format version 99 is not supported"):
        read_compressed(p)
    p.write_bytes(p.read_bytes() + b"junk")
    with pytest.raises(NszError, match="4 unexpected trailing bytes"):
        read_container(p)


def test_lying_header_is_refused(tmp_path):
    import json
    import zlib

    p = tmp_path / "x.nsz"
    head = json.dumps({"format": "netsurgeon.nsz", "version": 1, "blobs": {"w/values": [0, 8, zlib.crc32(b"\0" * 8)]},
                       "tensors": [{"name": "w", "shape": [3], "codec": "dense", "value_dtype": "float32",
                                    "index_bits": 0, "numel": 3, "nonzero": 0, "entries": 3, "bytes": 8}]}).encode()
    p.write_bytes(MAGIC + struct.pack("<I", len(head)) + head + struct.pack("<I", zlib.crc32(head)) + b"\0" * 8)
    with pytest.raises(NszError, match="values stream is 8 bytes; the record needs 12 bytes"):
        read_compressed(p)


def test_shape_mismatch_between_file_and_model(pruned, tmp_path):
    save_compressed(pruned, tmp_path / "m.nsz")
    other = ns.build_model("lenet300", (1, 8, 8))
    with pytest.raises(NszError, match=r"'fc1.weight' has shape \[300, 784\] in the file but \[300, 64\]"):
        ns.load_compressed(tmp_path / "m.nsz", model=other)
    with pytest.raises(NszError, match="missing .*unexpected"):
        ns.load_compressed(tmp_path / "m.nsz", model=ns.build_model("mlpnet"))


def test_nan_weights_refused_and_old_file_survives(pruned, tmp_path):
    p = tmp_path / "m.nsz"
    save_compressed(pruned, p)
    before = p.read_bytes()
    with torch.no_grad():
        pruned.fc2.bias[0] = float("nan")
    with pytest.raises(ValueError, match="'fc2.bias' holds 1 NaN/inf"):
        save_compressed(pruned, p)
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["m.nsz"]  # no temp file left


def test_float16_overflow_refused(tmp_path):
    m = nn.Sequential(nn.Linear(2, 2))
    with torch.no_grad():
        m[0].weight[0, 0] = 1e6
    with pytest.raises(ValueError, match="does not fit in float16"):
        save_compressed(m, tmp_path / "o.nsz", value_dtype="float16")
    assert not (tmp_path / "o.nsz").exists()


def test_unknown_architecture_needs_a_model(tmp_path):
    m = nn.Sequential(nn.Linear(3, 2))
    save_compressed(m, tmp_path / "u.nsz")
    with pytest.raises(NszError, match="records no architecture"):
        ns.load_compressed(tmp_path / "u.nsz")
    got = ns.load_compressed(tmp_path / "u.nsz", model=nn.Sequential(nn.Linear(3, 2)))
    assert torch.equal(got[0].weight, m[0].weight)


def test_bad_arguments(pruned, tmp_path):
    with pytest.raises(ValueError, match="value_dtype must be one of"):
        save_compressed(pruned, tmp_path / "m.nsz", value_dtype="int4")
    with pytest.raises(ValueError, match=r"index_bits must be 'auto', an int in \[1, 16\], or a mapping"):
        save_compressed(pruned, tmp_path / "m.nsz", index_bits=0)


def test_shared_weights_roundtrip_with_and_without_huffman(pruned, tmp_path):
    from netsurgeon.quantization.kmeans import share_weights

    share_weights(pruned, bits={"fc": 5})
    x = torch.randn(4, 1, 28, 28)
    sizes = {}
    for huff in (True, False):
        f = save_compressed(pruned, tmp_path / f"s{huff}.nsz", huffman=huff)
        rec = {r.name: r for r in f.records}["fc1.weight"]
        assert rec.codec == "shared" and rec.code_bits == 5 and rec.codebook_size == 31 and rec.huffman == huff
        loaded = ns.load_compressed(tmp_path / f"s{huff}.nsz")
        assert torch.equal(loaded(x), pruned(x))
        sizes[huff] = f.file_bytes
        if huff:
            assert rec.bytes < rec.bytes_fixed
    assert sizes[True] < sizes[False]
    # 23,520 fc1 weights at 5-bit codes + gaps: far below the float32 sparse stream (~9x before sharing)
    assert save_compressed(pruned, tmp_path / "c.nsz").compression > 25


def test_corrupt_shared_stream_is_refused(pruned, tmp_path):
    from netsurgeon.coding.container import read_container, write_container
    from netsurgeon.quantization.kmeans import share_weights

    share_weights(pruned, bits={"fc": 5})
    p = tmp_path / "s.nsz"
    save_compressed(pruned, p)
    header, blobs = read_container(p)
    blobs["fc1.weight/codes"] = blobs["fc1.weight/codes"][:10]
    write_container(p, header | {}, blobs)
    with pytest.raises(NszError, match="fc1.weight.*(stream ended|corrupt|more than the 80 bits)"):
        read_compressed(p)


def test_version_1_files_still_load(pruned, tmp_path):
    from netsurgeon.coding.container import read_container, write_container

    p = tmp_path / "v.nsz"
    save_compressed(pruned, p)
    header, blobs = read_container(p)
    header = {k: v for k, v in header.items() if k != "blobs"} | {"version": 1}
    header["tensors"] = [{k: v for k, v in t.items() if k not in ("code_bits", "huffman", "codebook_size",
                                                                  "bytes_fixed")} for t in header["tensors"]]
    write_container(p, header, blobs, compress_header=False)
    assert (p.read_bytes()[12:13]) == b"{"
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(ns.load_compressed(p)(x), pruned(x))
