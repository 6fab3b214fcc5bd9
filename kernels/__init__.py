"""FlashConv: long convolutions and the SSM kernels of H3. Imports only torch (and triton).

The kernels run as PyTorch custom ops, namespace `hippo::` (`kernels.ops`).
"""

from hippo.kernels import ops

from hippo.kernels.documents import after_last_start, before_first_start, check_doc_start
from hippo.kernels.fftconv import fft_size, fftconv, fftconv_ref
from hippo.kernels.h3_core import (
    H3_CORE_IMPLS,
    TritonUnavailableError,
    diagonal_conv,
    h3_core,
    h3_core_ref,
    select_impl,
)
from hippo.kernels.ssm import (
    DiscreteDiagonalSSM,
    dA_powers,
    diagonal_kernel,
    diagonal_state_from_prefix,
    discretize_diagonal,
    shift_kernel,
)
from hippo.kernels.state_passing import diagonal_output_from_state, incoming_states

__all__ = [
    "after_last_start",
    "before_first_start",
    "check_doc_start",
    "diagonal_conv",
    "H3_CORE_IMPLS",
    "TritonUnavailableError",
    "diagonal_output_from_state",
    "incoming_states",
    "ops",
    "h3_core",
    "h3_core_ref",
    "DiscreteDiagonalSSM",
    "dA_powers",
    "diagonal_kernel",
    "diagonal_state_from_prefix",
    "discretize_diagonal",
    "fft_size",
    "fftconv",
    "fftconv_ref",
    "select_impl",
    "shift_kernel",
]
