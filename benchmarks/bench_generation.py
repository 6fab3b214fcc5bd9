"""Generation: recurrent-mode tokens/s of 125M H3 / hybrid vs a 125M Transformer with a KV cache.

Default: the paper's setting (issue 17): batch 64, prompts of 512, 1024 and 1536 tokens, 128 new
tokens, fp32. Random weights (speed does not depend on them), random prompt ids, greedy decoding.
The prefill computes the last position's logits only (`last_only=True`: all positions' would be
~20 GB at batch 64 x 1536).

Each model is prefilled once, with the longest prompt (timed): a 125M prefill of 64 x 1536 tokens
takes minutes on 2 cores. The states after the shorter prompts come out of that same prefill
(`prefill_with_prefixes`; no test covers it: checked by hand against prefills of the shorter
prompts, see BENCHMARKS.md). Then, per prompt length (longest first), the decode rounds run interleaved across the
models, each from the same post-prompt state; decode tokens/s (prefill excluded) is the median
over the rounds; the table also lists every round and the ratio of the best rounds.

Per model and prompt it also prints the bytes one decode step must read (fp32 weights, the KV
cache of its attention layers up to that position, its SSM states; `decode_step_bytes`), the
best-case ratio to the Transformer those bytes allow, the same with the step's matmul FLOPs
counted at the machine's measured matmul rate, and (`--profile`) where a decode step's time goes.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_generation.py \\
        --batch 64 --prompts 512 1024 1536 --new 128 --rounds 3 --threads 2 --profile --out /tmp/gen.md
    # the earlier setting (batch 8, prompt 2048), with the H3 prefill also through the FFT reference:
    PYTHONPATH=. .venv/bin/python benchmarks/bench_generation.py --batch 8 --prompts 2048 --h3-ref-prefill
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch

from hippo.kernels import fftconv, shift_kernel
from hippo.pretrain.config import load_config
from hippo.pretrain.models import H3, CausalSelfAttention, HippoLM, InferenceParams

MODELS = ("transformer_125m", "h3_125m", "hybrid_125m")


def set_impl(model: torch.nn.Module, impl: str) -> None:
    for m in model.modules():
        if isinstance(m, H3):
            m.conv_impl = impl


def build(name: str, max_len: int) -> HippoLM:
    torch.manual_seed(0)
    cfg = load_config(f"configs/{name}.yaml").model
    if cfg.position_embedding == "learned":  # room for prompt + new tokens (same cost per step)
        cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, max_len))
    return HippoLM(cfg).eval()


@torch.no_grad()
def prefill(model: HippoLM, prompt: torch.Tensor, new: int) -> tuple[float, InferenceParams, torch.Tensor]:
    """(seconds, the state after the prompt, last position's logits (B, V)): the LM head runs
    on the last position only, as `generate` does it."""
    B, Lp = prompt.shape
    params = InferenceParams(max_seqlen=Lp + new, max_batch_size=B)
    t0 = time.perf_counter()
    logits = model(prompt, params, last_only=True)[:, -1]
    return time.perf_counter() - t0, params, logits


@torch.no_grad()
def prefill_with_prefixes(
    model: HippoLM, prompt: torch.Tensor, new: int, prefixes: list[int]
) -> tuple[float, float, dict[int, tuple[InferenceParams, torch.Tensor]]]:
    """One timed prefill of the whole prompt, plus the decode state (and next-token logits) that a
    prefill of each shorter prompt[:, :P] would leave, without running those prefills.

    The model is causal, so every layer's input at positions < P is the same in both. Attention
    layers: the first P positions of the KV cache are the prefix's (the prefix's params share
    the cache tensors; a decode from P writes only positions >= P, so decode the longest
    prompt first). H3 layers: hooks on k_proj / v_proj take their first P positions and build the
    ring window and diagonal state after P from them, as `H3.forward` does. Logits at P - 1: the
    LM head on the final norm's output there. Returns (prefill seconds without the hooks' work,
    the hooks' seconds, {P: (params, logits (B, V))} for every P in prefixes and the full length).
    """
    B, L = prompt.shape
    prefixes = sorted(p for p in prefixes if p < L)
    extra = {P: InferenceParams(max_seqlen=L + new, max_batch_size=B) for P in prefixes}
    last_h, pending, hook_s, hooks = {}, {}, [0.0], []

    def timed(fn):
        def wrapped(*a):
            t0 = time.perf_counter()
            fn(*a)
            hook_s[0] += time.perf_counter() - t0
        return wrapped

    for i, block in model.layers.items():
        mixer = block.mixer
        if isinstance(mixer, CausalSelfAttention):
            continue
        if not isinstance(mixer, H3):
            raise ValueError("prefill_with_prefixes handles H3 and attention mixers")
        idx = int(i)

        def on_k(mod, args, out, idx=idx):
            pending[idx] = out[:, : prefixes[-1]].transpose(1, 2)

        def on_v(mod, args, out, mixer=mixer, idx=idx):
            k, v = pending.pop(idx), out[:, : prefixes[-1]].transpose(1, 2)
            sh, dg = mixer.shift_ssm, mixer.diag_ssm
            discrete = dg.discrete()
            for P in prefixes:
                kv = fftconv(k[..., :P], shift_kernel(sh.B, sh.C, P), sh.D) * v[..., :P]
                state = dg.decode_state(dg.state_from_prefix(kv, discrete), discrete)
                extra[P].states[idx] = (sh.ring_from_prefix(k[..., :P]), sh.ring_taps(), state, dg.decoder(discrete))

        if prefixes:
            hooks += [mixer.k_proj.register_forward_hook(timed(on_k)),
                      mixer.v_proj.register_forward_hook(timed(on_v))]

    def on_norm(mod, args, out):
        for P in prefixes:
            last_h[P] = out[:, P - 1 : P].clone()

    if prefixes:
        hooks.append(model.norm_f.register_forward_hook(timed(on_norm)))
    try:
        seconds, params, logits = prefill(model, prompt, new)
    finally:
        for h in hooks:
            h.remove()
    attn = _attention_layers(model)
    for P in prefixes:
        for idx in attn:
            extra[P].states[idx] = params.states[idx]
    out = {P: (extra[P], model.embedding.logits(last_h[P])[:, -1]) for P in prefixes}
    out[L] = (params, logits)
    return seconds - hook_s[0], hook_s[0], out


@torch.no_grad()
def decode(model: HippoLM, params: InferenceParams, logits: torch.Tensor, start: int, new: int) -> float:
    """Seconds for `new` greedy tokens per sequence from the state after `start` tokens."""
    t0 = time.perf_counter()
    for i in range(new):
        token = logits.argmax(-1, keepdim=True)
        params.seqlen_offset = start + i
        logits = model(token, params)[:, -1]
    return time.perf_counter() - t0


def _attention_layers(model: HippoLM) -> set[int]:
    return {int(i) for i, b in model.layers.items() if isinstance(b.mixer, CausalSelfAttention)}


def snapshot(model: HippoLM, params: InferenceParams) -> dict:
    """Copies of the recurrent states a decode round changes in place. KV caches are not copied:
    a round writes only positions >= the prompt, which the next round overwrites first."""
    attn = _attention_layers(model)
    return {i: s if i in attn else tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in s)
            for i, s in params.states.items()}


def restore(model: HippoLM, params: InferenceParams, snap: dict) -> None:
    attn = _attention_layers(model)
    for i, s in snap.items():
        if i not in attn:
            for dst, src in zip(params.states[i], s):
                if isinstance(dst, torch.Tensor) and dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)


def decode_step_bytes(model: HippoLM, params: InferenceParams, pos: int) -> dict[str, int]:
    """Bytes one decode step at position `pos` must read, from the tensors themselves.

    weights: every parameter (the tied embedding once: it is the LM head), less a learned position
    table but the row in use; the SSMs' decode constants (ring taps, laid-out dA / C dB) are the
    size of their parameters and are not counted again. kv_cache: K and V of each attention layer
    at positions 0..pos. ssm_states: each H3 layer's ring window and diagonal state (read and
    written each step), S4D's diagonal state.
    """
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    pe = model.embedding.position
    if pe is not None:
        weights -= pe.weight.numel() * pe.weight.element_size() - pe.weight[0].numel() * pe.weight.element_size()
    attn = _attention_layers(model)
    kv = ssm = 0
    for i, s in params.states.items():
        if i in attn:
            k, v = s
            B, H, _, hd = k.shape
            kv += 2 * B * H * (pos + 1) * hd * k.element_size()
        elif isinstance(model.layers[str(i)].mixer, H3):
            window, _, state, _ = s
            ssm += window.numel() * window.element_size() + state.numel() * state.element_size()
        else:  # S4D
            state, _ = s
            ssm += state.numel() * state.element_size()
    return {"weights": weights, "kv_cache": kv, "ssm_states": ssm}


def decode_step_matmul_flops(model: HippoLM, batch: int) -> int:
    """FLOPs of one decode step's weight matmuls (every Linear and the tied LM head) at `batch`:
    the same for all three models but for their Linear counts (the SSM steps and attention over
    the KV cache read far more bytes than they do arithmetic and are counted as bytes)."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 2 * batch * (n + model.embedding.word.weight.numel())


