"""The paper's S4D baseline mixer: a diagonal SSM per channel, GELU, gated (GLU) output map.

No shift SSM and no multiplicative Q/K/V interaction: the ablation that shows why H3 needs them.
Packed documents (`doc_start`) are isolated exactly as in H3 (`kernels.diagonal_conv`; the state
restarts at each start, in prefill, under context parallelism and at a decode step's `doc_reset`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hippo.kernels import after_last_start, diagonal_conv
from hippo.pretrain.models.inference import InferenceParams
from hippo.pretrain.models.linear import SINGLE_PROCESS, Linears
from hippo.pretrain.models.ssm import DiagonalSSM


class S4D(nn.Module):
    def __init__(
        self, d_model: int, d_state: int = 64, *, layer_idx: int, linears: Linears = SINGLE_PROCESS, glu: bool = True
    ):
        """`glu=False` gives the authors' synthetic-task S4D (safari `S4D` with `postact=None`): a plain
        d -> d output map, so the layer has no multiplicative interaction at all."""
        super().__init__()
        if linears.tp_size != 1:
            raise ValueError("the S4D baseline mixer does not support tensor parallelism")
        self.layer_idx = layer_idx
        self.ssm = DiagonalSSM(d_model, d_state)
        self.glu = glu
        self.out_proj = nn.Linear(d_model, 2 * d_model if glu else d_model)
        self.sequence = linears.sequence

    def forward(
        self, u: torch.Tensor, inference_params: InferenceParams | None = None, *, doc_start: torch.Tensor | None = None
    ) -> torch.Tensor:
        """u: (B, L, D) -> (B, L, D). doc_start: optional (B, L) bool document starts."""
        if inference_params is not None and inference_params.seqlen_offset > 0:
            state, decoder = inference_params.states[self.layer_idx]  # updated in place
            reset = getattr(inference_params, "doc_reset", None)
            if reset is not None:  # these rows' token starts a new document
                state.mul_((~reset).unsqueeze(-1))
            y = self.ssm.decode_step(state, decoder, u[:, 0]).unsqueeze(1)
        else:
            x = u.transpose(1, 2)
            discrete = self.ssm.discrete()
            if doc_start is None:
                y = self.ssm(x, discrete)
                last = x
            else:
                y = diagonal_conv(x, discrete, self.ssm.D, doc_start=doc_start)
                last = x * after_last_start(doc_start).unsqueeze(1)  # the state after: the last document's
            if self.sequence.split and inference_params is None:
                # A chunk of a sequence split over ranks: add the true incoming state's response.
                carries = None if doc_start is None else self.sequence.documents(doc_start, 0)[1]
                response = self.sequence.incoming_response(
                    self.ssm.state_from_prefix(last, discrete), discrete, x.shape[-1], doc_start, carries
                )
                y = y + response.to(y.dtype)
            y = y.transpose(1, 2)
            if inference_params is not None:
                # The discretized SSM is kept with the state, as H3 keeps its own.
                state = self.ssm.decode_state(self.ssm.state_from_prefix(last, discrete), discrete)
                inference_params.states[self.layer_idx] = (state, self.ssm.decoder(discrete))
        out = self.out_proj(F.gelu(y))
        return F.glu(out, dim=-1) if self.glu else out
