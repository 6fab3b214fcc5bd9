"""h3_core fast (chunked) path against float64 oracles built from the direct convolution."""

import logging
import sys

import pytest
import torch

from hippo.kernels import (
    DiscreteDiagonalSSM,
    diagonal_kernel,
    diagonal_state_from_prefix,
    discretize_diagonal,
    fftconv_ref,
    h3_core,
    h3_core_ref,
    shift_kernel,
)


def _params(C, dtype=torch.float32, seed=0, N=64):
    g = torch.Generator().manual_seed(seed)
    # Random shift B (not e1) so the shift taps really are a B-C correlation.
    sB = torch.randn(C, N, generator=g, dtype=dtype) / 8
    sC = torch.randn(C, N, generator=g, dtype=dtype) / N**0.5
    sD = torch.randn(C, generator=g, dtype=dtype)
    log_dt = torch.empty(C, dtype=dtype).uniform_(-6.9, -2.3, generator=g)
    log_A_real = torch.full((C, 32), -0.69, dtype=dtype) + 0.1 * torch.randn(C, 32, generator=g, dtype=dtype)
    A_imag = torch.pi * torch.arange(32, dtype=dtype).expand(C, 32).clone()
    B = torch.randn(C, 32, 2, generator=g, dtype=dtype)
    Cc = torch.randn(C, 32, 2, generator=g, dtype=dtype) / 2**0.5
    D = torch.randn(C, generator=g, dtype=dtype)
    return sB, sC, sD, (log_dt, log_A_real, A_imag, B, Cc), D


def _c128(ssm):
    return DiscreteDiagonalSSM(*(t.detach().to(torch.complex128) for t in ssm))


def _oracle(q, k, v, sB, sC, sD, ssm64, D, x0=None):
    """Float64, direct O(L^2) convolutions; the initial state's response by its definition."""
    q, k, v, sB, sC, sD, D = (t.detach().double() for t in (q, k, v, sB, sC, sD, D))
    L = q.shape[-1]
    kp = fftconv_ref(k, shift_kernel(sB, sC, min(L, sB.shape[-1])), sD)
    kv = kp * v
    s = fftconv_ref(kv, diagonal_kernel(ssm64, L), D)
    if x0 is not None:
        for l in range(L):  # 2 Re(sum_n C dA^(l+1) x0)
            s[..., l] += 2 * (ssm64.C * ssm64.dA ** (l + 1) * x0.to(torch.complex128)).sum(-1).real
    return q * s, kv


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("L", [1, 37, 64, 65, 200, 1000])
def test_fast_path_matches_float64_direct(L):
    C, Bsz = 5, 2
    sB, sC, sD, raw, D = _params(C, seed=L)
    ssm = discretize_diagonal(*raw)
    q, k, v = torch.randn(3, Bsz, C, L, generator=torch.Generator().manual_seed(L)).unbind(0)
    y = h3_core(q, k, v, sB, sC, sD, ssm, D, impl="torch")
    ref, _ = _oracle(q, k, v, sB, sC, sD, _c128(ssm), D)
    assert y.dtype == torch.float32 and y.shape == (Bsz, C, L)
    assert _rel(y, ref) <= 1e-5


@pytest.mark.parametrize("L", [63, 130, 1000])
def test_initial_and_final_state_match_closed_form(L):
    C, Bsz = 4, 2
    sB, sC, sD, raw, D = _params(C, seed=1)
    ssm = discretize_diagonal(*raw)
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, Bsz, C, L, generator=g).unbind(0)
    x0 = torch.complex(torch.randn(Bsz, C, 32, generator=g), torch.randn(Bsz, C, 32, generator=g))
    y, state = h3_core(q, k, v, sB, sC, sD, ssm, D, impl="torch", initial_state=x0, return_state=True)
    ref, kv = _oracle(q, k, v, sB, sC, sD, _c128(ssm), D, x0)
    state_ref = diagonal_state_from_prefix(kv, _c128(ssm), x0.to(torch.complex128))
    assert _rel(y, ref) <= 1e-5
    assert ((state - state_ref).abs().max() / state_ref.abs().max()).item() <= 1e-5


