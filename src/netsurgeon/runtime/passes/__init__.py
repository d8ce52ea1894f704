"""The passes of :func:`~netsurgeon.runtime.compile.compile_runtime`, one module each, in the order it runs
them: ``binary`` (xnor chains and layers), ``fold`` (BatchNorm), ``layout`` (memory order, later batch slices),
``columns`` and ``pool`` (per-layer swaps), ``linear`` (runs of Linear layers: fused/csr/int8/lut/dense),
``pack`` (samples packed into channels) and ``calls`` (direct calls, in-place sums). ``timing`` and ``graph``
hold what they share: timing candidates against each other, and torch.fx surgery."""
