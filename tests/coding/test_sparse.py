import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from netsurgeon.coding.sparse import best_index_bits, decode_relative, encode_relative, relative_entries


def test_han_figure2_style_example_with_a_filler():
    # nonzeros at 1, 4 and 15; with 3-bit gaps a step may be at most 8, so 4 -> 15 (step 11) needs a filler
    flat = np.zeros(16, dtype=np.float32)
    flat[[1, 4, 15]] = [3.4, 0.9, 1.7]
    gaps, vals = encode_relative(flat, 3)
    assert gaps.tolist() == [1, 2, 7, 2]          # steps 2, 3, 8 (filler at 12), 3
    assert vals.tolist() == pytest.approx([3.4, 0.9, 0.0, 1.7])
    assert relative_entries(np.flatnonzero(flat), 3) == 4
    assert np.array_equal(decode_relative(gaps, vals, 16), flat)


@given(st.lists(st.sampled_from([0.0, 0.0, 0.0, 1.5, -2.25]), max_size=300), st.integers(1, 8))
def test_roundtrip(values, bits):
    flat = np.array(values, dtype=np.float32)
    gaps, vals = encode_relative(flat, bits)
    assert gaps.size == relative_entries(np.flatnonzero(flat), bits)
    assert (gaps < (1 << bits)).all()
    assert np.array_equal(decode_relative(gaps, vals, flat.size), flat)


def test_decode_rejects_out_of_range_and_mismatch():
    with pytest.raises(ValueError, match="outside a tensor of 4 entries"):
        decode_relative(np.array([5], dtype=np.uint32), np.array([1.0]), 4)
    with pytest.raises(ValueError, match="2 gaps but 1 values"):
        decode_relative(np.array([0, 0], dtype=np.uint32), np.array([1.0]), 4)


def test_best_index_bits_prefers_wide_gaps_for_very_sparse_data():
    flat = np.zeros(10_000, dtype=np.float32)
    flat[::1000] = 1.0
    bits, total = best_index_bits(flat, 32)
    assert bits == 10 and total == 10 * (10 + 32)
    dense_ish = np.ones(100, dtype=np.float32)
    assert best_index_bits(dense_ish, 32)[0] == 1
