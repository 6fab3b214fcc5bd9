"""Triton FlashConv under TRITON_INTERPRET=1 (CPU) against float64 references.

TRITON_INTERPRET must be set before triton is imported, and setting it in this pytest process
would change how every other test's triton import behaves. So all cases run in one child
process (this file run as a script, with the variable set); the tests here only read its
per-case errors. Errors are relative to the reference's max: max|out - ref| / max|ref|.

The kernel's EMULATE mode gives the interpreter a GPU's numerics: 16-bit operands rounded to
nearest even, and fp32 GEMMs as the GPU runs them at `FP32_DOT_PRECISION` (3xTF32; the
interpreter itself ignores input_precision and truncates fp32 -> bf16).

Tolerances of the flashconv cases (max-norm, what a bf16 pipeline allows):
  fp32 inputs  1e-5  (3xTF32 GEMMs, emulated; a GPU gives the same up to summation order.
                      Plain TF32 dots give ~1e-3: see the *_tf32dots control case)
  fp16 inputs  4e-3  (operands rounded to fp16: 11-bit significands, 4 GEMM stages, fp16 output)
  bf16 inputs  4e-2  (8-bit significands: ~4e-3 per rounding, plus the bf16 output rounding)

Bounds of the model-level h3_core(impl="triton") cases: see `h3_bound`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = {"fp32": 1e-5, "fp16": 4e-3, "bf16": 4e-2}

# Unit roundoff of one rounding in the kernels' GEMMs: the operand dtype's 2^-p (p significant
# bits), and for fp32 the 3xTF32 product error (<= 2.5 * 2^-21 per product, rounded up to 2^-20).
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11, "fp32": 2.0**-20}
U32 = 2.0**-24
# Roundings along each quantity's path through h3_core(impl="triton"), two chained kernels:
# y: 2 kernels x (4 GEMM operands + 4 DFT matrices in the dtype + 1 output) = 18.
# SSM-parameter gradients: 9, from one kernel each. The diagonal SSM's (dKd, dD) are fp32
# correlations of dy q (exact in fp32) with w = k' v, whose k' carries the first kernel's 9; the
# shift SSM's (dKs, dDk) correlate k with dk' = corr(dy q, Kd) v, one kernel's 8 and its rounding.
ROUNDINGS = {"y": 18, "grad": 9}


def h3_bound(tag: str, roundings: int, n: int, L: int) -> float:
    """Normwise relative error bound for an h3_core(impl="triton") output, derived a priori.

    Each rounding is a relative perturbation with RMS <= u / sqrt(3) (uniform in [-u, u]);
    independent ones add in quadrature, and the block-FFT stages are scaled unitary maps, so they
    carry a relative error unchanged. fp32 accumulation over the GEMM reduction length n (= N2,
    the longest) adds sqrt(n / 3) u32 in each of the 8 GEMM stages, and the SSM kernel's powers
    dA^l (complex64) up to L u32 (a phase error growing with l, not random). The factor 3 covers
    the model's independence and unit-amplification assumptions (the spectrum product is not
    unitary: its worst-case amplification max|K^| / rms|K^| is 2-6 for these kernels).
    """
    u = UNIT_ROUNDOFF[tag]
    return 3.0 * ((roundings * u**2 + 8 * n * U32**2) / 3.0) ** 0.5 + L * U32


# ------------------------------------------------------------------ child process (the cases)
def _rel(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _rel_norm(a, b) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _dtypes():
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def conv_case(B, C, L, Lk, tag, with_vq, transposed=False, grads=False, seed=0, device="cpu"):
    """`flashconv` on `device` against `fftconv_ref` in float64 on the CPU: () -> {quantity: max-norm
    rel. error}. The GPU tier (tests/gpu) runs these same cases on CUDA."""

    def run():
        import torch

        from hippo.kernels._flashconv_triton import flashconv
        from hippo.kernels.fftconv import fftconv_ref

        g = torch.Generator().manual_seed(seed)
        dt = _dtypes()[tag]
        rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        u, v, q, dy = rnd(B, C, L), rnd(B, C, L), rnd(B, C, L), rnd(B, C, L)
        k, D = rnd(C, Lk) / min(Lk, L) ** 0.5, rnd(C)
        if not with_vq:
            v = q = None
        # Inputs as the kernel sees them (rounded to dt), leaves in float64 for the reference.
        leaves = {n: t.to(dt).double() for n, t in dict(u=u, k=k, D=D, v=v, q=q).items() if t is not None}
        ins = {n: t.to(device=device, dtype=dt).requires_grad_(grads) for n, t in leaves.items()}
        if transposed:  # (B, L, C) projections seen as (B, C, L): strided rows
            ins = {n: (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(grads)
                       if t.dim() == 3 else t) for n, t in ins.items()}
        y = flashconv(ins["u"], ins["k"], ins["D"], v=ins.get("v"), q=ins.get("q"))
        ref_in = {n: t.clone().requires_grad_(grads) for n, t in leaves.items()}
        w = ref_in["u"] * ref_in["v"] if with_vq else ref_in["u"]
        y_ref = fftconv_ref(w, ref_in["k"], ref_in["D"])
        if with_vq:
            y_ref = ref_in["q"] * y_ref
        out = {"y": _rel(y.detach(), y_ref.detach())}
        assert y.dtype == dt and y.shape == (B, C, L)
        if grads:
            names = list(ins)
            got = torch.autograd.grad(y, [ins[n] for n in names], dy.to(device=device, dtype=dt))
            want = torch.autograd.grad(y_ref, [ref_in[n] for n in names], dy.to(dt).double())
            out.update({f"d{n}": _rel(a, b) for n, a, b in zip(names, got, want)})
        return out

    return run


def h3_case(B, C, L, tag, seed=0, fp32_dots=None, device="cpu"):
    """h3_core(impl="triton") on `device`, q k v dy in `tag`, SSM parameters in fp32 (as in the
    model), against h3_core_ref in float64 on the CPU on the same values: y and every SSM-parameter
    gradient, normwise, with the `h3_bound` of each. fp32_dots: run the fp32 GEMMs at this precision."""

    def run():
        import torch

        import hippo.kernels._flashconv_triton as fc
        from hippo.kernels import DiscreteDiagonalSSM, discretize_diagonal, h3_core, h3_core_ref
        from hippo.kernels._flashconv_support import block_fft_config

        g = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
        N, dt = 64, _dtypes()[tag]
        q, k, v, dy = (rnd(B, C, L).to(dt) for _ in range(4))
        sB, sC, sD = rnd(C, N) / 8, rnd(C, N) / N**0.5, rnd(C)
        log_dt = torch.empty(C).uniform_(-6.9, -2.3, generator=g)
        log_A, A_im = torch.full((C, 32), -0.69), torch.pi * torch.arange(32.0).expand(C, 32).clone()
        B_, C_, D = rnd(C, 32, 2), rnd(C, 32, 2) / 2**0.5, rnd(C)
        outs = {}
        old = fc.FP32_DOT_PRECISION
        fc.FP32_DOT_PRECISION = fp32_dots or old
        try:
            for impl, pdt, xdt, dev in (("triton", torch.float32, dt, device),
                                        ("reference", torch.float64, torch.float64, "cpu")):
                x = [t.to(device=dev, dtype=xdt) for t in (q, k, v)]
                p = [t.to(device=dev, dtype=pdt).requires_grad_() for t in (sB, sC, sD, D, log_dt, C_)]
                ssm = discretize_diagonal(p[4], *(t.to(device=dev, dtype=pdt) for t in (log_A, A_im, B_)), p[5])
                if impl == "reference":
                    ssm = DiscreteDiagonalSSM(*(t.to(torch.complex128) for t in ssm))
                    y = h3_core_ref(*x, *p[:3], ssm, p[3])
                else:
                    y = h3_core(*x, *p[:3], ssm, p[3], impl="triton")
                    assert y.dtype == dt
                outs[impl] = (y.detach(), torch.autograd.grad(y, p, dy.to(device=dev, dtype=y.dtype)))
        finally:
            fc.FP32_DOT_PRECISION = old
        names = ("dshift_B", "dshift_C", "dshift_D", "dD", "dlog_dt", "dC")
        errs = {"y": _rel_norm(outs["triton"][0], outs["reference"][0])}
        errs.update({n: _rel_norm(a, b) for n, a, b in zip(names, outs["triton"][1], outs["reference"][1])})
        n2 = block_fft_config(L)[2]
        bounds = {q_: h3_bound(tag, ROUNDINGS["y" if q_ == "y" else "grad"], n2, L) for q_ in errs}
        return errs, bounds

    return run


def _cases():
    """(name, dtype tag, fn) for every interpreted case; fn() returns {quantity: rel. error}."""

    def tf32_dots(fn):
        """The control: fp32 GEMMs as plain TF32 (triton's default, what the kernel ran before)."""
        def run():
            import hippo.kernels._flashconv_triton as fc

            old, fc.FP32_DOT_PRECISION = fc.FP32_DOT_PRECISION, "tf32"
            try:
                return fn()
            finally:
                fc.FP32_DOT_PRECISION = old

        return run

    cases = []
    for L in (100, 256, 1024):
        for tag in ("fp32", "fp16", "bf16"):
            cases.append((f"fwd_h3_L{L}_{tag}", tag, conv_case(2, 4, L, L, tag, True)))
    cases.append(("fwd_conv_L512_fp32_64taps", "fp32", conv_case(2, 8, 512, 64, "fp32", False)))
    cases.append(("fwd_h3_L512_bf16_strided", "bf16", conv_case(2, 4, 512, 512, "bf16", True, transposed=True)))
    cases.append(("fwd_h3_L4096_bf16", "bf16", conv_case(1, 2, 4096, 4096, "bf16", True)))
    cases.append(("fwd_h3_L8192_bf16", "bf16", conv_case(1, 2, 8192, 8192, "bf16", True)))
    cases.append(("fwd_h3_L2048_fp32", "fp32", conv_case(1, 2, 2048, 2048, "fp32", True)))  # largest fp32 config
    cases.append(("fwd_h3_L256_fp32_tf32dots", "fp32", tf32_dots(conv_case(2, 4, 256, 256, "fp32", True))))
    for L, Lk in ((300, 300), (300, 64), (300, 500)):
        cases.append((f"grad_h3_L{L}_k{Lk}_fp32", "fp32", conv_case(2, 4, L, Lk, "fp32", True, grads=True)))
    cases.append(("grad_conv_L256_fp32", "fp32", conv_case(2, 4, 256, 256, "fp32", False, grads=True)))
    cases.append(("grad_h3_L1024_bf16", "bf16", conv_case(2, 4, 1024, 1024, "bf16", True, grads=True)))
    cases.append(("grad_h3_L2048_fp16", "fp16", conv_case(2, 4, 2048, 2048, "fp16", True, grads=True)))
    cases.append(("grad_h3_L512_bf16_strided", "bf16", conv_case(2, 4, 512, 512, "bf16", True, transposed=True, grads=True)))
    # From N = 8K the sm_80 and sm_90 block splits differ: run the sm_80 table too.
    def on_sm80(fn):
        def run():
            import hippo.kernels._flashconv_triton as fc

            old, fc.INTERPRET_CAPABILITY = fc.INTERPRET_CAPABILITY, 80
            try:
                return fn()
            finally:
                fc.INTERPRET_CAPABILITY = old

        return run

    cases.append(("sm80cfg_fwd_h3_L8192_bf16", "bf16", on_sm80(conv_case(1, 2, 8192, 8192, "bf16", True))))
    cases.append(("sm80cfg_grad_h3_L4096_fp16", "fp16", on_sm80(conv_case(1, 2, 4096, 4096, "fp16", True, grads=True))))
    cases.append(("grad_h3_L2048_fp32", "fp32", conv_case(1, 2, 2048, 2048, "fp32", True, grads=True)))
    for L in (200, 1024):
        for tag in ("fp32", "fp16", "bf16"):
            cases.append((f"h3_core_triton_L{L}_{tag}", tag, h3_case(2, 4, L, tag)))
    cases.append(("h3_core_triton_L200_fp32_tf32dots", "fp32", h3_case(2, 4, 200, "fp32", fp32_dots="tf32")))
    return cases


def _worker() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for name, tag, fn in _cases():
        t0 = time.perf_counter()
        try:
            out = fn()
            errs, bounds = out if isinstance(out, tuple) else (out, None)
            results[name] = {"tag": tag, "errors": errs, "bounds": bounds, "seconds": time.perf_counter() - t0}
        except Exception as e:  # reported per case by the parent
            results[name] = {"tag": tag, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    print("RESULTS " + json.dumps(results))


# ------------------------------------------------------------------ parent process (the tests)
@pytest.fixture(scope="module")
def interp_results():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS "):])


_CASE_NAMES = [
    *(f"fwd_h3_L{L}_{t}" for L in (100, 256, 1024) for t in ("fp32", "fp16", "bf16")),
    "fwd_conv_L512_fp32_64taps", "fwd_h3_L512_bf16_strided", "fwd_h3_L4096_bf16",
    "fwd_h3_L8192_bf16", "fwd_h3_L2048_fp32", "fwd_h3_L256_fp32_tf32dots",
    "grad_h3_L300_k300_fp32", "grad_h3_L300_k64_fp32", "grad_h3_L300_k500_fp32", "grad_conv_L256_fp32",
    "grad_h3_L1024_bf16", "grad_h3_L2048_fp16", "grad_h3_L512_bf16_strided",
    "sm80cfg_fwd_h3_L8192_bf16", "sm80cfg_grad_h3_L4096_fp16", "grad_h3_L2048_fp32",
    *(f"h3_core_triton_L{L}_{t}" for L in (200, 1024) for t in ("fp32", "fp16", "bf16")),
    "h3_core_triton_L200_fp32_tf32dots",
]
_CONTROLS = [c for c in _CASE_NAMES if c.endswith("_tf32dots")]
_FLASHCONV = [c for c in _CASE_NAMES if not c.startswith("h3_core") and c not in _CONTROLS]
_H3_CORE = [c for c in _CASE_NAMES if c.startswith("h3_core") and c not in _CONTROLS]


def _ok(res: dict) -> dict:
    assert "error" not in res, res.get("error")
    return res


@pytest.mark.slow
@pytest.mark.parametrize("case", _FLASHCONV)
def test_flashconv_interpreted_matches_float64_reference(interp_results, case):
    res = _ok(interp_results[case])
    tol = TOL[res["tag"]]
    bad = {q: e for q, e in res["errors"].items() if not e <= tol}
    assert not bad, f"{case}: rel. errors above {tol}: {bad} (all: {res['errors']})"


@pytest.mark.slow
@pytest.mark.parametrize("case", _H3_CORE)
def test_h3_core_triton_meets_derived_bound(interp_results, case):
    """Forward through both chained kernels and every SSM-parameter gradient within `h3_bound`.

    Measured / bound (normwise, interpreter with GPU rounding emulated; B=2, C=4, L=200, 1024):
      bf16  y 4.2e-3, 4.3e-3 / 2.9e-2;  SSM-parameter gradients 1.1e-3 .. 5.6e-3 / 2.0e-2
      fp16  y 5.0e-4, 4.4e-4 / 3.6e-3;  gradients 1.5e-4 .. 9.4e-4 / 2.5e-3 (2.6e-3 at L=1024)
      fp32  y 3.0e-6, 6.9e-6 / 1.9e-5, 6.8e-5;  gradients 1.7e-7 .. 2.2e-5 / 1.7e-5, 6.7e-5
            (fp32 is dominated by the SSM kernels built in fp32/complex64, the bound's L u32)
    """
    res = _ok(interp_results[case])
    ratios = {q: e / res["bounds"][q] for q, e in res["errors"].items()}
    assert max(ratios.values()) <= 1.0, f"{case}: error / bound {ratios} (errors {res['errors']})"


@pytest.mark.slow
@pytest.mark.parametrize("case", _CONTROLS)
def test_plain_tf32_dots_break_the_fp32_bounds(interp_results, case):
    """The control: with triton's default fp32 dots (TF32, what the kernel ran before 3xTF32)
    the emulated GPU misses the fp32 bounds by ~100x, so the bounds above can see TF32."""
    res = _ok(interp_results[case])
    if case.startswith("h3_core"):
        assert res["errors"]["y"] > 10 * res["bounds"]["y"], res
    else:
        assert res["errors"]["y"] > 10 * TOL["fp32"], res


def test_case_list_matches_worker():
    """The parametrized names above are exactly the worker's cases (no silently skipped case)."""
    pytest.importorskip("triton")
    assert [name for name, _, _ in _cases()] == _CASE_NAMES


def test_launcher_refuses_fp32_beyond_its_configurations():
    """fp32 L > 2048 has no clean configuration (3xTF32 needs > 163 KiB on sm_80, spills on
    sm_90): refused before any launch, with the reason `h3_core`'s path choice gives."""
    pytest.importorskip("triton")
    import torch

    from hippo.kernels._flashconv_triton import flashconv

    with pytest.raises(ValueError, match="fp32 with L=2049 > 2048"):
        flashconv(torch.randn(1, 1, 2049), torch.randn(1, 64))


if __name__ == "__main__":
    _worker()
