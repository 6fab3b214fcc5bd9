"""Triton FlashConv under TRITON_INTERPRET=1 (CPU) against float64 references.

TRITON_INTERPRET must be set before triton is imported, and setting it in this pytest process
would change how every other test's triton import behaves. So all cases run in one child
process (this file run as a script, with the variable set); the tests here only read its
per-case errors. Errors are relative to the reference's max: max|out - ref| / max|ref|.

Tolerances (what a bf16 pipeline allows; the measured values are in the report):
  fp32 inputs  1e-5  (the interpreter multiplies in true fp32; on a GPU tl.dot uses tf32, ~1e-3)
  fp16 inputs  4e-3  (operands rounded to fp16: 11-bit significands, 4 GEMM stages, fp16 output)
  bf16 inputs  4e-2  (8-bit significands: ~4e-3 per rounding, plus the bf16 output rounding)
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


# ------------------------------------------------------------------ child process (the cases)
def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def _cases():
    """(name, dtype tag, fn) for every case; fn() returns {quantity: rel. error}."""
    import torch

    from hippo.kernels import DiscreteDiagonalSSM, discretize_diagonal, h3_core, h3_core_ref
    from hippo.kernels._flashconv_triton import flashconv
    from hippo.kernels.fftconv import fftconv_ref

    dts = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

    def conv_case(B, C, L, Lk, tag, with_vq, transposed=False, grads=False, seed=0):
        def run():
            g = torch.Generator().manual_seed(seed)
            dt = dts[tag]
            rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
            u, v, q, dy = rnd(B, C, L), rnd(B, C, L), rnd(B, C, L), rnd(B, C, L)
            k, D = rnd(C, Lk) / min(Lk, L) ** 0.5, rnd(C)
            if not with_vq:
                v = q = None
            # Inputs as the kernel sees them (rounded to dt), leaves in float64 for the reference.
            leaves = {n: t.to(dt).double() for n, t in dict(u=u, k=k, D=D, v=v, q=q).items() if t is not None}
            ins = {n: t.to(dt).requires_grad_(grads) for n, t in leaves.items()}
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
                got = torch.autograd.grad(y, [ins[n] for n in names], dy.to(dt))
                want = torch.autograd.grad(y_ref, [ref_in[n] for n in names], dy.to(dt).double())
                out.update({f"d{n}": _rel(a, b) for n, a, b in zip(names, got, want)})
            return out

        return run

    def h3_case(B, C, L, seed=0):
        def run():
            g = torch.Generator().manual_seed(seed)
            rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32)  # noqa: E731
            N = 64
            q, k, v, dy = rnd(B, C, L), rnd(B, C, L), rnd(B, C, L), rnd(B, C, L)
            sB, sC, sD = rnd(C, N) / 8, rnd(C, N) / N**0.5, rnd(C)
            log_dt = torch.empty(C).uniform_(-6.9, -2.3, generator=g)
            raw = (log_dt, torch.full((C, 32), -0.69), torch.pi * torch.arange(32.0).expand(C, 32).clone(),
                   rnd(C, 32, 2), rnd(C, 32, 2) / 2**0.5)
            D = rnd(C)
            res = {}
            outs = {}
            for impl, dt in (("triton", torch.float32), ("reference", torch.float64)):
                leaves = [t.to(dt).requires_grad_() for t in (q, k, v, sB, sC, sD, D, raw[0], raw[4])]
                ssm = discretize_diagonal(leaves[7], raw[1].to(dt), raw[2].to(dt), raw[3].to(dt), leaves[8])
                if dt == torch.float64:
                    ssm = DiscreteDiagonalSSM(*(t.to(torch.complex128) for t in ssm))
                    y = h3_core_ref(*leaves[:6], ssm, leaves[6])
                else:
                    y = h3_core(*leaves[:6], ssm, leaves[6], impl=impl)
                grads = torch.autograd.grad(y, leaves, dy.to(dt))
                outs[impl] = (y, grads)
            res["y"] = _rel(outs["triton"][0].detach(), outs["reference"][0].detach())
            names = ("dq", "dk", "dv", "dshift_B", "dshift_C", "dshift_D", "dD", "dlog_dt", "dC")
            res.update({n: _rel(a, b) for n, a, b in zip(names, outs["triton"][1], outs["reference"][1])})
            return res

        return run

    cases = []
    for L in (100, 256, 1024):
        for tag in ("fp32", "fp16", "bf16"):
            cases.append((f"fwd_h3_L{L}_{tag}", tag, conv_case(2, 4, L, L, tag, True)))
    cases.append(("fwd_conv_L512_fp32_64taps", "fp32", conv_case(2, 8, 512, 64, "fp32", False)))
    cases.append(("fwd_h3_L512_bf16_strided", "bf16", conv_case(2, 4, 512, 512, "bf16", True, transposed=True)))
    cases.append(("fwd_h3_L4096_bf16", "bf16", conv_case(1, 2, 4096, 4096, "bf16", True)))
    cases.append(("fwd_h3_L8192_bf16", "bf16", conv_case(1, 2, 8192, 8192, "bf16", True)))
    cases.append(("fwd_h3_L8192_fp32", "fp32", conv_case(1, 2, 8192, 8192, "fp32", True)))
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
    cases.append(("grad_h3_L8192_fp32", "fp32", conv_case(1, 2, 8192, 8192, "fp32", True, grads=True)))
    cases.append(("h3_core_triton_L200_fp32", "fp32", h3_case(2, 4, 200)))
    cases.append(("h3_core_triton_L1024_fp32", "fp32", h3_case(2, 4, 1024)))
    return cases


def _worker() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    results = {}
    for name, tag, fn in _cases():
        t0 = time.perf_counter()
        try:
            errs = fn()
            results[name] = {"tag": tag, "errors": errs, "seconds": time.perf_counter() - t0}
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
    "fwd_h3_L8192_bf16", "fwd_h3_L8192_fp32",
    "grad_h3_L300_k300_fp32", "grad_h3_L300_k64_fp32", "grad_h3_L300_k500_fp32", "grad_conv_L256_fp32",
    "grad_h3_L1024_bf16", "grad_h3_L2048_fp16", "grad_h3_L512_bf16_strided",
    "sm80cfg_fwd_h3_L8192_bf16", "sm80cfg_grad_h3_L4096_fp16", "grad_h3_L8192_fp32",
    "h3_core_triton_L200_fp32", "h3_core_triton_L1024_fp32",
]


@pytest.mark.slow
@pytest.mark.parametrize("case", _CASE_NAMES)
def test_flashconv_interpreted_matches_float64_reference(interp_results, case):
    res = interp_results[case]
    assert "error" not in res, res.get("error")
    tol = TOL[res["tag"]]
    if case.startswith("h3_core"):
        tol = 1e-4  # two chained fp32 convs + SSM-parameter chains; fp64 reference
    bad = {q: e for q, e in res["errors"].items() if not e <= tol}
    assert not bad, f"{case}: rel. errors above {tol}: {bad} (all: {res['errors']})"


def test_case_list_matches_worker():
    """The parametrized names above are exactly the worker's cases (no silently skipped case)."""
    pytest.importorskip("triton")
    assert [name for name, _, _ in _cases()] == _CASE_NAMES


def test_h3_core_dispatch_to_triton(monkeypatch):
    """"auto" picks triton only for CUDA tensors it can handle; "triton" raises where it cannot run.

    Device objects only: no GPU and no kernel launch needed.
    """
    pytest.importorskip("triton")
    import torch

    from hippo.kernels.h3_core import _resolve_impl

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert _resolve_impl("auto", cuda, 2048) == "triton"
    assert _resolve_impl("auto", cuda, 8192) == "triton"
    assert _resolve_impl("auto", cuda, 8193) == "torch"  # beyond the one-kernel block FFT
    assert _resolve_impl("auto", cuda, 2048, stateful=True) == "torch"  # prefill state: chunked path
    assert _resolve_impl("auto", cpu, 2048) == "torch"
    assert _resolve_impl("triton", cuda, 2048) == "triton"
    for args, match in (((cpu, 2048), "not CUDA"), ((cuda, 8193), "8192"), ((cuda, 64, True), "state")):
        with pytest.raises(RuntimeError, match=match):
            _resolve_impl("triton", *args)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _resolve_impl("triton", cpu, 2048) == "triton"
    assert _resolve_impl("auto", cpu, 2048) == "torch"  # the interpreter is for tests, never picked


if __name__ == "__main__":
    _worker()
