"""Recurrent decoding (issue 17): the shift SSM's ring window and the diagonal SSM's in-place
decode state give the outputs of the full forward pass and of the earlier step functions
(`tests/kernels/ssm_ref.py`), also once the ring has wrapped (> N = 64 steps); a generation
prefill applies the LM head to the last position only."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hippo.kernels import diagonal_state_from_prefix, discretize_diagonal
from hippo.kernels.ssm import (
    diagonal_decode_state,
    diagonal_decode_step,
    diagonal_decoder,
    shift_ring_from_prefix,
    shift_ring_step,
    shift_ring_taps,
)
from hippo.pretrain.config import ModelConfig
from hippo.pretrain.models import H3, S4D, HippoLM, InferenceParams
from hippo.pretrain.models.generation import SamplingConfig, generate
from tests.helpers import ROOT
from tests.kernels.ssm_ref import diagonal_step_ref, shift_state_from_prefix_ref, shift_step_ref

TINY = dict(vocab_size=61, d_model=32, n_layer=3, n_head=4, d_state=64)
MODELS = {"h3": dict(TINY), "hybrid": dict(TINY, attn_layer_idx=[1]), "s4d": dict(TINY, mixer="s4d")}
N = 64  # d_state: the ring's length


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: on a shared 2-core machine a second intra-op thread only waits for a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _diag(channels: int, modes: int, dtype=torch.float64, gen=None):
    g = gen or torch.Generator().manual_seed(0)
    log_dt = torch.rand(channels, generator=g, dtype=dtype) * 4 - 7
    log_A_real = torch.randn(channels, modes, generator=g, dtype=dtype) * 0.3 - 0.7
    A_imag = torch.randn(channels, modes, generator=g, dtype=dtype) * 3
    B = torch.randn(channels, modes, 2, generator=g, dtype=dtype)
    C = torch.randn(channels, modes, 2, generator=g, dtype=dtype)
    return discretize_diagonal(log_dt, log_A_real, A_imag, B, C)


@pytest.mark.parametrize("prefix", [1, 5, 64, 100])
def test_shift_ring_step_equals_shift_step(prefix):
    """float64, 150 steps after the prefix: the ring wraps twice; outputs agree to round-off."""
    g = torch.Generator().manual_seed(prefix)
    Bt, C = 3, 5
    B, Cs, D = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((C, N), (C, N), (C,)))
    x = torch.randn(Bt, C, prefix + 150, generator=g, dtype=torch.float64)
    state = shift_state_from_prefix_ref(x[..., :prefix], B)
    window, taps = shift_ring_from_prefix(x[..., :prefix], N), shift_ring_taps(B, Cs, D)
    for t in range(prefix, x.shape[-1]):
        y_old, state = shift_step_ref(state, x[..., t], B, Cs, D)
        y_new = shift_ring_step(window, taps, x[..., t], t)
        torch.testing.assert_close(y_new, y_old, rtol=0, atol=1e-12)


@pytest.mark.parametrize("prefix", [1, 70])
def test_diagonal_decode_step_equals_diagonal_step(prefix):
    g = torch.Generator().manual_seed(prefix)
    Bt, C, M = 3, 5, 8
    ssm = _diag(C, M, gen=g)
    D = torch.randn(C, generator=g, dtype=torch.float64)
    x = torch.randn(Bt, C, prefix + 100, generator=g, dtype=torch.float64)
    state = diagonal_state_from_prefix(x[..., :prefix], ssm)
    s, dec = diagonal_decode_state(state, ssm), diagonal_decoder(ssm, D)
    for t in range(prefix, x.shape[-1]):
        y_old, state = diagonal_step_ref(state, x[..., t], ssm, D)
        y_new = diagonal_decode_step(s, dec, x[..., t])
        torch.testing.assert_close(y_new, y_old, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.transpose(0, 1) * ssm.dB, state)  # the state it stands for


def test_diagonal_decode_state_mode_with_zero_input_gain():
    """A mode with dB = 0 contributes nothing; its decode state stays finite (kept at 0)."""
    log_dt, log_A_real, A_imag = torch.zeros(2, dtype=torch.float64), torch.zeros(2, 3, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64)
    B = torch.randn(2, 3, 2, dtype=torch.float64)
    B[1, 2] = 0.0
    ssm = discretize_diagonal(log_dt, log_A_real, A_imag, B, torch.randn(2, 3, 2, dtype=torch.float64))
    D = torch.randn(2, dtype=torch.float64)
    x = torch.randn(4, 2, 30, dtype=torch.float64)
    state = diagonal_state_from_prefix(x[..., :10], ssm)
    s, dec = diagonal_decode_state(state, ssm), diagonal_decoder(ssm, D)
    for t in range(10, 30):
        y_old, state = diagonal_step_ref(state, x[..., t], ssm, D)
        torch.testing.assert_close(diagonal_decode_step(s, dec, x[..., t]), y_old)
    assert torch.isfinite(torch.view_as_real(s)).all()


def _old_h3_step(layer: H3, x: torch.Tensor, old: list) -> torch.Tensor:
    """The pre-issue-17 H3 step: shifted (B, C, N) state, `diagonal_step_ref` state."""
    q, k, v = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    sh, dg = layer.shift_ssm, layer.diag_ssm
    k, old[0] = shift_step_ref(old[0], k, sh.B, sh.C, sh.D)
    s, old[1] = diagonal_step_ref(old[1], k * v, dg.discrete(), dg.D)
    return layer.out_proj(q * s)


@pytest.mark.parametrize("prefix", [10, 100])
def test_h3_layer_decode_equals_previous_step_and_full_pass(prefix):
    """fp32 H3 layer: 140 decode steps (ring wraps twice) against the old step and the conv."""
    torch.manual_seed(0)
    layer = H3(32, 64, layer_idx=0).eval()
    u = torch.randn(2, prefix + 140, 32)
    with torch.no_grad():
        full = layer(u)
        params = InferenceParams(max_seqlen=u.shape[1], max_batch_size=2)
        layer(u[:, :prefix], params)
        k = layer.k_proj(u[:, :prefix]).transpose(1, 2)
        v = layer.v_proj(u[:, :prefix]).transpose(1, 2)
        sh, dg = layer.shift_ssm, layer.diag_ssm
        from hippo.kernels import fftconv, shift_kernel

        kv = fftconv(k, shift_kernel(sh.B, sh.C, prefix), sh.D) * v
        old = [shift_state_from_prefix_ref(k, sh.B), dg.state_from_prefix(kv)]
        for t in range(prefix, u.shape[1]):
            params.seqlen_offset = t
            new = layer(u[:, t : t + 1], params)[:, 0]
            torch.testing.assert_close(new, _old_h3_step(layer, u[:, t], old), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(new, full[:, t], rtol=1e-4, atol=2e-5)


def test_s4d_layer_decode_equals_previous_step_and_full_pass():
    torch.manual_seed(0)
    layer = S4D(32, 64, layer_idx=0).eval()
    u = torch.randn(2, 150, 32)
    with torch.no_grad():
        full = layer(u)
        params = InferenceParams(max_seqlen=150, max_batch_size=2)
        layer(u[:, :20], params)
        old = layer.ssm.state_from_prefix(u[:, :20].transpose(1, 2))
        for t in range(20, 150):
            params.seqlen_offset = t
            new = layer(u[:, t : t + 1], params)[:, 0]
            y_old, old = diagonal_step_ref(old, u[:, t], layer.ssm.discrete(), layer.ssm.D)
            ref = torch.nn.functional.glu(layer.out_proj(torch.nn.functional.gelu(y_old)), dim=-1)
            torch.testing.assert_close(new, ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(new, full[:, t], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("prefill", [30, 100])
def test_model_decoding_matches_full_pass_past_ring_wrap(name, prefill):
    """Whole models, fp32: 140 steps after the prefill, logits against one full forward."""
    torch.manual_seed(0)
    model = HippoLM(ModelConfig(**MODELS[name])).eval()
    ids = torch.randint(0, 61, (2, prefill + 140), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        params = InferenceParams(max_seqlen=ids.shape[1], max_batch_size=2)
        out = [model(ids[:, :prefill], params, last_only=True)]
        for t in range(prefill, ids.shape[1]):
            params.seqlen_offset = t
            out.append(model(ids[:, t : t + 1], params))
    stepped = torch.cat(out, dim=1)
    torch.testing.assert_close(stepped, full[:, prefill - 1 :], rtol=1e-4, atol=2e-5)


def test_generation_prefill_applies_the_lm_head_to_the_last_position_only(monkeypatch):
    torch.manual_seed(0)
    model = HippoLM(ModelConfig(**MODELS["hybrid"])).eval()
    seen = []
    real = model.embedding.logits

    def spy(h):
        seen.append(tuple(h.shape))
        return real(h)

    monkeypatch.setattr(model.embedding, "logits", spy)
    prompt = torch.randint(0, 61, (3, 50), generator=torch.Generator().manual_seed(2))
    generate(model, prompt, 5, SamplingConfig(greedy=True))
    assert seen == [(3, 1, 32)] * 5  # the prefill and each of the 4 steps: one position


def _bench():
    spec = importlib.util.spec_from_file_location("bench_generation", ROOT / "benchmarks" / "bench_generation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_prefill_is_last_position_only_and_counts_decode_bytes(monkeypatch):
    bench = _bench()
    torch.manual_seed(0)
    model = HippoLM(ModelConfig(**MODELS["hybrid"])).eval()
    seen = []
    real = model.embedding.logits
    monkeypatch.setattr(model.embedding, "logits", lambda h: seen.append(tuple(h.shape)) or real(h))
    prompt = torch.randint(0, 61, (4, 40), generator=torch.Generator().manual_seed(3))
    _, params, logits = bench.prefill(model, prompt, 8)
    assert seen == [(4, 1, 32)] and logits.shape == (4, model.cfg.padded_vocab_size)
    # Bytes a decode step at position 40 reads: every weight but the unused embedding rows'
    # position table (none here), the attention layer's K and V up to 41 positions, the states.
    by = bench.decode_step_bytes(model, params, 40)
    weights = 4 * sum(p.numel() for p in model.parameters())
    kv = 2 * 4 * 4 * 41 * 32  # K and V, batch 4, 41 positions, d_model 32
    h3_states = 2 * (4 * 32 * N * 4 + 4 * 32 * (N // 2) * 8)  # two H3 layers: ring + complex state
    assert by == {"weights": weights, "kv_cache": kv, "ssm_states": h3_states}


def test_benchmark_prefix_states_equal_prefills_of_the_shorter_prompts():
    """bench_generation derives the states after shorter prompts from one prefill of the longest:
    decoding from each (longest first, as the benchmark does; 70 steps, the ring wraps) gives the
    full forward pass's logits, and the next-token logits equal a prefill of the shorter prompt."""
    bench = _bench()
    torch.manual_seed(0)
    model = HippoLM(ModelConfig(**MODELS["hybrid"])).eval()
    ids = torch.randint(0, 61, (2, 170), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(ids)
        _, _, runs = bench.prefill_with_prefixes(model, ids[:, :100], 70, [70, 30])
        assert sorted(runs) == [30, 70, 100]
        for P in (100, 70, 30):
            params, logits = runs[P]
            torch.testing.assert_close(logits, model(ids[:, :P], last_only=True)[:, -1], rtol=1e-4, atol=2e-5)
            out = [logits[:, None]]
            for t in range(P, P + 70):
                params.seqlen_offset = t
                out.append(model(ids[:, t : t + 1], params))
            torch.testing.assert_close(torch.cat(out, 1), full[:, P - 1 : P + 70], rtol=1e-4, atol=2e-5)


def test_decoding_under_bf16_autocast_keeps_fp32_states():
    """As generation runs on a GPU (bf16 autocast): the ring taps (a conv1d) and the SSM reductions
    (bmm) stay fp32, and the steps follow the fp32 step within bf16 rounding."""
    torch.manual_seed(0)
    model = HippoLM(ModelConfig(**MODELS["hybrid"])).eval()
    ids = torch.randint(0, 61, (2, 90), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        params = InferenceParams(max_seqlen=90, max_batch_size=2)
        model(ids[:, :20], params, last_only=True)
        out = []
        for t in range(20, 90):
            params.seqlen_offset = t
            out.append(model(ids[:, t : t + 1], params))
    window, taps, state, decoder = params.states[0]
    assert window.dtype == taps.dtype == decoder.out.dtype == torch.float32 and state.dtype == torch.complex64
    with torch.no_grad():
        full = model(ids)[:, 20:]
    err = (torch.cat(out, 1).float() - full).abs().max() / full.abs().max()
    assert err < 0.05, err
