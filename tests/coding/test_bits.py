import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from netsurgeon.coding.bits import pack_bits, packed_size, unpack_bits


def test_pack_bits_exact_bytes():
    # 3-bit values 5 (101), 3 (011), 7 (111) little-endian: bits 1,0,1, 1,1,0, 1,1,1 -> 0b11011101, 0b1
    assert pack_bits(np.array([5, 3, 7]), 3) == bytes([0b11011101, 0b00000001])
    assert packed_size(3, 3) == 2


@given(st.integers(1, 20).flatmap(lambda b: st.tuples(
    st.just(b), st.lists(st.integers(0, (1 << b) - 1), max_size=200))))
def test_roundtrip(args):
    bits, vals = args
    data = pack_bits(np.array(vals, dtype=np.uint64), bits)
    assert len(data) == packed_size(len(vals), bits)
    assert unpack_bits(data, len(vals), bits).tolist() == vals


def test_errors():
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_bits(np.array([8]), 3)
    with pytest.raises(ValueError, match="need 2 bytes; got 1"):
        unpack_bits(b"\x00", 3, 4)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 32\]"):
        pack_bits(np.array([1]), 0)
