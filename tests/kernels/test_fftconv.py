"""fftconv against the direct float64 convolution, and its gradients."""

import pytest
import torch

from hippo.kernels import fft_size, fftconv, fftconv_ref


@pytest.mark.parametrize("length", [1, 63, 64, 1000, 4096])
def test_fftconv_matches_direct_float64(length):
    g = torch.Generator().manual_seed(length)
    u = torch.randn(2, 3, length, generator=g)
    k = torch.randn(3, length, generator=g) / length**0.5
    D = torch.randn(3, generator=g)
    y = fftconv(u, k, D)
    ref = fftconv_ref(u.double(), k.double(), D.double())
    assert y.dtype == torch.float32 and y.shape == u.shape
    rel = (y.double() - ref).norm() / ref.norm()
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("kernel_length", [1, 5, 64, 300])
def test_short_and_long_kernels(kernel_length):
    u = torch.randn(4, 2, 100, dtype=torch.float64)
    k = torch.randn(2, kernel_length, dtype=torch.float64)
    torch.testing.assert_close(fftconv(u, k), fftconv_ref(u, k), rtol=1e-10, atol=1e-10)


def test_any_leading_shape_and_no_skip():
    u = torch.randn(2, 3, 4, 37, dtype=torch.float64)
    k = torch.randn(4, 37, dtype=torch.float64)
    torch.testing.assert_close(fftconv(u, k), fftconv_ref(u, k))


def test_direct_reference_against_explicit_sum():
    """The oracle itself, checked against the definition on a tiny case."""
    u = torch.randn(1, 2, 9, dtype=torch.float64)
    k = torch.randn(2, 9, dtype=torch.float64)
    D = torch.randn(2, dtype=torch.float64)
    ref = fftconv_ref(u, k, D)
    for c in range(2):
        for l in range(9):
            expect = sum(k[c, j] * u[0, c, l - j] for j in range(l + 1)) + D[c] * u[0, c, l]
            assert abs(ref[0, c, l] - expect) < 1e-12


def test_bf16_input_returns_bf16_with_fp32_fft():
    u = torch.randn(2, 4, 256)
    k = torch.randn(4, 256) / 16
    y = fftconv(u.bfloat16(), k, None)
    assert y.dtype == torch.bfloat16
    ref = fftconv_ref(u.bfloat16().double(), k.double())
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-2


def test_gradcheck():
    u = torch.randn(2, 3, 17, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 17, dtype=torch.float64, requires_grad=True)
    D = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fftconv, (u, k, D))


def test_fft_size_is_power_of_two_and_large_enough():
    for L, Lk in [(1, 1), (63, 63), (64, 5), (1000, 1000)]:
        n = fft_size(L, Lk)
        assert n & (n - 1) == 0 and n >= L + min(L, Lk) - 1
