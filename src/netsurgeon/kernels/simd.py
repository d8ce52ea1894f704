"""Sixteen-lane float32 vectors for numba kernels (AVX-512): the few operations the compressed-layer kernels
(sparse_linear.py, quant_linear.py, sparse_conv.py) need, each a numba ``@intrinsic`` that emits one LLVM
instruction or target intrinsic, so a kernel says exactly which instruction runs where LLVM's vectorizer would
not find it.

Why: numba's auto-vectorizer handles contiguous loops, but the loops that make compressed weights fast are not
contiguous. Measured on this machine (AMD EPYC, Zen 4, 1 thread; a 768 -> 3072 layer at 90% sparsity, batch 1):
a CSR dot product per row 345 us (LLVM vectorizes it with 8-wide gathers, then a scalar remainder per row); a
sliced-ELL layout (16 rows per chunk, one nonzero of each per slot, Kreutzer et al. 2014) with LLVM left to
vectorize it 151 us; the same with an explicit 16-wide ``vgatherdps`` per slot 81 us (Zen 4 gathers about one
element per cycle); reading x from registers by ``vpermi2ps`` instead of gathering it (a window of 64 inputs
held in four registers, sparse_linear.py) 26-29 us. ``vexpandps`` (loading a slot's values compressed by a
mask) cost 2x that slot's time, so padded slots are kept.

Types: ``f32x16`` (``<16 x float>``) and ``i32x16`` (``<16 x i32>``) live in registers between calls (numba's
variables of these types become SSA values). ``available()`` says whether numba is importable and the host
has AVX-512F (numba compiles for the host CPU); callers keep a portable path otherwise.
"""

from __future__ import annotations

import functools

try:
    import numba
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic, models, register_model

    _HAVE_NUMBA = True
except ImportError:  # pragma: no cover - installs without numba keep the portable paths
    _HAVE_NUMBA = False

__all__ = ["available"]


@functools.cache
def available() -> bool:
    """numba is importable, compiles for the host CPU, and that CPU has AVX-512F (the permutes and 16-wide
    vectors below)."""
    if not _HAVE_NUMBA:
        return False
    try:
        from llvmlite import binding

        if numba.config.CPU_NAME not in (None, "host"):
            return False  # a generic/cross target: the x86 intrinsics may not be selectable there
        return bool(binding.get_host_cpu_features().get("avx512f", False))
    except Exception:  # pragma: no cover - an llvmlite without the query
        return False


