"""State passing across ranks: a sequence split into contiguous chunks (one per rank, under
context parallelism), each run from a zero state, with only the (B, C, N/2) diagonal-SSM states
crossing between chunks (`pretrain.models.sequence_split`). With x the true state before a chunk:

    y[l] += 2 Re(sum_n C_n dA_n^(l+1) x_n)                   (`diagonal_output_from_state`)
    x_in[r] = dA^T x_in[r-1] + final[r-1]                      (`incoming_states`)

With packed documents a chunk holding a start passes nothing from before it (`carries`), and the
incoming state's response stops at the chunk's first start (the caller masks it).

Powers of dA come from `kernels.ssm.dA_powers`. The chunked single-sequence algorithm (FFT per
chunk) that these closed forms come from is an oracle in `tests/kernels/state_passing_ref.py`.
"""

from __future__ import annotations

import torch

from hippo.kernels.ssm import DiscreteDiagonalSSM, dA_powers

__all__ = ["diagonal_output_from_state", "incoming_states"]

# Inner block of the factored powers: dA^(aP + b + 1) = dA^(aP) dA^(b+1).
_VANDER_BLOCK = 64


def diagonal_output_from_state(state: torch.Tensor, ssm: DiscreteDiagonalSSM, length: int) -> torch.Tensor:
    """What a state x before position 0 adds to the outputs: 2 Re(sum_n C_n dA_n^(l+1) x_n), l < length.

    Blocked like `kernels.ssm.diagonal_kernel` (dA^(aP + b + 1) = dA^(aP) dA^(b+1)): one real batched
    product, no (C, N/2, L) Vandermonde. state: (B, C, N/2) complex. Returns (B, C, length) in
    the real dtype of dA.
    """
    P = min(_VANDER_BLOCK, length)
    A = -(-length // P)
    rdtype = ssm.dA.real.dtype
    big = dA_powers(ssm.dA, range(0, A * P, P)).to(ssm.dA.dtype)  # (C, N/2, A)
    small = dA_powers(ssm.dA, range(1, P + 1)).to(ssm.dA.dtype)  # (C, N/2, P)
    h = (state.to(ssm.dA.dtype) * ssm.C).unsqueeze(-1) * big  # (B, C, N/2, A)
    # 2 Re(h small) = 2 (h.re small.re - h.im small.im): real products over the stacked modes.
    left = torch.cat((h.real, -h.imag), dim=2).transpose(2, 3)  # (B, C, A, N)
    right = torch.cat((small.real, small.imag), dim=1)  # (C, N, P)
    out = 2 * torch.matmul(left, right.to(rdtype))  # (B, C, A, P)
    return out.reshape(*out.shape[:2], A * P)[..., :length]


def incoming_states(
    final_states: torch.Tensor, dA: torch.Tensor, chunk_length: int, carries: torch.Tensor | None = None
) -> torch.Tensor:
    """Exclusive scan over chunks: the true state before each chunk, from every chunk's state
    after it when started from zero (the SSM is linear in its incoming state):

        x_in[0] = 0,  x_in[r] = dA^T x_in[r-1] + final[r-1]   (T = chunk_length)

    final_states: (R, B, C, N/2) complex, one per chunk in sequence order. Returns the same shape.
    carries: optional (R, B) bool, False where chunk r holds a document start (packed documents):
    then nothing from before it passes (x_in[r+1] = final[r], the state after its last start).
    """
    decay = dA_powers(dA, range(chunk_length, chunk_length + 1))[..., 0].to(final_states.dtype)  # (C, N/2)
    # Zero, but derived from the inputs: the first chunk's state stays on the autograd path of
    # `final_states` (under context parallelism every rank must run the gather's backward).
    carried = final_states[:0].sum(0)
    states = []
    for r, final in enumerate(final_states):
        states.append(carried)
        through = decay if carries is None else decay * carries[r].view(-1, 1, 1)
        carried = carried * through + final
    return torch.stack(states)
