"""FlashConv: long convolutions and the SSM kernels of H3. Imports only torch (and triton)."""

from kernels.fftconv import fft_size, fftconv, fftconv_ref
from kernels.ssm import (
    DiscreteDiagonalSSM,
    diagonal_kernel,
    diagonal_state_from_prefix,
    diagonal_step,
    discretize_diagonal,
    shift_kernel,
    shift_state_from_prefix,
    shift_step,
)

__all__ = [
    "DiscreteDiagonalSSM",
    "diagonal_kernel",
    "diagonal_state_from_prefix",
    "diagonal_step",
    "discretize_diagonal",
    "fft_size",
    "fftconv",
    "fftconv_ref",
    "shift_kernel",
    "shift_state_from_prefix",
    "shift_step",
]
