"""The runtime: a compressed model turned into its fastest runnable form, chosen by measuring.

``compile_runtime(model, batch)`` (compile.py) times, for each run of Linear layers, the candidate modules the
storage forms offer (``forms/``: fused sparse or codebook kernels, CSR, int8, bit-packed binary) against the dense
run and keeps the fastest, and for a network with convolutions folds BatchNorm and picks the memory order, batch
slicing and sample packing that measured fastest (docs/runtime.md). ``modelfile.load_compressed(path,
runtime=True, batch=B)`` loads a file straight into this form; ``latency.latency_report`` (``netsurgeon/latency.py``)
is what ``netsurgeon bench-latency`` prints.
"""

from __future__ import annotations

from ..kernels.modules import (
           BatchChunks,
           ChannelsLast,
           ColumnConv2d,
           CSRLinear,
           FusedLinearChain,
           Int8Chain,
           resident_bytes,
)
from .compile import compile_runtime
from .plan import RunChoice, RuntimePlan
from .weights import linear_form

__all__ = ["compile_runtime", "RuntimePlan", "RunChoice", "CSRLinear", "FusedLinearChain", "Int8Chain", "ColumnConv2d",
           "ChannelsLast", "BatchChunks", "resident_bytes", "linear_form"]
