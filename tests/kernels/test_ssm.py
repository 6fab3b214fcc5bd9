"""SSM kernel generators vs their definitions, and convolution vs token-by-token recurrence."""

import math

import pytest
import torch

from hippo.kernels import (
    DiscreteDiagonalSSM,
    dA_powers,
    diagonal_kernel,
    diagonal_state_from_prefix,
    discretize_diagonal,
    fftconv,
    shift_kernel,
)
from tests.kernels.ssm_ref import diagonal_step_ref, shift_state_from_prefix_ref, shift_step_ref

C_, N = 3, 8


def _diag_params(dtype=torch.float64, channels=C_, modes=N // 2, seed=0):
    g = torch.Generator().manual_seed(seed)
    log_dt = torch.empty(channels, dtype=dtype).uniform_(math.log(1e-3), math.log(1e-1), generator=g)
    log_A_real = torch.full((channels, modes), math.log(0.5), dtype=dtype)
    A_imag = math.pi * torch.arange(modes, dtype=dtype).expand(channels, modes).clone()
    B = torch.randn(channels, modes, 2, dtype=dtype, generator=g)
    C = torch.randn(channels, modes, 2, dtype=dtype, generator=g)
    return log_dt, log_A_real, A_imag, B, C


def test_shift_kernel_definition():
    B = torch.randn(C_, N, dtype=torch.float64)
    Cs = torch.randn(C_, N, dtype=torch.float64)
    k = shift_kernel(B, Cs, 12)
    assert k.shape == (C_, 12)
    for c in range(C_):
        for l in range(12):
            expect = sum(B[c, n] * Cs[c, n + l] for n in range(N - l)) if l < N else 0.0
            assert abs(k[c, l] - expect) < 1e-12
    assert shift_kernel(B, Cs, 5).shape == (C_, 5)


def test_shift_kernel_equals_C_when_B_is_e1():
    B = torch.zeros(C_, N)
    B[:, 0] = 1
    Cs = torch.randn(C_, N)
    torch.testing.assert_close(shift_kernel(B, Cs, N), Cs)


def test_diagonal_kernel_definition_float64():
    ssm = discretize_diagonal(*_diag_params())
    L = 50
    k = diagonal_kernel(ssm, L)
    log_dt, log_A_real, A_imag, B, C = _diag_params()
    for c in range(C_):
        dt = math.exp(log_dt[c])
        for l in (0, 1, 7, 49):
            total = 0
            for n in range(N // 2):
                A = complex(-math.exp(log_A_real[c, n]), A_imag[c, n])
                dA = (1 + dt * A / 2) / (1 - dt * A / 2)
                dB = complex(B[c, n, 0], B[c, n, 1]) * dt / (1 - dt * A / 2)
                total += complex(C[c, n, 0], C[c, n, 1]) * dB * dA**l
            assert abs(k[c, l].item() - 2 * total.real) < 1e-10


@pytest.mark.parametrize("L", [1, 5, 64, 100])
def test_shift_conv_equals_recurrence(L):
    x = torch.randn(2, C_, L, dtype=torch.float64)
    B = torch.randn(C_, N, dtype=torch.float64)
    Cs = torch.randn(C_, N, dtype=torch.float64)
    D = torch.randn(C_, dtype=torch.float64)
    conv = fftconv(x, shift_kernel(B, Cs, L), D)
    state = torch.zeros(2, C_, N, dtype=torch.float64)
    for t in range(L):
        y, state = shift_step_ref(state, x[..., t], B, Cs, D)
        assert torch.allclose(y, conv[..., t], atol=1e-10)
    torch.testing.assert_close(shift_state_from_prefix_ref(x, B), state)


@pytest.mark.parametrize("L", [1, 5, 64, 300])
def test_diagonal_conv_equals_recurrence(L):
    ssm = discretize_diagonal(*_diag_params())
    x = torch.randn(2, C_, L, dtype=torch.float64)
    D = torch.randn(C_, dtype=torch.float64)
    conv = fftconv(x, diagonal_kernel(ssm, L), D)
    state = torch.zeros(2, C_, N // 2, dtype=torch.complex128)
    for t in range(L):
        y, state = diagonal_step_ref(state, x[..., t], ssm, D)
        assert torch.allclose(y, conv[..., t], atol=1e-9)
    torch.testing.assert_close(diagonal_state_from_prefix(x, ssm), state)


def test_diagonal_prefix_state_blocked_and_with_initial_state():
    ssm = discretize_diagonal(*_diag_params())  # 70 positions: two blocks of 64
    x = torch.randn(2, C_, 70, dtype=torch.float64)
    x0 = torch.randn(2, C_, N // 2, dtype=torch.complex128)
    state = x0
    for t in range(70):
        state = ssm.dA * state + ssm.dB * x[..., t, None]
    torch.testing.assert_close(diagonal_state_from_prefix(x, ssm, x0), state)


@pytest.mark.parametrize("exponents", [range(5), range(64), range(65), range(3, 1000), range(0, 4096, 64), range(7, 8)])
def test_dA_powers_match_repeated_products(exponents):
    """Every way `dA_powers` forms a range (each power in polar form, or polar anchors times a
    running product) agrees with float64 repeated products to rounding, returned in complex128."""
    dA = discretize_diagonal(*_diag_params()).dA.to(torch.complex64)  # powers of this exact value
    got = dA_powers(dA, exponents)
    assert got.dtype == torch.complex128 and got.shape == (*dA.shape, len(exponents))
    z, prod = dA.to(torch.complex128), torch.ones(dA.shape, dtype=torch.complex128)
    for e in range(exponents.stop):  # ~e roundings: 1e-13 at e = 4K
        if e in exponents:
            torch.testing.assert_close(got[..., exponents.index(e)], prod, rtol=1e-12, atol=0)
        prod = prod * z


def test_kernel_gradcheck():
    params = [p.requires_grad_() for p in _diag_params(modes=2, channels=2)]

    def f(*ps):
        return diagonal_kernel(discretize_diagonal(*ps), 6)

    assert torch.autograd.gradcheck(f, params)
    B = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    Cs = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b, c: shift_kernel(b, c, 6), (B, Cs))


# ------------------------------------------- blocked diagonal kernel (issue 13): no Vandermonde
def _kernel_unblocked(ssm, length):
    """The previous `diagonal_kernel`: materializes the (C, N/2, L) complex Vandermonde."""
    steps = torch.arange(length, device=ssm.dA.device)
    vandermonde = torch.exp(torch.log(ssm.dA).unsqueeze(-1) * steps.to(ssm.dA.real.dtype))
    return 2 * torch.einsum("cn,cnl->cl", ssm.C * ssm.dB, vandermonde).real


@pytest.mark.parametrize("block", [64, 7])
@pytest.mark.parametrize("L", [1, 6, 64, 100, 128, 300])
def test_diagonal_kernel_matches_unblocked_formula_float64(monkeypatch, block, L):
    """Values and gradients of every SSM parameter equal the unblocked formula's (float64),
    for L below, equal to, a multiple of and not a multiple of the block."""
    import hippo.kernels.ssm as ssm_mod

    monkeypatch.setattr(ssm_mod, "_KERNEL_BLOCK", block)
    results = []
    for fn in (diagonal_kernel, _kernel_unblocked):
        params = [p.clone().requires_grad_() for p in _diag_params(channels=4, modes=6, seed=1)]
        k = fn(discretize_diagonal(*params), L)
        upstream = torch.randn(k.shape, dtype=k.dtype, generator=torch.Generator().manual_seed(2))
        grads = torch.autograd.grad((k * upstream).sum(), params)
        results.append((k, grads))
    (k_new, g_new), (k_old, g_old) = results
    assert k_new.shape == (4, L) and k_new.dtype == torch.float64
    torch.testing.assert_close(k_new, k_old, rtol=1e-10, atol=1e-10)
    for a, b in zip(g_new, g_old):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("L", [1, 3, 11])
def test_diagonal_kernel_gradcheck_complex_inputs(monkeypatch, L):
    """First and second derivatives w.r.t. the complex dA, dB, C (block 4: L inside one block,
    and across blocks with a partial last one)."""
    import hippo.kernels.ssm as ssm_mod

    monkeypatch.setattr(ssm_mod, "_KERNEL_BLOCK", 4)
    g = torch.Generator().manual_seed(3)
    r = torch.rand(2, 3, dtype=torch.float64, generator=g) * 0.5 + 0.4
    theta = torch.rand(2, 3, dtype=torch.float64, generator=g) * 3
    dA = torch.polar(r, theta).requires_grad_()
    dB = torch.randn(2, 3, dtype=torch.complex128, generator=g).requires_grad_()
    C = torch.randn(2, 3, dtype=torch.complex128, generator=g).requires_grad_()

    def f(dA, dB, C):
        return diagonal_kernel(DiscreteDiagonalSSM(dA=dA, dB=dB, C=C), L)

    assert torch.autograd.gradcheck(f, (dA, dB, C))
    assert torch.autograd.gradgradcheck(f, (dA, dB, C))


def _saved_bytes(fn):
    """Bytes of the distinct tensors autograd saves for backward while running fn()."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_diagonal_kernel_saves_no_vandermonde():
    """Autograd keeps O(C N) bytes, not the (C, N/2, L) complex Vandermonde (C N/2 L 8 bytes)."""
    channels, modes, L = 64, 32, 2048
    params = [p.float().requires_grad_() for p in _diag_params(channels=channels, modes=modes)]
    vandermonde_bytes = channels * modes * L * 8
    ssm = discretize_diagonal(*params)
    k, saved = _saved_bytes(lambda: diagonal_kernel(ssm, L))
    assert k.shape == (channels, L)
    # The old formula saved the Vandermonde itself (1x) and more; the blocked kernel saves C dB
    # and dA: 2 * C * N/2 * 8 bytes = 32 KiB here, vs 32 MiB.
    assert saved <= 4 * channels * modes * 8 < vandermonde_bytes / 100, saved
    k.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)