if _HAVE_NUMBA:
    _F = ir.FloatType()
    _I32 = ir.IntType(32)
    _VF = ir.VectorType(_F, 16)
    _VI = ir.VectorType(_I32, 16)
    _MASK = ir.VectorType(ir.IntType(1), 16)

    class _F32x16(types.Type):
        def __init__(self) -> None:
            super().__init__(name="netsurgeon.f32x16")

    class _I32x16(types.Type):
        def __init__(self) -> None:
            super().__init__(name="netsurgeon.i32x16")

    f32x16 = _F32x16()
    i32x16 = _I32x16()

    @register_model(_F32x16)
    class _F32x16Model(models.PrimitiveModel):
        def __init__(self, dmm, fe_type) -> None:
            super().__init__(dmm, fe_type, _VF)

    @register_model(_I32x16)
    class _I32x16Model(models.PrimitiveModel):
        def __init__(self, dmm, fe_type) -> None:
            super().__init__(dmm, fe_type, _VI)

    def _elem_ptr(context, builder, arrty, arr, index):
        """Address of ``arr.flat[index]`` (C-contiguous arrays only; the kernels' arrays are)."""
        data = context.make_array(arrty)(context, builder, arr).data
        return builder.gep(data, [index])

    def _fn(builder, name: str, ret, args):
        return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)

    def _splat(builder, value, vty):
        v = builder.insert_element(ir.Constant(vty, ir.Undefined), value, ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), ir.Constant(_VI, [0] * 16))

    def _is_array(t, bits: int | None = None) -> bool:
        return isinstance(t, types.Array) and t.layout == "C" and (bits is None or t.dtype.bitwidth == bits)

    # ---- float vectors -------------------------------------------------------------------------------------

    @intrinsic
    def vzero(typingctx):
        """All lanes 0.0."""
        def codegen(context, builder, sig, args):
            return ir.Constant(_VF, [0.0] * 16)
        return f32x16(), codegen

    @intrinsic
    def vsplat(typingctx, value):
        """``value`` (a float) in every lane."""
        if not isinstance(value, types.Float):
            return None

        def codegen(context, builder, sig, args):
            v = context.cast(builder, args[0], sig.args[0], types.float32)
            return _splat(builder, v, _VF)
        return f32x16(value), codegen

    @intrinsic
    def viota(typingctx):
        """Lane i holds float(i)."""
        def codegen(context, builder, sig, args):
            return ir.Constant(_VF, [float(i) for i in range(16)])
        return f32x16(), codegen

    @intrinsic
    def vload(typingctx, arr, index):
        """``arr.flat[index:index + 16]`` of a float32 array (unaligned load)."""
        if not (_is_array(arr) and arr.dtype == types.float32):
            return None

        def codegen(context, builder, sig, args):
            p = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
            return builder.load(builder.bitcast(p, _VF.as_pointer()), align=4)
        return f32x16(arr, index), codegen

    @intrinsic
    def vstore(typingctx, arr, index, v):
        """``arr.flat[index:index + 16] = v`` for a float32 array."""
        if not (_is_array(arr) and arr.dtype == types.float32 and v == f32x16):
            return None

        def codegen(context, builder, sig, args):
            p = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
            builder.store(args[2], builder.bitcast(p, _VF.as_pointer()), align=4)
            return context.get_dummy_value()
        return types.none(arr, index, v), codegen

    @intrinsic
    def vlane(typingctx, v, lane):
        """Lane ``lane`` of ``v`` as a float32."""
        if v != f32x16:
            return None

        def codegen(context, builder, sig, args):
            return builder.extract_element(args[0], builder.trunc(args[1], _I32))
        return types.float32(v, lane), codegen

    def _binary(op):
        @intrinsic
        def fn(typingctx, a, b):
            if a != f32x16 or b != f32x16:
                return None

            def codegen(context, builder, sig, args):
                if op == "max":
                    return builder.call(_fn(builder, "llvm.maxnum.v16f32", _VF, [_VF, _VF]), args)
                return getattr(builder, op)(*args)
            return f32x16(a, b), codegen
        return fn

    vadd = _binary("fadd")
    vsub = _binary("fsub")
    vmul = _binary("fmul")
    vmax = _binary("max")

    @intrinsic
    def vfma(typingctx, a, b, c):
        """``a * b + c`` lane by lane, one rounding (``vfmadd``)."""
        if not (a == b == c == f32x16):
            return None

        def codegen(context, builder, sig, args):
            return builder.call(_fn(builder, "llvm.fma.v16f32", _VF, [_VF, _VF, _VF]), args)
        return f32x16(a, b, c), codegen

    # ---- integer vectors and selection ---------------------------------------------------------------------

    @intrinsic
    def iload(typingctx, arr, index):
        """``arr.flat[index:index + 16]`` of a uint8 / uint16 / int32 array, zero-extended to 32-bit lanes
        (``vpmovzxbd`` / ``vpmovzxwd`` straight from memory)."""
        if not (_is_array(arr) and isinstance(arr.dtype, types.Integer) and arr.dtype.bitwidth in (8, 16, 32)):
            return None

        def codegen(context, builder, sig, args):
            bits = sig.args[0].dtype.bitwidth
            vt = ir.VectorType(ir.IntType(bits), 16)
            p = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
            v = builder.load(builder.bitcast(p, vt.as_pointer()), align=1)
            return builder.zext(v, _VI) if bits < 32 else v
        return i32x16(arr, index), codegen

    @intrinsic
    def isplat(typingctx, value):
        """``value`` (an integer) in every 32-bit lane."""
        if not isinstance(value, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            v = context.cast(builder, args[0], sig.args[0], types.int32)
            return _splat(builder, v, _VI)
        return i32x16(value), codegen

    def _ibinary(op):
        @intrinsic
        def fn(typingctx, a, b):
            if a != i32x16 or b != i32x16:
                return None

            def codegen(context, builder, sig, args):
                return getattr(builder, op)(*args)
            return i32x16(a, b), codegen
        return fn

    iadd = _ibinary("add")
    iand = _ibinary("and_")
    ior = _ibinary("or_")
    imul = _ibinary("mul")

    @intrinsic
    def ishr(typingctx, a, bits):
        """Logical shift right of every lane by ``bits`` (an integer)."""
        if a != i32x16 or not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            b = context.cast(builder, args[1], sig.args[1], types.int32)
            return builder.lshr(args[0], _splat(builder, b, _VI))
        return i32x16(a, bits), codegen

    @intrinsic
    def icvt(typingctx, a):
        """Integer lanes to float32 (``vcvtdq2ps``)."""
        if a != i32x16:
            return None

        def codegen(context, builder, sig, args):
            return builder.sitofp(args[0], _VF)
        return f32x16(a), codegen

    @intrinsic
    def vlut(typingctx, table, idx):
        """``table[idx & 15]`` per lane (``vpermps``: one instruction; only the low 4 bits of each index are
        read, so a byte's low nibble needs no mask)."""
        if table != f32x16 or idx != i32x16:
            return None

        def codegen(context, builder, sig, args):
            fn = _fn(builder, "llvm.x86.avx512.permvar.sf.512", _VF, [_VF, _VI])
            return builder.call(fn, [args[0], args[1]])
        return f32x16(table, idx), codegen

    @intrinsic
    def vsel2(typingctx, a, b, idx):
        """Lane i gets element ``idx[i] & 31`` of the 32 floats ``a ++ b`` (``vpermi2ps``, one instruction)."""
        if not (a == b == f32x16 and idx == i32x16):
            return None

        def codegen(context, builder, sig, args):
            fn = _fn(builder, "llvm.x86.avx512.vpermi2var.ps.512", _VF, [_VF, _VI, _VF])
            return builder.call(fn, [args[0], args[2], args[1]])
        return f32x16(a, b, idx), codegen

    @intrinsic
    def vsel4(typingctx, a, b, c, d, idx):
        """Lane i gets element ``idx[i] & 63`` of the 64 floats ``a ++ b ++ c ++ d``: two ``vpermi2ps`` and a
        blend on bit 5 of the index."""
        if not (a == b == c == d == f32x16 and idx == i32x16):
            return None

        def codegen(context, builder, sig, args):
            a, b, c, d, ix = args
            fn = _fn(builder, "llvm.x86.avx512.vpermi2var.ps.512", _VF, [_VF, _VI, _VF])
            lo = builder.call(fn, [a, ix, b])
            hi = builder.call(fn, [c, ix, d])
            bit = builder.and_(ix, ir.Constant(_VI, [32] * 16))
            return builder.select(builder.icmp_unsigned("!=", bit, ir.Constant(_VI, [0] * 16)), hi, lo)
        return f32x16(a, b, c, d, idx), codegen

    @intrinsic
    def vgather(typingctx, x, base, cols, index):
        """``x.flat[base + cols.flat[index + i]]`` for the 16 lanes i (``vgatherdps``; ``cols`` uint16 or
        int32)."""
        if not (_is_array(x) and x.dtype == types.float32 and _is_array(cols)
                and isinstance(cols.dtype, types.Integer) and cols.dtype.bitwidth in (16, 32)):
            return None

        def codegen(context, builder, sig, args):
            bits = sig.args[2].dtype.bitwidth
            p = _elem_ptr(context, builder, sig.args[2], args[2], args[3])
            iv = builder.load(builder.bitcast(p, ir.VectorType(ir.IntType(bits), 16).as_pointer()), align=1)
            iv = builder.zext(iv, _VI) if bits < 32 else iv
            xbase = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
            fn = _fn(builder, "llvm.x86.avx512.mask.gather.dps.512", _VF, [_VF, xbase.type, _VI, _MASK, _I32])
            return builder.call(fn, [ir.Constant(_VF, [0.0] * 16), xbase, iv, ir.Constant(_MASK, [1] * 16),
                                     ir.Constant(_I32, 4)])
        return f32x16(x, base, cols, index), codegen

    @intrinsic
    def vstore_mask(typingctx, arr, index, v, mask):
        """``arr.flat[index + i] = v[i]`` for the lanes i whose bit is set in ``mask`` (an integer); the others are
        not touched (``vmovups`` with a mask: no fault even where ``index + i`` lies outside ``arr``)."""
        if not (_is_array(arr) and arr.dtype == types.float32 and v == f32x16 and isinstance(mask, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            p = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
            bits = builder.trunc(args[3], ir.IntType(16)) if sig.args[3].bitwidth > 16 else \
                builder.zext(args[3], ir.IntType(16)) if sig.args[3].bitwidth < 16 else args[3]
            m = builder.bitcast(bits, _MASK)
            fn = _fn(builder, "llvm.masked.store.v16f32.p0", ir.VoidType(), [_VF, p.type, _I32, _MASK])
            builder.call(fn, [args[2], p, ir.Constant(_I32, 4), m])
            return context.get_dummy_value()
        return types.none(arr, index, v, mask), codegen

    @intrinsic
    def iramp(typingctx, start, step):
        """Lane i holds ``start + i·step`` (both compile-time integer literals)."""
        if not (isinstance(start, types.IntegerLiteral) and isinstance(step, types.IntegerLiteral)):
            return None
        a, d = start.literal_value, step.literal_value

        def codegen(context, builder, sig, args):
            return ir.Constant(_VI, [a + i * d for i in range(16)])
        return i32x16(start, step), codegen
