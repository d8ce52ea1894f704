"""Crafted .nsz files (CRCs recomputed, so only the schema stands in the way): every input loads with finite
weights or raises NszError, and none allocates what its header claims before the claim is checked."""

import json
import random
import resource
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from netsurgeon.cli import cli
from netsurgeon.coding.container import NszError
from netsurgeon.fuzz import _pack, build_corpus, check_file, mutate, split_file
from netsurgeon.modelfile import load_compressed
from netsurgeon.nsz import read_header


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return [p.read_bytes() for p in build_corpus(tmp_path_factory.mktemp("corpus"))]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 11), seed=st.integers(0, 2**32 - 1))
def test_every_crafted_file_loads_or_is_a_clean_nsz_error(corpus, tmp_path, which, seed):
    data = mutate(corpus[which], random.Random(seed))
    path = tmp_path / "x.nsz"
    path.write_bytes(data)
    assert check_file(path) in ("ok", "NszError")


def _crafted(corpus, tmp_path, edit, which=0):
    header, blobs = split_file(corpus[which])
    edit(header, blobs)
    path = tmp_path / "crafted.nsz"
    path.write_bytes(_pack(header, blobs))
    return path


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("edit,msg", [
    # an 11 KB sparse file declaring shape [20000, 15000]: refused before the 1.2 GB allocation
    (lambda h, b: h["tensors"][0].update(shape=[20000, 15000], numel=300_000_000), "declares 300,"),
    # an architecture record whose input would build a 1.4 GB fc layer
    (lambda h, b: h["arch"].update(input_shape=[1, 3000, 3000]), "do not match its recorded architecture"),
    (lambda h, b: h["tensors"][1].update(code_bits=10**10), "must be an integer in"),
    (lambda h, b: h["tensors"][0].update(shape=[2.5, 4]), "field 'shape' must be an integer"),
    (lambda h, b: h["arch"].update(num_classes=-1), "field 'num_classes' must be an integer in [1,"),
    (lambda h, b: h["tensors"][1].update(value_dtype="bogus"), "field 'value_dtype' of a"),
    (lambda h, b: h["tensors"][0].update(numel=5), "field 'numel' is 5 but shape"),
    (lambda h, b: h["tensors"].append(dict(h["tensors"][0])), "appear more than once"),
    (lambda h, b: b.update({"stray/blob": b"x"}), "belong to no tensor record"),
])
def test_known_attacks_are_refused_before_allocating(corpus, tmp_path, edit, msg):
    path = _crafted(corpus, tmp_path, edit)
    before = _peak_mb()
    with pytest.raises(NszError, match=msg.replace("[", r"\[").replace("(", r"\(")):
        load_compressed(path)
    assert _peak_mb() - before < 100


def test_int8_scale_count_must_match_the_channels(corpus, tmp_path):
    def edit(h, b):
        rec = next(r for r in h["tensors"] if r["codec"] == "int8")
        rec["codebook_size"] = 7
        b[rec["name"] + "/scale"] = bytes(28)
    with pytest.raises(NszError, match="needs 1 or 300 scales"):
        load_compressed(_crafted(corpus, tmp_path, edit, which=3))


def test_huffman_stream_with_fewer_declared_entries_is_refused(corpus, tmp_path):
    def edit(h, b):
        rec = next(r for r in h["tensors"] if r["codec"] == "shared" and r["huffman"])
        rec["entries"] -= 40  # the stream still holds all of them: nonzeros would silently vanish
    with pytest.raises(NszError, match="bits after its"):
        load_compressed(_crafted(corpus, tmp_path, edit, which=2))


@pytest.mark.slow  # seconds (a subprocess, a large model or tensor): run by .ci/run
def test_a_header_bomb_is_refused(corpus, tmp_path):
    header, blobs = split_file(corpus[0])
    header["meta"] = {"pad": "x" * (200 << 20)}  # 200 MB of JSON compresses to about 200 KB
    table, off = {}, 0
    for k, v in blobs.items():
        table[k] = [off, len(v), zlib.crc32(v)]
        off += len(v)
    head = zlib.compress(json.dumps({**header, "blobs": table}).encode(), 9)
    assert len(head) < 300_000
    import struct

    from netsurgeon.coding.container import MAGIC
    path = tmp_path / "bomb.nsz"
    path.write_bytes(MAGIC + struct.pack("<I", len(head)) + head + struct.pack("<I", zlib.crc32(head))
                     + b"".join(blobs.values()))
    before = _peak_mb()
    with pytest.raises(NszError, match="larger than 1,048,576 bytes once decompressed"):
        read_header(path)
    assert _peak_mb() - before < 5


def test_the_cli_shows_crafted_files_as_one_line_errors(corpus, tmp_path, runner):
    path = _crafted(corpus, tmp_path, lambda h, b: h["tensors"][0].update(numel=-3))
    for cmd in (["info", str(path)], ["eval", str(path)]):
        r = runner.invoke(cli, cmd)
        assert r.exit_code == 2 and r.output.startswith("Error: ") and "field 'numel'" in r.output
        assert "Traceback" not in r.output


def test_a_stale_temporary_file_of_a_killed_writer_is_ignored(corpus, tmp_path):
    target = tmp_path / "m.nsz"
    target.write_bytes(corpus[0])
    (tmp_path / ".m.nsz.abc123.tmp").write_bytes(corpus[0][:100])   # what a killed writer leaves
    assert check_file(target) == "ok"
    from netsurgeon.coding.container import write_container
    header, blobs = split_file(corpus[1])
    write_container(target, header, blobs)                           # writing beside it works too
    assert check_file(target) == "ok"