def profile_decode(model: HippoLM, params: InferenceParams, logits: torch.Tensor, start: int, steps: int) -> dict:
    """ms per decode step by kind of op (self CPU time under torch.profiler)."""
    from torch.profiler import profile

    with profile() as prof:
        decode(model, params, logits, start, steps)
    kinds: dict[str, float] = {}
    for e in prof.key_averages():
        k = e.key
        if k in ("aten::addmm", "aten::mm"):
            kind = "weight matmuls"
        elif "scaled_dot_product" in k:
            kind = "attention over the KV cache"
        elif k == "aten::bmm":
            kind = "SSM step reductions (bmm)"
        elif k in ("aten::copy_", "aten::index_put_", "aten::fill_"):
            kind = "copies (KV / ring writes, bias)"
        else:
            kind = "elementwise, norms, rest"
        kinds[kind] = kinds.get(kind, 0.0) + e.self_cpu_time_total / 1e3 / steps
    return kinds


def machine_rates(d_model: int, batch: int, reps: int = 5) -> tuple[float, float]:
    """(read GB/s of a 1 GiB fp32 sum, fp32 GFLOP/s of (batch x d) @ (d x 4d) products over 24
    distinct weights, 226 MB at d = 768: a decode step's matmul shape, its weights from DRAM)."""
    a = torch.ones(2**28)
    ws = [torch.randn(d_model, 4 * d_model) for _ in range(24)]
    x = torch.randn(batch, d_model)

    def best(f) -> float:
        f()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return min(ts)

    bw = a.numel() * 4 / best(a.sum) / 1e9
    gf = 2 * batch * d_model * 4 * d_model * len(ws) / best(lambda: [x @ w for w in ws]) / 1e9
    return bw, gf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 1024, 1536])
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="decode repeats, interleaved across the models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--h3-ref-prefill", action="store_true",
                    help="also time the H3 prefill through the full-length FFT reference (at the last prompt)")
    ap.add_argument("--profile", action="store_true", help="profile a few decode steps per model at the longest prompt")
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    bw, gf = machine_rates(768, args.batch)
    print(f"machine: read {bw:.1f} GB/s, fp32 matmul {gf:.0f} GFLOP/s, load {load0:.2f}", flush=True)
    g = torch.Generator().manual_seed(0)
    prompt_all = torch.randint(0, 50257, (args.batch, max(args.prompts)), generator=g)
    models = {n: build(n, max(args.prompts) + args.new) for n in MODELS}
    for name, model in models.items():  # warm-up
        _, p, lg = prefill(model, prompt_all[:2, :64], 2)
        decode(model, p, lg, 64, 2)
    prefill_s, hooks_s, decode_s, nbytes, runs, profiles, ref_prefill = {}, {}, {}, {}, {}, {}, None
    prompts = sorted(args.prompts, reverse=True)  # decode from the longest first (shared KV caches)
    L = prompts[0]
    t_start = time.perf_counter()
    # Prefill memory: the Transformer's KV cache is the largest state; prefill it last.
    for name in sorted(MODELS, key=lambda n: n == "transformer_125m"):
        model = models[name]
        prefill_s[name], hooks_s[name], states = prefill_with_prefixes(model, prompt_all, args.new, prompts)
        for P, (params, logits) in states.items():
            # the mean over the decode steps' positions P .. P + new - 1
            ends = [decode_step_bytes(model, params, P + i) for i in (0, args.new - 1)]
            nbytes[name, P] = {k: (ends[0][k] + ends[1][k]) / 2 for k in ends[0]}
            runs[name, P] = (params, logits, snapshot(model, params))
        print(f"{name}: prefill {L} tokens {prefill_s[name]:.1f} s (+ {hooks_s[name]:.1f} s deriving the "
              f"states after {prompts[1:]})", flush=True)
    if args.h3_ref_prefill:
        set_impl(models["h3_125m"], "reference")
        ref_prefill = prefill(models["h3_125m"], prompt_all, 1)[0]
        set_impl(models["h3_125m"], "auto")
    for P in prompts:
        for r in range(args.rounds):
            order = MODELS[r % len(MODELS):] + MODELS[: r % len(MODELS)]  # rotate who goes first
            for name in order:
                params, logits, snap = runs[name, P]
                restore(models[name], params, snap)
                decode_s.setdefault((name, P), []).append(decode(models[name], params, logits, P, args.new))
            print(f"prompt {P} round {r + 1}: "
                  + ", ".join(f"{n} {decode_s[n, P][-1]:.2f} s" for n in MODELS), flush=True)
        if args.profile and P == L:
            for name in MODELS:
                params, logits, snap = runs[name, P]
                restore(models[name], params, snap)
                profiles[name] = profile_decode(models[name], params, logits, P, 4)
        for name in MODELS:
            del runs[name, P]
    total = time.perf_counter() - t_start
    load1 = os.getloadavg()[0]

    tps = {k: args.batch * args.new / statistics.median(v) for k, v in decode_s.items()}
    step_ms = {k: 1e3 * statistics.median(v) / args.new for k, v in decode_s.items()}
    lines = [
        f"### Generation, batch {args.batch}, prompts {' / '.join(map(str, args.prompts))}, {args.new} new tokens, "
        f"fp32, {args.threads} threads, greedy, random weights; decode: median of {args.rounds} rounds "
        f"interleaved across the models; prefill: one run per model of the {L}-token prompt, last position's "
        f"logits only (the states after the shorter prompts derived from it, see `prefill_with_prefixes`)",
        "",
        f"torch {torch.__version__}; machine measured in this run: read {bw:.1f} GB/s (1 GiB fp32 sum), fp32 "
        f"matmul {gf:.0f} GFLOP/s ({args.batch} x 768 @ 768 x 3072, 24 distinct weights); 1-min load {load0:.2f} at start, "
        f"{load1:.2f} at end; {total / 60:.1f} min",
        "",
        "| prompt | model | prefill (s) | decode rounds (s) | ms / step | decode tokens/s | vs Transformer | "
        "best round vs Transformer's best |",
        "|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    best = {k: min(v) for k, v in decode_s.items()}
    for P in sorted(prompts):
        base = tps["transformer_125m", P]
        for n in MODELS:
            pre = f"{prefill_s[n]:.1f}" if P == L else "-"
            rounds = ", ".join(f"{x:.1f}" for x in decode_s[n, P])
            lines.append(f"| {P} | {n} | {pre} | {rounds} | {step_ms[n, P]:.1f} | {tps[n, P]:.1f} | "
                         f"{tps[n, P] / base:.2f}x | {best['transformer_125m', P] / best[n, P]:.2f}x |")
    lines += [
        "",
        f"Bytes one decode step reads (mean over the {args.new} steps' positions), and what they imply: the time to "
        "read them at the measured bandwidth, and the ratio to the Transformer if every step took only that",
        "",
        "| prompt | model | weights (MB) | KV cache (MB) | SSM states (MB) | total (MB) | read time (ms) | "
        "bytes bound vs Transformer | matmul time (ms) | matmul + other bytes (ms) | that bound vs Transformer | "
        "measured ms / step | measured vs Transformer |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mm_ms = {n: decode_step_matmul_flops(models[n], args.batch) / gf / 1e6 for n in MODELS}
    for P in sorted(prompts):
        tot = {n: sum(nbytes[n, P].values()) for n in MODELS}
        # Weight matmuls at the measured rate (they stream the weights meanwhile), then the KV
        # cache and the SSM states at the measured bandwidth.
        floor = {n: mm_ms[n] + (nbytes[n, P]["kv_cache"] + nbytes[n, P]["ssm_states"]) / bw / 1e6 for n in MODELS}
        for n in MODELS:
            b = nbytes[n, P]
            lines.append(
                f"| {P} | {n} | {b['weights'] / 1e6:.0f} | {b['kv_cache'] / 1e6:.0f} | {b['ssm_states'] / 1e6:.0f} | "
                f"{tot[n] / 1e6:.0f} | {tot[n] / bw / 1e6:.1f} | {tot['transformer_125m'] / tot[n]:.2f}x | "
                f"{mm_ms[n]:.1f} | {floor[n]:.1f} | {floor['transformer_125m'] / floor[n]:.2f}x | "
                f"{step_ms[n, P]:.1f} | {tps[n, P] / tps['transformer_125m', P]:.2f}x |"
            )
    if profiles:
        kinds = sorted({k for p in profiles.values() for k in p})
        lines += ["", f"Where a decode step's time goes at prompt {L} (ms per step, self CPU time under "
                      "torch.profiler, 4 steps; profiling adds some overhead)", "",
                  "| model | " + " | ".join(kinds) + " | total |", "|---|" + "---:|" * (len(kinds) + 1)]
        for n in MODELS:
            p = profiles[n]
            lines.append(f"| {n} | " + " | ".join(f"{p.get(k, 0.0):.1f}" for k in kinds) + f" | {sum(p.values()):.1f} |")
    if ref_prefill:
        lines += ["", f"H3-125M prefill ({L} tokens x {args.batch}): chunked state passing "
                      f"{prefill_s['h3_125m']:.1f} s vs full-length FFT reference {ref_prefill:.1f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
