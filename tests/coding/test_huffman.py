import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsurgeon.coding.huffman import (
    canonical_codes,
    encoded_bits,
    huffman_code_lengths,
    huffman_decode,
    huffman_encode,
)


def test_code_lengths_of_a_textbook_example():
    # frequencies 45, 13, 12, 16, 9, 5 (CLRS): optimal lengths 1, 3, 3, 3, 4, 4
    assert huffman_code_lengths(np.array([45, 13, 12, 16, 9, 5])).tolist() == [1, 3, 3, 3, 4, 4]
    assert huffman_code_lengths(np.array([0, 7, 0])).tolist() == [0, 1, 0]


def test_canonical_codes_are_prefix_free_and_consecutive():
    codes = canonical_codes(np.array([1, 3, 3, 3, 4, 4]))
    assert [codes[s].to01() for s in range(6)] == ["0", "100", "101", "110", "1110", "1111"]


@settings(max_examples=60)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=400))
def test_roundtrip_and_size(symbols):
    sym = np.array(symbols)
    lengths = huffman_code_lengths(np.bincount(sym, minlength=10))
    data = huffman_encode(sym, lengths)
    assert len(data) == (encoded_bits(sym, lengths) + 7) // 8
    assert huffman_decode(data, lengths, len(sym)).tolist() == symbols


def test_skewed_data_codes_below_fixed_width():
    rng = np.random.default_rng(0)
    sym = rng.choice(32, size=5000, p=np.r_[0.5, np.full(31, 0.5 / 31)])
    lengths = huffman_code_lengths(np.bincount(sym, minlength=32))
    assert encoded_bits(sym, lengths) < 0.75 * 5 * sym.size


def test_truncated_stream_is_refused():
    sym = np.arange(10) % 4
    lengths = huffman_code_lengths(np.bincount(sym))
    data = huffman_encode(sym, lengths)
    with pytest.raises(ValueError, match="stream ended|corrupt"):
        huffman_decode(data[:1], lengths, 10)
