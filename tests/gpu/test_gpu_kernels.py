"""The kernels on the device against their float64 oracles, with the CPU tests' own bounds.

Triton FlashConv forward and backward in bf16 / fp16 / fp32 at L = 256 ... 8192 and
`h3_core(impl="triton")` (the cases and bounds of tests/kernels/test_flashconv_triton.py, run on
CUDA instead of the interpreter), `h3_core` for every impl, the recurrent decode against the full
forward (tests/models/test_lm.py), the diagonal-SSM kernel (tests/kernels/test_ssm.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels import test_flashconv_triton as triton_cases
from tests.kernels import test_h3_core as core_cases
from tests.models import test_lm as lm_cases

DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP32_MAX_LEN = 2048  # the launcher's largest fp32 configuration (test_launcher_refuses_fp32_...)


def _flashconv_cases(target):
    for L in target.kernel_lengths:
        for tag in target.dtypes:
            if tag == "fp32" and L > FP32_MAX_LEN:
                continue
            B, C = (1, 2) if target.dry_run else (2, 8) if L <= 2048 else (1, 4)
            yield f"L{L}_{tag}", tag, triton_cases.conv_case(B, C, L, L, tag, True, grads=True, device=target.device)


def test_flashconv_forward_and_backward_within_the_cpu_tolerances(target):
    failures, worst = [], {}
    for name, tag, run in _flashconv_cases(target):
        errors = run()
        worst[name] = max(errors.values())
        bad = {q: e for q, e in errors.items() if not e <= triton_cases.TOL[tag]}
        if bad:
            failures.append(f"{name}: {bad} > {triton_cases.TOL[tag]}")
    print("flashconv max rel. error per case:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert not failures, failures


def test_h3_core_triton_within_the_derived_bound(target):
    failures = []
    for L in (200, 1024, 2048, 8192) if not target.dry_run else (200,):
        for tag in target.dtypes:
            if tag == "fp32" and L > FP32_MAX_LEN:
                continue
            B, C = (1, 2) if target.dry_run else (2, 4)
            errors, bounds = triton_cases.h3_case(B, C, L, tag, device=target.device)()
            ratios = {q: e / bounds[q] for q, e in errors.items()}
            if max(ratios.values()) > 1.0:
                failures.append(f"L{L}_{tag}: error / bound {ratios}")
    assert not failures, failures


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_h3_core_every_impl_matches_float64_direct(target, impl):
    """fp32 on the device against the direct float64 oracle: 1e-5 for the chunked path (its CPU
    test's bound), 1e-4 for the reference FFT path, `h3_bound` for Triton."""
    L, C, B = target.layer_len, 5, 2
    sB, sC, sD, raw, D = core_cases._params(C, seed=L)
    g = torch.Generator().manual_seed(L)
    q, k, v = torch.randn(3, B, C, L, generator=g).unbind(0)
    dev = target.device
    ssm = core_cases.discretize_diagonal(*(t.to(dev) for t in raw))
    args = [t.to(dev) for t in (q, k, v, sB, sC, sD)]
    y = core_cases.h3_core(*args, ssm, D.to(dev), impl=impl)
    ref, _ = core_cases._oracle(q, k, v, sB, sC, sD, core_cases._c128(ssm.__class__(*(t.cpu() for t in ssm))), D)
    err = core_cases._rel(y.cpu(), ref)
    if impl == "triton":
        from hippo.kernels._flashconv_support import block_fft_config

        bound = triton_cases.h3_bound("fp32", triton_cases.ROUNDINGS["y"], block_fft_config(L)[2], L)
    else:
        bound = 1e-5 if impl == "torch" else 1e-4
    assert y.device.type == dev.type and err <= bound, (impl, err, bound)


@pytest.mark.parametrize("name", ["h3", "hybrid", "s4d", "transformer_rotary"])
def test_recurrent_decode_matches_the_full_forward(target, name):
    model = lm_cases._model(name).to(target.device)
    ids = torch.randint(0, 61, (2, 150), generator=torch.Generator().manual_seed(1)).to(target.device)
    with torch.no_grad():
        full = model(ids)
        for prefill in (1, 64, 100):
            err = (lm_cases._stepwise_logits(model, ids, prefill) - full).abs().max().item()
            assert err <= 1e-4, (name, prefill, err)


def test_diagonal_ssm_kernel_matches_float64(target):
    """The fp32 kernel on the device against the same kernel in float64 (whose closed form
    tests/kernels/test_ssm.py checks term by term): relative max error within fp32's L u32 drift."""
    from tests.kernels.test_ssm import _diag_params

    from hippo.kernels import diagonal_kernel, discretize_diagonal

    L = 4 * target.layer_len
    params = _diag_params(torch.float64)
    want = diagonal_kernel(discretize_diagonal(*params), L)
    got = diagonal_kernel(discretize_diagonal(*(t.to(target.device, torch.float32) for t in params)), L)
    err = ((got.double().cpu() - want).abs().max() / want.abs().max()).item()
    assert err <= L * 2.0**-24 + 1e-6, err


def test_custom_ops_opcheck_on_the_device(target):
    """opcheck of the `hippo::` ops on the device (tests/kernels/test_custom_ops.py runs the CPU
    ones): the Triton FlashConv op and its backward, the chunked core's blocks and matrices."""
    from tests.kernels import test_custom_ops as op_cases

    dev = target.device
    g = torch.Generator().manual_seed(0)
    B, C, L = 2, 4, 256
    u, v, q = (torch.randn(B, C, L, generator=g).to(dev).requires_grad_() for _ in range(3))
    k = torch.randn(C, L, generator=g).to(dev).requires_grad_()
    D = torch.randn(C, generator=g).to(dev).requires_grad_()
    torch.library.opcheck(torch.ops.hippo.flashconv, (u, k, D, v, q))
    torch.library.opcheck(torch.ops.hippo.flashconv, (u, k, None, None, None))
    tensors, x0 = op_cases._block_inputs(torch.float32, L=200, x0=True)
    starts = op_cases._starts(2, 200, (0, 70), (1, 130)).to(dev)
    leaves = [t.to(dev).requires_grad_() for t in (*tensors, x0)]
    torch.library.opcheck(torch.ops.hippo.h3_blocks, (*leaves, 128, starts, True))
