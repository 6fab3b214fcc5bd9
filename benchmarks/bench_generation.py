"""Generation: recurrent-mode tokens/s of 125M H3 / hybrid vs a 125M Transformer with a KV cache.

Random weights (speed does not depend on them), random prompt ids, greedy decoding. Decode
tokens/s excludes the prefill; the prefill of the H3 model is timed twice: through the default
path (chunked state passing, `H3.conv_impl = "auto"`) and through the full-length FFT reference.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_generation.py --batch 8 --prompt 2048 --new 128 \
        (paste the printed table into BENCHMARKS.md)
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pretrain.config import load_config  # noqa: E402
from pretrain.models import H3, HippoLM, InferenceParams  # noqa: E402

MODELS = ("transformer_125m", "h3_125m", "hybrid_125m")


def set_impl(model: torch.nn.Module, impl: str) -> None:
    for m in model.modules():
        if isinstance(m, H3):
            m.conv_impl = impl


@torch.no_grad()
def run(model: HippoLM, prompt: torch.Tensor, new: int) -> tuple[float, float]:
    """Returns (prefill seconds, decode seconds for `new` tokens per sequence)."""
    B, Lp = prompt.shape
    params = InferenceParams(max_seqlen=Lp + new, max_batch_size=B)
    t0 = time.perf_counter()
    logits = model(prompt, params)[:, -1]
    t1 = time.perf_counter()
    for i in range(new):
        token = logits.argmax(-1, keepdim=True)
        params.seqlen_offset = Lp + i
        logits = model(token, params)[:, -1]
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 50257, (args.batch, args.prompt), generator=g)
    res = {}
    for name in MODELS:
        torch.manual_seed(0)
        model = HippoLM(load_config(f"configs/{name}.yaml").model).eval()
        run(model, prompt[:, :64], 2)  # warm-up
        res[name] = run(model, prompt, args.new)
        if name == "h3_125m":
            set_impl(model, "reference")
            res["h3_125m_ref_prefill"] = run(model, prompt, 1)[0]
        print(name, res[name], flush=True)
        del model
    tps = {n: args.batch * args.new / res[n][1] for n in MODELS}
    lines = [
        f"### Generation, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, fp32, "
        f"{args.threads} threads, greedy, random weights",
        "",
        "| model | prefill (s) | decode (s) | decode tokens/s | vs Transformer |",
        "|---|---:|---:|---:|---:|",
    ]
    for n in MODELS:
        lines.append(
            f"| {n} | {res[n][0]:.2f} | {res[n][1]:.2f} | {tps[n]:.1f} | {tps[n] / tps['transformer_125m']:.2f}x |"
        )
    lines += [
        "",
        f"H3-125M prefill ({args.prompt} tokens x {args.batch}): chunked state passing "
        f"{res['h3_125m'][0]:.2f} s vs full-length FFT reference {res['h3_125m_ref_prefill']:.2f} s "
        f"({res['h3_125m_ref_prefill'] / res['h3_125m'][0]:.2f}x).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
