"""State passing (chunks of T, FFT size 2T: `state_passing_ref.chunked_conv_ref`) against the
full-length float64 computation, built on the package's kernel, prefix state and `dA_powers`."""

import pytest
import torch

from hippo.kernels import DiscreteDiagonalSSM, diagonal_kernel, diagonal_state_from_prefix, discretize_diagonal
from tests.kernels.state_passing_ref import chunked_conv_ref, full_conv_ref


def _ssm(C, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    log_dt = torch.empty(C, dtype=dtype).uniform_(-6.9, -2.3, generator=g)  # dt in [1e-3, 1e-1]
    log_A_real = torch.full((C, 32), -0.69, dtype=dtype)
    A_imag = torch.pi * torch.arange(32, dtype=dtype).expand(C, 32).clone()
    B = torch.zeros(C, 32, 2, dtype=dtype)
    B[..., 0] = 1
    Cc = torch.randn(C, 32, 2, generator=g, dtype=dtype) / 2**0.5
    return (log_dt, log_A_real, A_imag, B, Cc), torch.randn(C, generator=g, dtype=dtype)


def _c128(ssm):
    return DiscreteDiagonalSSM(*(t.detach().to(torch.complex128) for t in ssm))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_float32_kernel_matches_float64():
    raw, _ = _ssm(4)
    ssm = discretize_diagonal(*raw)
    for L in (1, 63, 1000, 8192):
        k = diagonal_kernel(ssm, L)
        assert k.shape == (4, L) and _rel(k, diagonal_kernel(_c128(ssm), L)) <= 1e-6


@pytest.mark.parametrize("L,T", [(50, 64), (130, 64), (1000, 128), (5000, 1024), (4096, 512), (3000, 8192)])
def test_chunks_match_full_length(L, T):
    """Full, partial and oversized chunks, with an initial state; output and final state."""
    raw, D = _ssm(3, seed=L)
    ssm = discretize_diagonal(*raw)
    g = torch.Generator().manual_seed(T)
    u = torch.randn(2, 3, L, generator=g)
    x0 = torch.complex(torch.randn(2, 3, 32, generator=g), torch.randn(2, 3, 32, generator=g))
    y, xT = chunked_conv_ref(u, ssm, D, chunk_size=T, initial_state=x0, return_state=True)
    y_ref, x_ref = full_conv_ref(
        u.double(), _c128(ssm), D.double(), initial_state=x0.to(torch.complex128), return_state=True
    )
    assert y.dtype == torch.float32 and _rel(y, y_ref) <= 1e-5
    assert ((xT - x_ref).abs().max() / x_ref.abs().max()).item() <= 1e-5


def _long_case(L, T):
    raw, D = _ssm(2, seed=7)
    ssm = discretize_diagonal(*raw)
    u = torch.randn(1, 2, L, generator=torch.Generator().manual_seed(L))
    y, xT = chunked_conv_ref(u, ssm, D, chunk_size=T, return_state=True)
    ssm64 = _c128(ssm)
    y_ref = full_conv_ref(u.double(), ssm64, D.double())
    x_ref = diagonal_state_from_prefix(u.double(), ssm64)
    return _rel(y, y_ref), ((xT - x_ref).abs().max() / x_ref.abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("L", [32768, 65536, 131072])
@pytest.mark.parametrize("T", [1024, 2048, 4096, 8192])
def test_long_sequences_float32_exact(L, T):
    """The issue's bar: float32 relative error <= 1e-5 at 32K..128K for T = 1K..8K."""
    err_y, err_x = _long_case(L, T)
    assert err_y <= 1e-5 and err_x <= 1e-5, (err_y, err_x)


def test_long_sequence_fast_tier():
    err_y, err_x = _long_case(16384, 2048)
    assert err_y <= 1e-5 and err_x <= 1e-5, (err_y, err_x)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_gradients_match_full_length_autograd(checkpoint):
    """Gradients w.r.t. u, D, the raw SSM parameters and x0, float64, checkpointed or not."""
    raw, D = _ssm(3, seed=11, dtype=torch.float64)
    g = torch.Generator().manual_seed(12)
    u = torch.randn(2, 3, 700, generator=g, dtype=torch.float64)
    x0 = torch.randn(2, 3, 32, generator=g, dtype=torch.complex128)
    w = torch.randn(2, 3, 700, generator=g, dtype=torch.float64)
    ws = torch.randn(2, 3, 32, generator=g, dtype=torch.complex128)

    def grads(fn, **kw):
        leaves = [t.clone().requires_grad_() for t in (u, D, *raw, x0)]
        ssm = discretize_diagonal(*leaves[2:7])
        y, xT = fn(leaves[0], ssm, leaves[1], initial_state=leaves[7], return_state=True, **kw)
        loss = (y * w).sum() + (xT * ws.conj()).real.sum()
        return torch.autograd.grad(loss, leaves)

    got = grads(chunked_conv_ref, chunk_size=128, checkpoint=checkpoint)
    for a, b in zip(got, grads(full_conv_ref)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


_MEMORY_PROBE = """
import sys, torch
from hippo.kernels import discretize_diagonal
from tests.kernels.state_passing_ref import chunked_conv_ref, full_conv_ref
from tests.kernels.test_state_passing import _ssm
torch.set_num_threads(1)
L, T = int(sys.argv[1]), int(sys.argv[2])
raw, D = _ssm(64, seed=3)
params = [p.clone().requires_grad_() for p in raw]
u = torch.randn(2, 64, L, requires_grad=True)
def rss(field):
    # VmHWM, not ru_maxrss: exec carries the parent's (pytest's) peak into ru_maxrss.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
base = rss("VmRSS")
ssm = discretize_diagonal(*params)
fn = full_conv_ref if T == 0 else (lambda *a: chunked_conv_ref(*a, chunk_size=T))
fn(u, ssm, D).sum().backward()
print(rss("VmHWM") - base)
"""


def _peak_rss_delta(L, T):
    """Peak resident bytes above the post-setup baseline of a fresh process running fwd+bwd."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(L), str(T)],
        cwd=root, env={**os.environ, "PYTHONPATH": root}, capture_output=True, text=True, check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_intermediate_memory_bounded_by_chunk_not_length():
    """Fwd+bwd peak (u: 2 x 64 channels) grows with L only by the O(L) tensors, not the FFTs.

    u, its gradient, y and the saved chunk inputs are O(L); the FFT buffers, spectra and the
    kernel are O(T). The full-length reference needs a length-L kernel and spectra.
    """
    io = 2 * 64 * 4  # bytes per unit of L for one (B, C, L) float32 tensor
    T = 1024
    small, big = _peak_rss_delta(8 * T, T), _peak_rss_delta(64 * T, T)
    full = _peak_rss_delta(64 * T, 0)
    # From 8K to 64K the chunked peak grows by at most ~8 u-sized tensors per extra position.
    assert big - small <= 8 * io * (64 - 8) * T, (small, big)
    # The probe tells the paths apart: the full-length reference peaks above the chunked path.
    # (Since the kernel lost its Vandermonde the margin is small and allocator-dependent: 63-191 MB
    # measured, under 2 u-sized tensors once, so no tighter bound holds reliably.)
    assert full > big, (full, big)
