"""Run by test_hf_export in a fresh interpreter that cannot import Hippo: what a user with torch and
transformers alone gets from an exported folder. Reads a JSON list of jobs, writes the results with
torch.save. Not a test module (no test_ prefix); it imports nothing from the repository.

    python hf_child.py JOBS.json RESULTS.pt
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import sys

BLOCKED = ("hippo", "tests", "triton", "deepspeed", "megatron")


class _Hidden(importlib.abc.MetaPathFinder):
    """Wraps one import finder so that Hippo and the training-only packages look not installed
    (`importlib.util.find_spec` gives None, `import` raises ModuleNotFoundError)."""

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or not hasattr(self.finder, "find_spec"):
            return None
        return self.finder.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [_Hidden(f) for f in sys.meta_path]
_here = str(__import__("pathlib").Path(__file__).resolve().parent)
sys.path = [p for p in sys.path if p not in ("", ".", _here)]

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _model(folder: str, dtype: str):
    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=DTYPES[dtype]).eval()


def logits(job: dict) -> dict:
    model = _model(job["dir"], job.get("dtype", "float32"))
    with torch.no_grad():
        out = model(torch.tensor(job["ids"])).logits.float()
    ssm_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if "ssm" in n})
    return {"logits": out, "ssm_dtypes": ssm_dtypes, "class": type(model).__name__}


def generate(job: dict) -> dict:
    """Greedy continuations of a left-padded batch of prompts, cut after EOS."""
    model = _model(job["dir"], job.get("dtype", "float32"))
    tok = AutoTokenizer.from_pretrained(job["dir"], trust_remote_code=False)
    tok.padding_side = "left"
    batch = tok(job["prompts"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=job["max_new_tokens"])
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    cut = [row[: row.index(tok.eos_token_id) + 1] if tok.eos_token_id in row else row for row in new]
    return {"tokens": cut, "padded": bool((batch["attention_mask"] == 0).any())}


def tokenize(job: dict) -> dict:
    tok = AutoTokenizer.from_pretrained(job["dir"], trust_remote_code=False)
    return {"ids": [tok(t)["input_ids"] for t in job["texts"]], "eos_token_id": tok.eos_token_id,
            "decoded": [tok.decode(ids, skip_special_tokens=True) for ids in job.get("decode", [])]}


def main() -> None:
    jobs = json.loads(open(sys.argv[1]).read())
    results = [globals()[job["kind"]](job) for job in jobs]
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    leaked += [f"{name} (importable)" for name in BLOCKED if importlib.util.find_spec(name) is not None]
    torch.save({"results": results, "leaked": leaked, "transformers": transformers.__version__}, sys.argv[2])
    print(f"transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
