"""Token-by-token oracles for the SSMs' decode paths (`kernels.ssm`'s ring and decode steps).

The plain recurrences of the H3 reference: a shifted (batch, channels, N) state for the shift SSM
and state' = dA state + dB x for the diagonal SSM. Generation runs the ring window and the
in-place decode state instead; these say what those must compute.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hippo.kernels import DiscreteDiagonalSSM, fftconv


def shift_step_ref(
    state: torch.Tensor, x: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token through the shift SSM.

    Args:
        state: (batch, channels, N), state[..., n] = sum_{m<=n} B[n-m] x_{t-1-m}.
        x: (batch, channels), the token x_t.
    Returns:
        y (batch, channels) = sum_n C * state' + D * x, and state' = shift_right(state) + B x.
    """
    new_state = F.pad(state[..., :-1], (1, 0)) + B * x.unsqueeze(-1)
    y = (C * new_state).sum(-1) + D * x
    return y, new_state


def shift_state_from_prefix_ref(x: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Shift-SSM state after consuming a whole prefix, from its last N inputs.

    state[n] = sum_{m<=n} B[n-m] x[L-1-m]: a causal convolution of the reversed tail with B.

    Args:
        x: (batch, channels, L) prefix, any L >= 1.
        B: (channels, N).
    Returns:
        (batch, channels, N) in B's dtype.
    """
    N = B.shape[-1]
    tail = x[..., -N:].flip(-1)
    if tail.shape[-1] < N:
        tail = F.pad(tail, (0, N - tail.shape[-1]))
    return fftconv(tail.to(B.dtype), B)


def diagonal_step_ref(
    state: torch.Tensor, x: torch.Tensor, ssm: DiscreteDiagonalSSM, D: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token through the diagonal SSM.

    Args:
        state: (batch, channels, N/2) complex.
        x: (batch, channels) real.
    Returns:
        y (batch, channels) = 2 Re(sum_n C * state') + D x, and state' = dA state + dB x.
    """
    new_state = ssm.dA * state + ssm.dB * x.unsqueeze(-1)
    y = 2 * (ssm.C * new_state).sum(-1).real + D * x
    return y.to(x.dtype), new_state
