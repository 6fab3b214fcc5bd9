"""Generation: recurrent-mode tokens/s of 125M H3 / hybrid vs a 125M Transformer with a KV cache.

Random weights (speed does not depend on them), random prompt ids, greedy decoding. Decode
tokens/s excludes the prefill; the prefill of the H3 model is timed twice: through the default
path (chunked state passing, `H3.conv_impl = "auto"`) and through the full-length FFT reference.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_generation.py --batch 8 --prompt 2048 --new 128 \
        (paste the printed table into BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch


from hippo.pretrain.config import load_config
from hippo.pretrain.models import H3, HippoLM, InferenceParams

MODELS = ("transformer_125m", "h3_125m", "hybrid_125m")


def set_impl(model: torch.nn.Module, impl: str) -> None:
    for m in model.modules():
        if isinstance(m, H3):
            m.conv_impl = impl


@torch.no_grad()
def prefill(model: HippoLM, prompt: torch.Tensor, new: int) -> tuple[float, InferenceParams, torch.Tensor]:
    """(seconds, the state after the prompt, last logits)."""
    B, Lp = prompt.shape
    params = InferenceParams(max_seqlen=Lp + new, max_batch_size=B)
    t0 = time.perf_counter()
    logits = model(prompt, params)[:, -1]
    return time.perf_counter() - t0, params, logits


@torch.no_grad()
def decode(model: HippoLM, params: InferenceParams, logits: torch.Tensor, start: int, new: int) -> float:
    """Seconds for `new` greedy tokens per sequence from the state after `start` tokens."""
    t0 = time.perf_counter()
    for i in range(new):
        token = logits.argmax(-1, keepdim=True)
        params.seqlen_offset = start + i
        logits = model(token, params)[:, -1]
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="decode repeats, interleaved across the models")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50257, (args.batch, args.prompt), generator=g)
    models, prefill_s, after_prompt = {}, {}, {}
    for name in MODELS:
        torch.manual_seed(0)
        cfg = load_config(f"configs/{name}.yaml").model
        if cfg.position_embedding == "learned":  # room for prompt + new tokens (same cost per step)
            cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, args.prompt + args.new))
        model = HippoLM(cfg).eval()
        _, p, lg = prefill(model, prompt[:, :64], 2)  # warm-up
        decode(model, p, lg, 64, 2)
        if name == "h3_125m":
            set_impl(model, "reference")
            prefill_s["h3_125m_ref"] = prefill(model, prompt, 1)[0]
            set_impl(model, "auto")
        prefill_s[name], params, logits = prefill(model, prompt, args.new)
        models[name] = (model, params, logits)
        after_prompt[name] = copy.deepcopy(params.states)
        print(f"{name}: prefill {prefill_s[name]:.2f} s", flush=True)
    # Decode rounds interleaved across models, each from the same post-prompt state, so load
    # changes on a shared machine hit every model alike; the median is reported.
    decode_s = {n: [] for n in MODELS}
    for r in range(args.rounds):
        for name in MODELS:
            model, params, logits = models[name]
            params.states = copy.deepcopy(after_prompt[name])
            decode_s[name].append(decode(model, params, logits, args.prompt, args.new))
        print(f"round {r + 1}: " + ", ".join(f"{n} {decode_s[n][-1]:.2f} s" for n in MODELS), flush=True)
    med = {n: statistics.median(v) for n, v in decode_s.items()}
    tps = {n: args.batch * args.new / med[n] for n in MODELS}
    lines = [
        f"### Generation, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, fp32, "
        f"{args.threads} threads, greedy, random weights, median of {args.rounds} interleaved decode rounds",
        "",
        "| model | prefill (s) | decode (s) | decode tokens/s | vs Transformer |",
        "|---|---:|---:|---:|---:|",
    ]
    for n in MODELS:
        lines.append(
            f"| {n} | {prefill_s[n]:.2f} | {med[n]:.2f} | {tps[n]:.1f} | {tps[n] / tps['transformer_125m']:.2f}x |"
        )
    lines += [
        "",
        f"H3-125M prefill ({args.prompt} tokens x {args.batch}): chunked state passing "
        f"{prefill_s['h3_125m']:.2f} s vs full-length FFT reference {prefill_s['h3_125m_ref']:.2f} s "
        f"({prefill_s['h3_125m_ref'] / prefill_s['h3_125m']:.2f}x).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
