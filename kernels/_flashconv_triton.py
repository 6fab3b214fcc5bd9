"""Triton FlashConv: fused causal long convolution with a block (Monarch) FFT on tensor cores.

One program computes one (batch, channel) row:

    w = u * v                    (optional pre-multiply, H3's K' * V)
    s = causal_conv(w, k) + D w  (FFT of size N = N1 * N2 >= 2L, done as a block FFT)
    y = q * s                    (optional post-multiply, H3's Q *)

with no intermediate written to memory: per row only u, v, q are read once and y written; the kernel spectrum (per channel) and the small DFT/twiddle matrices
(per call) are shared by the whole batch through L2.

Block FFT of size N = N1 * N2 (the Monarch decomposition). With n = N2 n1 + n2 and
k = k1 + N1 k2, W_M = exp(-2 pi i / M):

    X[k1 + N1 k2] = sum_n2 W_N2^(n2 k2) W_N^(n2 k1) sum_n1 W_N1^(n1 k1) x[N2 n1 + n2]

i.e. with the row viewed as an (N1, N2) row-major tile A:  C = ((F_N1 @ A) * T) @ F_N2, where T[k1,
n2] = W_N^(n2 k1) are the twiddles and C[k1, k2] = X[k1 + N1 k2] (a transposed spectrum: the kernel
spectrum is laid out the same way in torch, so the pointwise product needs no reordering). The
inverse runs the same steps backwards with conjugates. Every step is a `tl.dot` with a small dense
DFT matrix (real and imaginary parts as separate real matrices): 12 real GEMMs per block of
frequency rows (see the kernel), fp32 accumulation, operands in the input's half dtype
(fp16 / bf16), or 3xTF32 for fp32 inputs (`FP32_DOT_PRECISION`). Two levels cover N <= 16K
(L <= 8K) in one kernel; fp32 stops at L = 2K (`_flashconv_support.FP32_MAX_LEN`).

The zero padding to N >= 2L makes the circular convolution causal-exact for the first L outputs;
with a conjugated spectrum the same kernel computes the anti-causal correlation the backward
needs (gradient w.r.t. the input).

Imports only torch and triton.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from hippo.kernels import ops as _ops
from hippo.kernels._flashconv_support import MAX_FFT_SIZE, MIN_FFT_SIZE, block_fft_config, flashconv_unsupported

__all__ = [
    "FlashConvFn",
    "flashconv",
    "FLASHCONV_FFT_SIZES",
    "FP32_DOT_PRECISION",
    "INTERPRET_CAPABILITY",
    "launch_config",
    "MAX_FFT_SIZE",
    "MIN_FFT_SIZE",
    "block_fft_config",
    "block_fft_spectrum",
    "flashconv_fwd_kernel",
    "flashconv_rows",
]

# `input_precision` of the fp32 GEMMs (same keyword and values in triton 3.6 and 3.9; ignored for
# 16-bit operands). "tf32" (triton's default) reads 10 mantissa bits: ~1e-3 errors. "ieee" is exact
# fp32 but runs on CUDA cores: no tensor-core instruction and spills from N = 2048 at the shipped
# configs (the compile check fails). "tf32x3" splits each operand into two tf32 halves, three
# tensor-core products: per-product error ~2^-20 instead of 2^-10.
FP32_DOT_PRECISION = "tf32x3"


# --------------------------------------------------------------------------- Triton kernel
@triton.jit
def _tf32_trunc(x):
    """What a TF32 tensor core reads of an fp32 value: the low 13 mantissa bits dropped."""
    return (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _tf32_round(x):
    """x rounded to TF32 (nearest, ties away: cvt.rna.tf32.f32), the "big" half of 3xTF32."""
    return ((x.to(tl.int32, bitcast=True) + 4096) & -8192).to(tl.float32, bitcast=True)


@triton.jit
def _to(x, DTYPE: tl.constexpr, EMULATE: tl.constexpr):
    """x.to(DTYPE) with a GPU's rounding (nearest even) also under the interpreter.

    triton 3.9's interpreter truncates fp32 -> bf16 (errors up to 2^-7, all toward zero, so they
    do not cancel). Under EMULATE bf16 is rounded by bit arithmetic and returned as fp32 values
    that are exact in bf16 (a later `.to(tl.bfloat16)` is then exact).
    """
    if EMULATE and DTYPE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        return ((bits + 32767 + ((bits >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _mm_emulated(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b for fp32 a, b as a GPU computes it with this input_precision (interpreter only)."""
    if PRECISION == "tf32":
        return tl.dot(_tf32_trunc(a), _tf32_trunc(b), acc, input_precision="ieee")
    elif PRECISION == "tf32x3":
        a_hi = _tf32_round(a)
        b_hi = _tf32_round(b)
        small = tl.dot(_tf32_trunc(a - a_hi), b_hi, tl.zeros_like(acc), input_precision="ieee")
        small = tl.dot(a_hi, _tf32_trunc(b - b_hi), small, input_precision="ieee")
        return acc + tl.dot(a_hi, b_hi, small, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _mm(a, b, acc, DOT_DTYPE: tl.constexpr, EMULATE: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """acc + a @ b with operands in DOT_DTYPE and fp32 accumulation.

    EMULATE (the CPU interpreter only): round the operands to DOT_DTYPE (nearest even, `_to`),
    then multiply in fp32, with fp32 operands treated as the GPU's FP32_PRECISION would
    (`_mm_emulated`). Same numerics as the tensor-core product up to summation order; needed
    because triton 3.9's interpreter computes bf16 `tl.dot` wrongly (errors ~1e10 seen), numpy
    has no bf16, and the interpreter ignores input_precision (it would show ieee numerics for
    every fp32 mode).
    """
    if EMULATE:
        if DOT_DTYPE == tl.float32:
            return _mm_emulated(a.to(tl.float32), b.to(tl.float32), acc, FP32_PRECISION)
        else:
            a32 = _to(a, DOT_DTYPE, EMULATE).to(tl.float32)
            return tl.dot(a32, _to(b, DOT_DTYPE, EMULATE).to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=FP32_PRECISION)


@triton.jit
def flashconv_fwd_kernel(
    u_ptr, v_ptr, q_ptr, y_ptr,  # rows of length L, strided (batch, channel, position)
    kr_ptr, ki_ptr,  # (C, N1, N2) fp32 kernel spectrum in the transposed block layout, pre-scaled by 1/N
    d_ptr,  # (C,) fp32 skip
    f1r_ptr, f1i_ptr,  # (N1, N1) DFT matrix (symmetric), in DOT_DTYPE
    f2r_ptr, f2i_ptr,  # (N2, N2) DFT matrix, in DOT_DTYPE
    twr_ptr, twi_ptr,  # (N1, N2) fp32 twiddles W_N^(n2 k1)
    L, C,
    stride_ub, stride_uc, stride_ul,
    stride_vb, stride_vc, stride_vl,
    stride_qb, stride_qc, stride_ql,
    stride_yb, stride_yc, stride_yl,
    N1: tl.constexpr, N2: tl.constexpr,
    H: tl.constexpr,  # rows n1 < H of the time-domain tile hold data (N1 / 2: L <= N / 2), >= 16
    R: tl.constexpr,  # frequency rows k1 per loop step
    HAS_V: tl.constexpr, HAS_Q: tl.constexpr, HAS_D: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # tl.float16 / tl.bfloat16 / tl.float32 (see FP32_PRECISION)
    FP32_PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands: FP32_DOT_PRECISION
    EMULATE: tl.constexpr = False,
):
    # Only the first and last GEMMs (F_N1 @ A, conj(F_N1) @ G) mix the rows k1 of the (N1, N2)
    # spectrum tile; twiddles, the F_N2 GEMMs and the pointwise product are row-local. So the
    # program loops over blocks of R frequency rows: B_blk = F_N1[blk, :H] @ A, ... , and
    # accumulates S += conj(F_N1)[:H, blk] @ G_blk. Live state: the (H, N2) input and accumulator
    # plus (R, N2) blocks, instead of several full complex (N1, N2) tiles: no spills at N = 16K.
    # Zero padding is used twice: rows n1 >= H of A are zero (skipped in the K dimension) and
    # outputs n >= L are never needed (rows n1 >= H of S are not computed).
    row = tl.program_id(0)  # = b * C + c
    b = row // C
    c = row % C
    ih = tl.arange(0, H)
    i2 = tl.arange(0, N2)
    ir = tl.arange(0, R)
    pos = ih[:, None] * N2 + i2[None, :]  # (H, N2): n = N2 n1 + n2
    mask = pos < L

    # w = u (* v): the data rows of the zero-padded (N1, N2) tile, as a GEMM operand.
    w = tl.load(u_ptr + b * stride_ub + c * stride_uc + pos * stride_ul, mask=mask, other=0.0).to(tl.float32)
    if HAS_V:
        w = w * tl.load(v_ptr + b * stride_vb + c * stride_vc + pos * stride_vl, mask=mask, other=0.0).to(tl.float32)
    w_op = _to(w, DOT_DTYPE, EMULATE)
    sq2 = i2[:, None] * N2 + i2[None, :]
    f2r = tl.load(f2r_ptr + sq2)
    f2i = tl.load(f2i_ptr + sq2)
    acc = tl.zeros((H, N2), dtype=tl.float32)
    zero = tl.zeros((R, N2), dtype=tl.float32)
    spec_ptr = c * N1 * N2

    for r0 in range(0, N1, R):
        k1 = r0 + ir
        blk = k1[:, None] * N2 + i2[None, :]  # (R, N2)
        # Step 1: B = F_N1[blk, :H] @ A (A real: two GEMMs).
        f1_rows = k1[:, None] * N1 + ih[None, :]  # (R, H)
        br = _mm(tl.load(f1r_ptr + f1_rows), w_op, zero, DOT_DTYPE, EMULATE, FP32_PRECISION)
        bi = _mm(tl.load(f1i_ptr + f1_rows), w_op, zero, DOT_DTYPE, EMULATE, FP32_PRECISION)
        # Step 2: twiddles.
        twr = tl.load(twr_ptr + blk)
        twi = tl.load(twi_ptr + blk)
        tr = br * twr - bi * twi
        ti = br * twi + bi * twr
        # Step 3: C = B @ F_N2 (complex x complex: four GEMMs chained through the accumulator).
        cr = _mm(-ti, f2i, _mm(tr, f2r, zero, DOT_DTYPE, EMULATE, FP32_PRECISION),
                 DOT_DTYPE, EMULATE, FP32_PRECISION)
        ci = _mm(ti, f2r, _mm(tr, f2i, zero, DOT_DTYPE, EMULATE, FP32_PRECISION),
                 DOT_DTYPE, EMULATE, FP32_PRECISION)
        # Pointwise product with the kernel spectrum (1/N already folded in).
        kr = tl.load(kr_ptr + spec_ptr + blk)
        ki = tl.load(ki_ptr + spec_ptr + blk)
        pr = cr * kr - ci * ki
        pi = cr * ki + ci * kr
        # Inverse: E = P @ conj(F_N2); G = E * conj(T); S += Re(conj(F_N1)[:H, blk] @ G).
        er = _mm(pi, f2i, _mm(pr, f2r, zero, DOT_DTYPE, EMULATE, FP32_PRECISION),
                 DOT_DTYPE, EMULATE, FP32_PRECISION)
        ei = _mm(-pr, f2i, _mm(pi, f2r, zero, DOT_DTYPE, EMULATE, FP32_PRECISION),
                 DOT_DTYPE, EMULATE, FP32_PRECISION)
        gr = er * twr + ei * twi
        gi = ei * twr - er * twi
        f1_cols = ih[:, None] * N1 + k1[None, :]  # (H, R)
        acc = _mm(tl.load(f1r_ptr + f1_cols), gr, acc, DOT_DTYPE, EMULATE, FP32_PRECISION)
        acc = _mm(tl.load(f1i_ptr + f1_cols), gi, acc, DOT_DTYPE, EMULATE, FP32_PRECISION)

    s = acc
    if HAS_D:
        # The skip term reuses the GEMM operand copy of w (u v rounded to DOT_DTYPE, as a bf16
        # torch pipeline rounds k' * v): keeping the fp32 w, or re-reading u and v, costs the
        # registers that made the 16K sm_80 kernels spill.
        s += tl.load(d_ptr + c) * w_op.to(tl.float32)
    if HAS_Q:
        s = s * tl.load(q_ptr + b * stride_qb + c * stride_qc + pos * stride_ql, mask=mask, other=0.0).to(tl.float32)
    y = _to(s, y_ptr.dtype.element_ty, EMULATE).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + b * stride_yb + c * stride_yc + pos * stride_yl, y, mask=mask)


# --------------------------------------------------------------------------- host side
def launch_config(n: int, capability: int = 90, *, fp32: bool = False) -> dict:
    """Block sizes and launch options for FFT size n on a GPU of this compute capability.

    Exactly what the compile test builds (tests/kernels/test_flashconv_compile.py).
    N1 x N2: the block-FFT split. From N = 8K, sm_90 uses N2 = 64 (N1 = N / 64): 144-242
    registers and no spills, where the square split sits at 255 and spills in some variants;
    on sm_80 the square-ish split is the one that compiles clean
    (benchmarks/results/flashconv_triton.md).
    H: data rows of the time tile (N1 / 2, or N1 when N1 / 2 < 16, tl.dot's minimum).
    R: frequency rows per loop step (16 from N = 8K: R = 32 spills there; 16 from N = 2K for
    fp32, whose 3xTF32 GEMMs hold three operand pairs: R = 32 spills on sm_90).
    num_stages=1: the loop's loads are small and L2-resident, while the default software
    pipelining multiplied shared memory (212 KiB at N = 8K, over sm_80's 163 KiB).
    """
    _, n1, n2 = block_fft_config(n // 2)
    if capability >= 90 and n >= 8192:
        n1, n2 = n // 64, 64
    rows = 16 if n >= (2048 if fp32 else 8192) else 32
    return dict(
        N1=n1, N2=n2, H=n1 // 2 if n1 >= 32 else n1, R=min(n1, rows),
        num_warps=4 if n <= 1024 else 8, num_stages=1,
    )


# Every FFT size the launcher can pick (L = 128 .. 8192; shorter rows use N = 256).
FLASHCONV_FFT_SIZES = (256, 512, 1024, 2048, 4096, 8192, 16384)
# Which config table the CPU interpreter runs (tests set 80 to check the sm_80 splits).
INTERPRET_CAPABILITY = 90


def _capability(device: torch.device) -> int:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return INTERPRET_CAPABILITY


_DOT_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_mats_cache: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _dft_mats(n1: int, n2: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """(F_N1.re, F_N1.im, F_N2.re, F_N2.im) in `dtype` and (T.re, T.im) in fp32, built in float64.

    Cached per (size, device, dtype).
    """
    key = (n1, n2, str(device), dtype)
    if key not in _mats_cache:
        def dft(m):
            j = torch.arange(m, dtype=torch.float64)
            return torch.exp(-2j * math.pi * torch.outer(j, j) / m)

        k1, j2 = torch.arange(n1, dtype=torch.float64), torch.arange(n2, dtype=torch.float64)
        tw = torch.exp(-2j * math.pi * torch.outer(k1, j2) / (n1 * n2))  # T[k1, n2] = W_N^(n2 k1)
        mats = []
        for z, dt in ((dft(n1), dtype), (dft(n2), dtype), (tw, torch.float32)):
            mats += [z.real.to(dt).to(device).contiguous(), z.imag.to(dt).to(device).contiguous()]
        _mats_cache[key] = tuple(mats)
    return _mats_cache[key]


def block_fft_spectrum(k: torch.Tensor, n: int, n1: int, conj: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel spectrum fft(k, n) / n in the kernel's (C, N1, N2) transposed block layout, fp32.

    C[k1, k2] = X[k1 + N1 k2] = X.view(N2, N1)[k2, k1]. `conj=True` gives the spectrum of the
    time-reversed kernel (correlation), used for the input gradient.
    """
    kf = torch.fft.fft(k.to(torch.float32), n=n) / n  # (C, n) complex64
    if conj:
        kf = kf.conj()
    kf = kf.view(k.shape[0], n // n1, n1).transpose(1, 2)
    return kf.real.contiguous(), kf.imag.contiguous()


def flashconv_rows(
    u: torch.Tensor,
    k: torch.Tensor,
    D: torch.Tensor | None,
    v: torch.Tensor | None,
    q: torch.Tensor | None,
    conj: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Launch `flashconv_fwd_kernel` over (B, C, L) rows: y = q * (conv(u v, k) + D u v).

    u, v, q: (B, C, L), any strides; k: (C, Lk) time-domain kernel (its spectrum is built here,
    once per call, in the block layout of the config chosen for this GPU). conj=True correlates
    instead (y[j] = sum_{l >= j} k[l - j] (u v)[l]: the input gradient). Returns (B, C, L).
    """
    Bsz, C, L = u.shape
    cap = _capability(u.device)
    why = flashconv_unsupported(divmod(cap, 10) if u.device.type == "cuda" else None, u.dtype, L)
    if why is not None:
        raise ValueError(f"flashconv (triton): {why}")
    n = block_fft_config(L)[0]
    cfg = launch_config(n, cap, fp32=u.dtype == torch.float32)
    n1, n2 = cfg["N1"], cfg["N2"]
    spectrum = block_fft_spectrum(k[..., :L], n, n1, conj=conj)
    dot_dtype = _DOT_DTYPES[u.dtype]
    y = torch.empty(Bsz, C, L, device=u.device, dtype=out_dtype or u.dtype)
    f1r, f1i, f2r, f2i, twr, twi = _dft_mats(n1, n2, u.device, u.dtype)
    dummy = u  # never read: the HAS_* flags compile the loads out
    vv = v if v is not None else dummy
    qq = q if q is not None else dummy
    dd = D.to(torch.float32).contiguous() if D is not None else spectrum[0]
    flashconv_fwd_kernel[(Bsz * C,)](
        u, vv, qq, y,
        spectrum[0], spectrum[1], dd,
        f1r, f1i, f2r, f2i, twr, twi,
        L, C,
        *u.stride(), *vv.stride(), *qq.stride(), *y.stride(),
        **cfg,
        HAS_V=v is not None, HAS_Q=q is not None, HAS_D=D is not None,
        DOT_DTYPE=dot_dtype,
        FP32_PRECISION=FP32_DOT_PRECISION,
        EMULATE=_interpreting(),
    )
    return y


# --------------------------------------------------------------------------- launchers
def _flashconv_bwd(dy, u, k, D, v, q, needs):
    """Gradients of y = q (conv(w, k) + D w), w = u v (v, q optional). Returns (du, dk, dD, dv, dq).

    - dw = corr(g, k) + D g with g = dy q: the same kernel, conjugated spectrum, q as pre-multiply.
    - dq = dy s: s recomputed by the kernel (no q), fp32.
    - dk, dD: batch-reduced correlations of g with w, done with torch.fft in fp32 (not fused).
    """
    Bsz, C, L = u.shape
    Lk = min(k.shape[-1], L)
    n = block_fft_config(L)[0]
    du = dk = dD = dv = dq = None
    dw = flashconv_rows(dy, k, D, q, None, conj=True, out_dtype=torch.float32)
    if needs[0]:
        du = (dw * v if v is not None else dw).to(u.dtype)
    if needs[3]:
        dv = (dw * u).to(v.dtype)
    if needs[4]:
        s = flashconv_rows(u, k, D, v, None, out_dtype=torch.float32)
        dq = (dy * s).to(q.dtype)
    if needs[1] or needs[2]:
        g = dy.float() * q.float() if q is not None else dy.float()
        w = u.float() * v.float() if v is not None else u.float()
        if needs[1]:
            # dk[m] = sum_b sum_l g[l] w[l-m]: exact for m < L with n >= 2L (no wrap-around).
            prod = (torch.fft.rfft(g, n=n) * torch.fft.rfft(w, n=n).conj()).sum(0)
            dk = torch.fft.irfft(prod, n=n)[..., :Lk].to(k.dtype)
            if k.shape[-1] > Lk:  # taps beyond L never reach an output
                dk = torch.cat((dk, dk.new_zeros(C, k.shape[-1] - Lk)), dim=-1)
        if needs[2]:
            dD = (g * w).sum((0, 2)).to(D.dtype)
    return du, dk, dD, dv, dq


class FlashConvFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, k, D, v, q):
        ctx.save_for_backward(u, k, D, v, q)
        return flashconv_rows(u, k, D, v, q)  # y = q * (conv(u v, k) + D u v), u's dtype

    @staticmethod
    def backward(ctx, dy):
        u, k, D, v, q = ctx.saved_tensors
        return _flashconv_bwd(dy, u, k, D, v, q, ctx.needs_input_grad)


# --------------------------------------------------------------------------- public API
def flashconv(
    u: torch.Tensor,
    k: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    v: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton FlashConv: y = q * (causal_conv(u v, k) + D u v), one fused kernel per row.

    Args:
        u: (B, C, L) input, fp32 / fp16 / bf16, any strides; L <= 8192.
        k: (C, Lk) causal kernel (taps beyond L ignored; a shorter kernel is zero beyond Lk).
        D: optional (C,) skip weight.
        v: optional (B, C, L) pre-multiply (H3: V times the shift-SSM output u = K').
        q: optional (B, C, L) post-multiply (H3: Q).
    Returns:
        (B, C, L) in u's dtype. Products on tensor cores with operands in u's dtype (3xTF32 for
        fp32) and fp32 accumulation. Runs on CUDA tensors of compute capability >= 8.0 (fp32:
        L <= 2048), or on CPU under TRITON_INTERPRET=1.

    Accuracy, normwise relative to float64 on the same (dtype-rounded) inputs. u: one rounding,
    bf16 2^-8, fp16 2^-11, fp32 GEMMs 3xTF32 <= 2.5 * 2^-21 per product (plain TF32: 2^-10).
    One call rounds 9 times (4 GEMM operands, 4 DFT matrices, the output); with RMS u / sqrt(3)
    each, in quadrature, times 3 for margin, the bound is 5.2 u, plus fp32 accumulation
    (sqrt(8 n / 3) u32, n = N2 <= 128 the GEMM reduction length):
      bf16  <= 2.0e-2   (interpreter, GPU rounding emulated: ~1e-3 .. 5e-3)
      fp16  <= 2.5e-3   (~2e-4 .. 9e-4)
      fp32  <= 6e-6     (~1e-7; plain TF32 dots would give ~1e-3)
    `tests/kernels/test_flashconv_triton.py` checks these through h3_core (two chained calls:
    18 roundings, 7.3 u). The interpreter emulates a GPU's rounding (EMULATE), so the same
    bounds should hold on sm_80 / sm_90 up to the tensor cores' fp32 summation order; that part
    is not yet measured on a GPU.
    """
    if u.dim() != 3:
        raise ValueError(f"flashconv expects u of shape (B, C, L), got {tuple(u.shape)}")
    return _ops.flashconv(u, k, D, v, q) if _ops.routed() else FlashConvFn.apply(u, k, D, v, q)
