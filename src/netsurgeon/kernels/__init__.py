"""Kernels: the compiled code and the ``nn.Module``\\ s that run compressed weights, below the storage forms that
offer them (``forms/``) and the runtime that times them (``runtime/``).

- ``fused.py``: one numba call for a whole run of sparse (or k-means-coded) Linear layers, int8 rows;
- ``bitops.py``: bit-packed signs, XNOR + popcount and sign tables for binary networks;
- ``hashed.py``: a HashedNets layer computed from its K real weights;
- ``modules.py``: the modules the runtime swaps in (CSR, fused chains, int8 chains, XNOR layers, im2col over kept
  columns, channels-last and batch-slicing wrappers).
"""