def test_fast_equals_reference_path_on_strided_inputs():
    """The module passes transposed (B, L, C) projections: fast and reference agree on them."""
    C, Bsz, L = 16, 2, 2048
    sB, sC, sD, raw, D = _params(C, seed=3)
    ssm = discretize_diagonal(*raw)
    q, k, v = (t.transpose(1, 2) for t in torch.randn(3, Bsz, L, C).unbind(0))
    y = h3_core(q, k, v, sB, sC, sD, ssm, D, impl="torch")
    y_ref = h3_core(q, k, v, sB, sC, sD, ssm, D, impl="reference")
    y64 = h3_core_ref(*(t.double() for t in (q, k, v, sB, sC, sD)), _c128(ssm), D.double())
    assert _rel(y, y64) <= 1e-5 and _rel(y_ref, y64) <= 1e-4


@pytest.mark.parametrize("layout", ["contiguous", "projection"])
def test_gradients_match_reference_autograd_float64(layout):
    """Every input and raw SSM parameter: fast-path gradients == reference-path autograd, for
    (B, C, L) inputs and for transposed (B, L, C) projections (the layer's own layout)."""
    C, Bsz, L = 3, 2, 150  # three chunks, the last one partial
    sB, sC, sD, raw, D = _params(C, dtype=torch.float64, seed=4)
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(3, Bsz, C, L, generator=g, dtype=torch.float64).unbind(0)
    if layout == "projection":
        qkv = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv]
    x0 = torch.randn(Bsz, C, 32, generator=g, dtype=torch.complex128)
    w = torch.randn(Bsz, C, L, generator=g, dtype=torch.float64)
    w_state = torch.randn(Bsz, C, 32, generator=g, dtype=torch.complex128)

    def grads(impl):
        leaves = [t.clone().requires_grad_() for t in (*qkv, sB, sC, sD, *raw, D, x0)]
        q, k, v, b, c, d, *rest = leaves
        if layout == "projection":
            assert q.stride() == (L * C, 1, C)
        ssm = discretize_diagonal(*rest[:5])
        y, st = h3_core(q, k, v, b, c, d, ssm, rest[5], impl=impl, initial_state=rest[6], return_state=True)
        loss = (y * w).sum() + (st * w_state.conj()).real.sum()
        return torch.autograd.grad(loss, leaves)

    for gf, gr in zip(grads("torch"), grads("reference")):
        torch.testing.assert_close(gf, gr, rtol=1e-8, atol=1e-10)


def test_dispatch_is_explicit(caplog):
    C, L = 2, 10
    sB, sC, sD, raw, D = _params(C)
    ssm = discretize_diagonal(*raw)
    q = k = v = torch.randn(1, C, L)
    with pytest.raises(RuntimeError, match="triton"):
        h3_core(q, k, v, sB, sC, sD, ssm, D, impl="triton")
    with pytest.raises(ValueError):
        h3_core(q, k, v, sB, sC, sD, ssm, D, impl="fast")
    sys.modules["hippo.kernels.h3_core"]._auto_logged.clear()
    with caplog.at_level(logging.INFO, logger="hippo.kernels.h3_core"):
        h3_core(q, k, v, sB, sC, sD, ssm, D)
        h3_core(q, k, v, sB, sC, sD, ssm, D)
    assert sum("picked 'torch'" in r.getMessage() for r in caplog.records) == 1


LAYER_RTOL, LAYER_ATOL = 2e-4, 2e-5
"""conv_impl="auto" against "reference" in one H3 layer, fp32: outputs and gradients."""


def assert_layer_auto_matches_reference(layer, u: torch.Tensor) -> None:
    """The layer's output, input gradient and two SSM-parameter gradients agree between the impl
    `auto` picks and the FFT reference path (the GPU tier runs this on CUDA)."""
    outs = {}
    for impl in ("auto", "reference"):
        layer.conv_impl = impl
        layer.zero_grad()
        u.grad = None
        y = layer(u)
        y.square().sum().backward()
        outs[impl] = (y.detach(), u.grad.clone(), layer.diag_ssm.log_dt.grad.clone(), layer.shift_ssm.B.grad.clone())
    for a, b in zip(outs["auto"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=LAYER_RTOL, atol=LAYER_ATOL)


def test_h3_module_routes_through_selectable_impl():
    from hippo.pretrain.models import H3

    torch.manual_seed(0)
    layer = H3(32, 64, layer_idx=0)
    assert_layer_auto_matches_reference(layer, torch.randn(2, 300, 32, requires_grad=True))
