"""The H3 layer (Fu, Dao et al., "Hungry Hungry Hippos"), head_dim 1.

    Q, K, V = linear maps of u
    K' = ShiftSSM(K)                (a learned 64-tap causal filter per channel, + skip)
    S  = DiagonalSSM(K' * V)        (S4D-Lin long convolution per channel, + skip)
    out = W_o (Q * S)

Q, K, V are column-parallel and W_o row-parallel, and both SSMs work per channel, so a
tensor-parallel rank runs the whole layer on its d_model / TP channels with no communication
until W_o. Under context parallelism a rank runs its chunk of the sequence: the shift SSM's
history comes from the chunks before it and the diagonal SSM's incoming state from a scan over
them (`_chunk_of_sequence`; it needs states, so it runs the chunked path, never Triton).

Packed documents (`doc_start`, (B, L) bool, True where a document begins): every path isolates
them exactly (`kernels.documents`): the core, the prefill's stored states (the last document's
inputs only), the chunk of a split sequence (halo starts and state carries gathered from the
other ranks), and the decode step, which zeroes both states of the rows that
`InferenceParams.doc_reset` marks before feeding their token.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hippo.kernels import (
    TritonUnavailableError,
    after_last_start,
    h3_core,
)
from hippo.pretrain.models.config import ConfigError
from hippo.pretrain.models.inference import InferenceParams
from hippo.pretrain.models.linear import SINGLE_PROCESS, Linears
from hippo.pretrain.models.ssm import DiagonalSSM, ShiftSSM


# `model.conv_impl` -> the `kernels.h3_core` impl that runs it (the kernels call the chunked
# state-passing path "torch").
CONV_IMPLS = {"auto": "auto", "triton": "triton", "chunked": "torch", "reference": "reference"}


class H3(nn.Module):
    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        *,
        layer_idx: int,
        linears: Linears = SINGLE_PROCESS,
        conv_impl: str = "auto",
    ):
        super().__init__()
        if conv_impl not in CONV_IMPLS:
            raise ConfigError(f"model.conv_impl must be one of {list(CONV_IMPLS)}, got {conv_impl!r}")
        # Convolution-mode path of the SSM core (`model.conv_impl`): "auto" is Triton FlashConv
        # where it can run on the GPU, else the chunked path; "reference" the full-length FFT oracle.
        self.conv_impl = conv_impl
        self.layer_idx = layer_idx
        self.q_proj = linears.column(d_model, d_model, bias=True)
        self.k_proj = linears.column(d_model, d_model, bias=True)
        self.v_proj = linears.column(d_model, d_model, bias=True)
        channels = linears.local(d_model, "model.d_model")
        self.shift_ssm = ShiftSSM(channels, d_state)
        self.diag_ssm = DiagonalSSM(channels, d_state)
        self.out_proj = linears.row(d_model, d_model, bias=True)
        self.sequence = linears.sequence

    def forward(
        self, u: torch.Tensor, inference_params: InferenceParams | None = None, *, doc_start: torch.Tensor | None = None
    ) -> torch.Tensor:
        """u: (B, L, D) -> (B, L, D). With inference_params, prefill (offset 0) or step (offset > 0).
        doc_start: optional (B, L) bool document starts (this rank's chunk under context parallelism)."""
        if inference_params is not None and inference_params.seqlen_offset > 0:
            return self._step(u, inference_params)
        q, k, v = (p(u).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, D, L)
        sh, dg = self.shift_ssm, self.diag_ssm
        prefill = inference_params is not None
        discrete = dg.discrete()
        if self.sequence.split and not prefill:
            return self.out_proj(self._chunk_of_sequence(q, k, v, discrete, doc_start).transpose(1, 2))
        # y = q * DiagSSM(ShiftSSM(k) * v); a prefill also gets the diagonal state at the end.
        out = self._core(q, k, v, discrete, return_state=prefill, doc_start=doc_start)
        if prefill:
            y, diag_state = out
            # Decode state: the shift SSM's last inputs in a ring with its taps, the diagonal
            # state with its discretized SSM (weights do not change while generating); with
            # documents, only the last one's inputs.
            window = k if doc_start is None else k * after_last_start(doc_start).unsqueeze(1)
            inference_params.states[self.layer_idx] = (
                sh.ring_from_prefix(window), sh.ring_taps(), dg.decode_state(diag_state, discrete), dg.decoder(discrete)
            )
        else:
            y = out
        return self.out_proj(y.transpose(1, 2))

    def _core(self, q, k, v, discrete, *, return_state: bool, doc_start=None):
        # The SSM parameters go in as fp32 whatever the activations' dtype: the dynamics are fp32
        # tensors even under bf16 training (`parallel.engine`), and the kernels' taps come from them.
        sh, dg = self.shift_ssm, self.diag_ssm
        try:
            return h3_core(q, k, v, sh.B.float(), sh.C.float(), sh.D.float(), discrete, dg.D.float(),
                           impl=CONV_IMPLS[self.conv_impl], return_state=return_state, doc_start=doc_start)
        except TritonUnavailableError as e:  # raised before any work: the path choice, not the math
            raise ConfigError(
                f"model.conv_impl='triton' cannot run here: {e.reason}; "
                "set model.conv_impl to 'auto' (Triton where it can run, else chunked) or 'chunked'"
            ) from e

    def _chunk_of_sequence(self, q, k, v, discrete, doc_start=None) -> torch.Tensor:
        """This rank's chunk of a sequence split over ranks (`SequenceSplit`): the shift SSM
        reads the previous chunk's last N - 1 inputs (the halo, put before the chunk with zero q
        and v, so it adds nothing to the diagonal state); the diagonal SSM runs from a zero
        state and the true incoming state's response is added in closed form. With documents,
        the halo's starts come along (no tap crosses them), the scan carries nothing out of a
        chunk with a start, and the incoming response stops at this chunk's first start."""
        seq = self.sequence
        W = self.shift_ssm.B.shape[-1] - 1
        halo = seq.history(k, W)
        zeros = q.new_zeros(*q.shape[:-1], W)
        q_ext, k_ext, v_ext = (torch.cat((a, b), dim=-1) for a, b in ((zeros, q), (halo, k), (zeros, v)))
        carries = starts_ext = None
        if doc_start is not None:
            halo_starts, carries = seq.documents(doc_start, W)
            starts_ext = torch.cat((halo_starts, doc_start), dim=-1)
        y, final_state = self._core(q_ext, k_ext, v_ext, discrete, return_state=True, doc_start=starts_ext)
        T = q.shape[-1]
        response = seq.incoming_response(final_state, discrete, T, doc_start, carries)
        return y[..., W:] + q * response.to(y.dtype)

    def _step(self, u: torch.Tensor, inference_params: InferenceParams) -> torch.Tensor:
        """u: (B, 1, D): one token (at position seqlen_offset) through both recurrences, whose
        states are updated in place."""
        window, taps, diag_state, decoder = inference_params.states[self.layer_idx]
        reset = getattr(inference_params, "doc_reset", None)
        if reset is not None:  # these rows' token starts a new document: nothing before it counts
            window.mul_(~reset)
            diag_state.mul_((~reset).unsqueeze(-1))
        x = u[:, 0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        k = self.shift_ssm.ring_step(window, taps, k, inference_params.seqlen_offset)
        s = self.diag_ssm.decode_step(diag_state, decoder, k * v)
        return self.out_proj(q * s).unsqueeze(1)
