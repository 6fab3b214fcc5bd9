"""Hippo models as Hugging Face `transformers` folders, and back.

`export_hf` writes what `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` and
`AutoTokenizer.from_pretrained(DIR)` load with torch and transformers alone: config.json (Hippo's
model fields at the top level, `auto_map`), `configuration_hippo.py` and `modeling_hippo.py`
(`hf_files/`: a second implementation of the model, no Hippo import), the weights under Hippo's
own names (one safetensors file, or shards and an index past 4 GiB), generation_config.json,
tokenizer.json and tokenizer_config.json. Because the names are Hippo's, Hippo reads such a folder
as an export (`models.hf_config`): `hippo train --init-from`, `generate` and `eval` take it, and
`import_hf` turns it back into a plain export bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch

from hippo.data_pipeline.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer
from hippo.pretrain.config import ConfigError, ModelConfig
from hippo.pretrain.models import HippoLM
from hippo.pretrain.models.hf_config import HF_CODE, to_hf_config
from hippo.pretrain.models.pretrained import CONFIG, INDEX, WEIGHTS, load_weights, read_config, save_weights

__all__ = ["export_hf", "import_hf", "byte_tokenizer_json", "HF_FILES_DIR", "GENERATION_CONFIG",
           "TOKENIZER_CONFIG"]

HF_FILES_DIR = Path(__file__).with_name("hf_files")
GENERATION_CONFIG = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
BYTE_EOS = "<|endoftext|>"


def _bytes_to_chars() -> dict[int, str]:
    """The printable stand-in character of each byte used by byte-level BPE tokenizers: printable
    Latin-1 bytes stand for themselves, the others for code points from 256 up, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def byte_tokenizer_json() -> str:
    """Hippo's byte tokenizer (UTF-8 byte b -> id b, EOS 256) as a `tokenizers` tokenizer.json:
    byte-level pre-tokenization without splitting, a BPE whose vocabulary is the 256 byte symbols
    (id = byte value) and no merges, so every byte stays one token. EOS is in the vocabulary as id
    256 but not an added token: as in Hippo, the text "<|endoftext|>" is its 13 bytes, never EOS."""
    from tokenizers import Tokenizer as _Tok, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_chars().items()} | {BYTE_EOS: 256}
    tok = _Tok(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def _write_tokenizer(folder: Path, tok: Tokenizer, model_max_length: int) -> None:
    if isinstance(tok, ByteTokenizer):
        text, eos = byte_tokenizer_json(), BYTE_EOS
    elif isinstance(tok, HFTokenizer):
        text, eos = tok.to_json(), tok.eos_token
    else:
        raise ConfigError(f"tokenizer {tok.spec!r} has no tokenizer.json form")
    (folder / TOKENIZER_FILE).write_text(text, encoding="utf-8")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
              "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "model_max_length": model_max_length}
    if isinstance(tok, ByteTokenizer):  # the text "<|endoftext|>" is 13 bytes in Hippo, not EOS
        config["split_special_tokens"] = True
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=1))


def _source(source: Path, out: Path) -> tuple[dict[str, torch.Tensor], ModelConfig, Tokenizer, int]:
    """Weights under HippoLM names, model config, tokenizer and step of an export folder (an HF
    folder included), a run folder or a training checkpoint of any layout (converted in a scratch
    folder inside `out`, the folder being written: the source run is only read)."""
    from hippo.pretrain.checkpoint import CheckpointManager
    from hippo.pretrain.config import from_dict
    from hippo.pretrain.export import checkpoint_parameters, export_tokenizer

    if (source / WEIGHTS).is_file() or (source / INDEX).is_file():  # a run folder has a config.json too
        meta = read_config(source)
        cfg = from_dict(ModelConfig, meta["model"], "model")
        return load_weights(source), cfg, export_tokenizer(source, meta), int(meta.get("step", 0))
    ckpt = CheckpointManager(source).resolve(source)
    params, run_cfg = checkpoint_parameters(ckpt, out)
    return params, run_cfg.model, load_tokenizer(run_cfg.data.paths[0]), ckpt.step


def _in_model_order(params: dict[str, torch.Tensor], cfg: ModelConfig, where: Path) -> dict[str, torch.Tensor]:
    """The tensors in HippoLM's parameter order (so shards fall the same way from any source),
    after checking they are exactly the model's."""
    with torch.device("meta"):
        expected = {k: p.shape for k, p in HippoLM(cfg, init=False).named_parameters()}
    missing, unexpected = sorted(expected.keys() - params.keys()), sorted(params.keys() - expected.keys())
    wrong = [k for k in expected.keys() & params.keys() if params[k].shape != expected[k]]
    if missing or unexpected or wrong:
        raise ConfigError(f"{where}: the weights do not fit its config: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}, other shapes {wrong[:5]}")
    return {k: params[k] for k in expected}


def export_hf(source: str | Path, out: str | Path) -> Path:
    """Write the Hugging Face folder `out` of an export, run folder or checkpoint."""
    source, out = Path(source), Path(out)
    params, cfg, tok, step = _source(source, out)
    if cfg.document_isolation and cfg.eos_id is None:  # the modeling file reads document ends from it
        cfg = dataclasses.replace(cfg, eos_id=tok.eos_id)
    params = _in_model_order(params, cfg, source)
    out.mkdir(parents=True, exist_ok=True)
    for name in HF_CODE:
        shutil.copyfile(HF_FILES_DIR / name, out / name)
    save_weights(out, params)
    identity = tok.identity()
    spec = "byte" if isinstance(tok, ByteTokenizer) else TOKENIZER_FILE
    identity.update(spec=spec, eos_token=tok.eos_token if isinstance(tok, HFTokenizer) else None)
    hippo = {"step": step, "tokenizer": spec, "tokenizer_info": identity}
    _write_json(out / CONFIG, to_hf_config(cfg, eos_id=tok.eos_id, hippo=hippo))
    _write_json(out / GENERATION_CONFIG, {"eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id,
                                          "use_cache": True})
    max_length = cfg.max_position_embeddings if cfg.position_embedding == "learned" else 2048
    _write_tokenizer(out, tok, max_length)
    return out


def import_hf(folder: str | Path, out: str | Path) -> Path:
    """A Hippo export from an HF folder of a Hippo model (written by `export_hf`, or saved again
    by `transformers`); one whose config or weights Hippo cannot build is refused with the reason."""
    from hippo.pretrain.config import from_dict
    from hippo.pretrain.export import export_tokenizer, save_export

    folder = Path(folder)
    meta = read_config(folder)
    if "model_type" not in json.loads((folder / CONFIG).read_text()):
        raise ConfigError(f"{folder / CONFIG} is a Hippo export's, not a Hugging Face folder's: use it as it is")
    cfg = from_dict(ModelConfig, meta["model"], "model")
    params = _in_model_order(load_weights(folder), cfg, folder)
    return save_export(Path(out), params, cfg, tokenizer=export_tokenizer(folder, meta), step=int(meta["step"]))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1))
