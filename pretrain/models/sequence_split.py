"""Context parallelism as the models see it: this rank holds one contiguous chunk of every sequence.

A sequence of L tokens is split over the `size` ranks of a context-parallel group into chunks
of L / size; rank r holds positions [r L/size, (r+1) L/size). The layers exchange only what
their math needs (`parallel.context_parallel` supplies the one collective, a differentiable
all-gather over the group):

- the shift SSM, the last `width` inputs before the chunk (its halo);
- the diagonal SSM, its (B, C, N/2) state: each chunk runs from a zero state, the states after
  every chunk are gathered, and an exclusive scan (`kernels.incoming_states`) gives each rank
  its true incoming state, whose effect on the chunk's outputs is added in closed form
  (`kernels.diagonal_output_from_state`). Neither grows with L;
- attention, the keys and values of the chunks before it (exact causal attention).

Packed documents (`doc_start`, this rank's slice of the whole sequence's map): `documents` gathers,
with one collective, the starts in the halo (no shift tap crosses them) and which chunks hold a
start (the state scan carries nothing out of those); the incoming state's response stops at this
chunk's first start (`kernels.before_first_start`, in `incoming_response`).

Gradients flow back through the all-gather's backward (a reduce-scatter) to the ranks the
values came from. The default, `SINGLE_SEQUENCE`, holds whole sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hippo.kernels import DiscreteDiagonalSSM, before_first_start, diagonal_output_from_state, incoming_states

AllGather = Callable[[torch.Tensor], torch.Tensor]
"""x (any shape, the same on every rank) -> (size, *x.shape): every rank's x in rank order,
differentiable (each rank's gradient returns to the rank its slot came from)."""


@dataclass(frozen=True)
class SequenceSplit:
    rank: int = 0
    size: int = 1
    all_gather: AllGather | None = None

    @property
    def split(self) -> bool:
        return self.size > 1

    def offset(self, chunk_length: int) -> int:
        """Position of this rank's first token in the whole sequence."""
        return self.rank * chunk_length

    def history(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """The `width` positions of x (B, C, T) just before this rank's chunk, zeros before the
        sequence starts: (B, C, width). Chunks shorter than `width` take it from several ranks."""
        tail = x[..., -min(width, x.shape[-1]):].contiguous()
        tails = self.all_gather(tail)[: self.rank]  # (r, B, C, w): the previous chunks' tails
        # (B, C, r w) in sequence order; on rank 0 an empty slice, still on the autograd path:
        # every rank must run the gather's backward (a collective), used or not.
        before = tails.permute(1, 2, 0, 3).reshape(*x.shape[:-1], -1)[..., -width:]
        return torch.nn.functional.pad(before, (width - before.shape[-1], 0))

    def incoming_response(
        self,
        final_state: torch.Tensor,
        ssm: DiscreteDiagonalSSM,
        chunk_length: int,
        doc_start: torch.Tensor | None = None,
        carries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The diagonal SSM's (B, C, T) response on this rank's chunk to its true incoming state,
        from every chunk's state after it when run from zero (final_state: (B, C, N/2) complex,
        this rank's; with documents, the state after the chunk's last start). With documents
        (`doc_start`, and carries: (rank + 1, B) bool from `documents`) the response stops at the
        chunk's first start."""
        finals = torch.view_as_complex(self.all_gather(torch.view_as_real(final_state.contiguous())))
        incoming = incoming_states(finals[: self.rank + 1], ssm.dA, chunk_length, carries)[self.rank]
        response = diagonal_output_from_state(incoming, ssm, chunk_length)
        return response if doc_start is None else response * before_first_start(doc_start).unsqueeze(1)

    def documents(self, doc_start: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """From this rank's (B, T) starts: the (B, width) starts just before the chunk (False before
        the sequence), and (rank + 1, B) bool whether each chunk up to this one carries its
        incoming state through (holds no start). One all-gather of (B, width + 1) numbers."""
        B, T = doc_start.shape
        tail = doc_start[:, T - min(width, T) :]
        mine = torch.cat((tail, ~doc_start.any(-1, keepdim=True)), dim=-1).to(torch.float32)
        everyone = self.all_gather(mine).bool()  # (size, B, w + 1)
        before = everyone[: self.rank, :, :-1].permute(1, 0, 2).reshape(B, -1)
        before = before[:, before.shape[-1] - min(width, before.shape[-1]) :]
        halo = torch.nn.functional.pad(before, (width - before.shape[-1], 0))
        return halo, everyone[: self.rank + 1, :, -1]

    def dropout(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        """Dropout on (B, T, D) hidden states with the masks one process draws for these positions:
        the whole sequence's mask is drawn (same generator, same draws as `F.dropout` on
        (B, size T, D)) and this rank's rows kept."""
        if not (self.split and training and p > 0):
            return torch.nn.functional.dropout(x, p, training)
        B, T, D = x.shape
        noise = x.new_empty(B, T * self.size, D).bernoulli_(1 - p)[:, self.rank * T : (self.rank + 1) * T]
        return x * noise.div_(1 - p)

    def preceding(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """x of every rank up to and including this one, concatenated along `dim` in sequence
        order (attention's keys and values)."""
        return torch.cat(self.all_gather(x.contiguous())[: self.rank + 1].unbind(0), dim=dim)


SINGLE_SEQUENCE = SequenceSplit()
