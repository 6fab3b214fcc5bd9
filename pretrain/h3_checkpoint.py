"""The authors' released H3 checkpoints (HazyResearch/H3; hub repos danfu09/H3-125M ... -2.7B) in
Hippo, and Hippo models written back in their layout, so either code base can use the other's weights.

`import_h3` reads a file in each form they published (a plain state dict; a PyTorch-Lightning
checkpoint whose `state_dict` carries a `model.` prefix; the older key layout, renamed and with its
LayerNorms moved one slot as the authors' own `load_state_dict` does), infers the architecture from
the tensors, refuses what it cannot represent exactly, and writes a Hippo export. `to_h3_state_dict`
/ `export_h3` go back to their current layout. The mapping (authors' key under
`backbone.layers.{i}.` -> Hippo's under `layers.{i}.`; every other transform is the identity):

    mixer.q_proj/k_proj/v_proj.*       -> mixer.q_proj/k_proj/v_proj.*
    mixer.output_linear.*              -> mixer.out_proj.*
    mixer.ssm_k_kernel.kernel.B (d,N)  -> mixer.shift_ssm.B
    mixer.ssm_k_kernel.kernel.C (1,d,N)-> mixer.shift_ssm.C       drop the channel dim (always 1)
    mixer.ssm_k_D                      -> mixer.shift_ssm.D
    mixer.kernel.kernel.log_dt         -> mixer.diag_ssm.log_dt
    mixer.kernel.kernel.inv_A_real     -> mixer.diag_ssm.log_A_real   both: Re A = -exp(it)
    mixer.kernel.kernel.A_imag         -> mixer.diag_ssm.A_imag
    mixer.kernel.kernel.B (d,N/2,2)    -> mixer.diag_ssm.B        complex as (re, im), both
    mixer.kernel.kernel.C (1,d,N/2,2)  -> mixer.diag_ssm.C        drop the channel dim
    mixer.D                            -> mixer.diag_ssm.D
    mixer.Wqkv.* (3d, ...)             -> mixer.q_proj/k_proj/v_proj.*  rows [0,d), [d,2d), [2d,3d)
    mixer.out_proj.*                   -> mixer.out_proj.*
    mixer.rotary_emb.inv_freq (r/2)    -> model.rotary_dim = r (values must be base 10000)
    norm1/norm2/mlp.fc1/mlp.fc2.*      -> the same names
    backbone.embeddings.word_embeddings.weight -> embedding.word.weight (lm_head.weight: the same tensor)
    backbone.ln_f.*                    -> norm_f.*

Both codes discretize bilinearly with B folded into the input map (dB = B dt / (1 - dt A / 2)) and
read the shift filter as the cross-correlation of C with B, so no value changes on the way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from hippo.pretrain.config import ConfigError, ModelConfig, from_dict, load_config
from hippo.pretrain.models import HippoLM
from hippo.pretrain.models.attention import rotary_inv_freq
from hippo.pretrain.models.config import refuse_document_isolation

__all__ = ["ImportResult", "import_h3", "read_h3_state_dict", "infer_model_config", "to_hippo_params",
           "to_h3_state_dict", "h3_model_args", "export_h3", "H3_WEIGHTS", "H3_CONFIG"]

H3_WEIGHTS = "model.pt"
H3_CONFIG = "h3_config.json"
"""Next to `model.pt`: the arguments of the authors' `SSMLMHeadModel` that build the model it fits."""
GPT2_TOKENIZER = "https://huggingface.co/gpt2/resolve/main/tokenizer.json"
EMBEDDING = "backbone.embeddings.word_embeddings.weight"
LM_HEAD = "lm_head.weight"
ROTARY_BASE = 10000.0
_ROTARY = "mixer.rotary_emb.inv_freq"
_LAYER = re.compile(r"^backbone\.layers\.(\d+)\.")

Transform = Literal["same", "channel", "qkv"]
"""same: identity; channel: the authors' tensor has a leading channel dim of 1; qkv: one packed
authors' tensor is Hippo's q, k and v stacked along dim 0."""

_H3_MIXER: tuple[tuple[str, str, Transform], ...] = (
    *((f"{p}.{w}", f"{p}.{w}", "same") for p in ("q_proj", "k_proj", "v_proj") for w in ("weight", "bias")),
    ("ssm_k_kernel.kernel.B", "shift_ssm.B", "same"),
    ("ssm_k_kernel.kernel.C", "shift_ssm.C", "channel"),
    ("ssm_k_D", "shift_ssm.D", "same"),
    ("kernel.kernel.log_dt", "diag_ssm.log_dt", "same"),
    ("kernel.kernel.inv_A_real", "diag_ssm.log_A_real", "same"),
    ("kernel.kernel.A_imag", "diag_ssm.A_imag", "same"),
    ("kernel.kernel.B", "diag_ssm.B", "same"),
    ("kernel.kernel.C", "diag_ssm.C", "channel"),
    ("D", "diag_ssm.D", "same"),
    ("output_linear.weight", "out_proj.weight", "same"),
    ("output_linear.bias", "out_proj.bias", "same"),
)
_BLOCK = tuple(f"{m}.{w}" for m in ("norm1", "norm2", "mlp.fc1", "mlp.fc2") for w in ("weight", "bias"))


@dataclass(frozen=True)
class _Rule:
    """One authors' tensor and the Hippo parameter(s) it becomes."""

    authors: str
    hippo: tuple[str, ...]
    transform: Transform


@dataclass(frozen=True)
class ImportResult:
    """The export written, the config inferred for it, and what the user should know about both."""

    folder: Path
    model: ModelConfig
    notes: list[str]
    """What the import did that a user may want to know (renamed layout, config differences)."""


def _rules(cfg: ModelConfig) -> list[_Rule]:
    """Every tensor of the authors' model for `cfg` (inv_freq and the tied head aside)."""
    rules = [_Rule(EMBEDDING, ("embedding.word.weight",), "same")]
    for i, kind in enumerate(cfg.layer_mixers):
        a, h = f"backbone.layers.{i}.", f"layers.{i}."
        if kind == "attention":
            for w in ("weight", "bias"):
                rules.append(_Rule(f"{a}mixer.Wqkv.{w}", tuple(f"{h}mixer.{x}_proj.{w}" for x in "qkv"), "qkv"))
                rules.append(_Rule(f"{a}mixer.out_proj.{w}", (f"{h}mixer.out_proj.{w}",), "same"))
        else:
            rules += [_Rule(f"{a}mixer.{ak}", (f"{h}mixer.{hk}",), t) for ak, hk, t in _H3_MIXER]
        rules += [_Rule(a + k, (h + k,), "same") for k in _BLOCK]
    rules += [_Rule(f"backbone.ln_f.{w}", (f"norm_f.{w}",), "same") for w in ("weight", "bias")]
    return rules


def _to_hippo(t: torch.Tensor, transform: Transform) -> tuple[torch.Tensor, ...]:
    if transform == "channel":
        return (t[0],)
    if transform == "qkv":  # clones: safetensors refuses tensors that share memory
        return tuple(part.clone() for part in t.chunk(3, dim=0))
    return (t,)


def _to_authors(parts: list[torch.Tensor], transform: Transform) -> torch.Tensor:
    if transform == "channel":
        return parts[0].unsqueeze(0)
    if transform == "qkv":
        return torch.cat(parts, dim=0)
    return parts[0]


# ----------------------------------------------------------------------------------- reading
def _load(path: Path, trust_pickle: bool) -> Any:
    """torch.load without running the file's code unless trusted; memory-mapped where possible
    (a 2.7B file is 10 GiB)."""
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except pickle.UnpicklingError as e:
        if found := re.search(r"Unsupported global: GLOBAL (\S+)", str(e)):
            raise ConfigError(f"{path}: holds Python objects besides tensors ({found.group(1)}), which torch.load "
                              "refuses to run; if you trust the file, pass --trust-pickle") from None
        raise ConfigError(f"{path}: not a PyTorch checkpoint (torch.load: {str(e).splitlines()[0][:120]})") from None
    except (RuntimeError, EOFError) as e:
        raise ConfigError(f"{path}: not a PyTorch checkpoint ({str(e).splitlines()[0]})") from None


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's tensors of a plain state dict or a Lightning checkpoint (its `model.` keys, as
    the authors' generation script keeps them)."""
    notes = []
    if isinstance(obj, dict) and "pytorch-lightning_version" in obj:
        inner = obj.get("state_dict")
        if not isinstance(inner, dict):
            raise ConfigError(f"{path}: a PyTorch-Lightning checkpoint without a state_dict mapping")
        obj = {k.removeprefix("model."): v for k, v in inner.items() if k.startswith("model.")}
        skipped = len(inner) - len(obj)
        notes.append("PyTorch-Lightning checkpoint: read its model.* tensors"
                     + (f", skipped {skipped} others" if skipped else ""))
    if not isinstance(obj, dict) or not obj:
        what = "a mapping without model tensors" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise ConfigError(f"{path}: holds {what}, neither a state dict nor a PyTorch-Lightning checkpoint")
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"{path}: {key!r} is a {type(value).__name__}, not a tensor: "
                              "not a plain state dict or a PyTorch-Lightning checkpoint")
    return dict(obj), notes


def _rename_old_layout(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The authors' renaming of their older files: `s4seq.encoder.` -> `backbone.`, `embedding.`
    -> the word embedding, `backbone.norm` -> `backbone.ln_0`; with an `ln_0`, the old block order
    (mixer/MLP -> add -> LN) puts every LayerNorm one slot later than the current pre-norm one."""
    renamed = {}
    for key, value in sd.items():
        new = re.sub(r"^s4seq\.encoder\.", "backbone.", key)
        new = re.sub(r"^embedding\.", "backbone.embeddings.word_embeddings.", new)
        renamed[re.sub(r"^backbone\.norm", "backbone.ln_0", new)] = value
    if renamed.keys() == sd.keys():
        return sd, []
    notes = ["older key layout (s4seq.encoder. / embedding.): renamed as the authors' loader does"]
    if "backbone.ln_0.weight" in renamed:
        renamed = _shift_layer_norms(renamed)
        notes.append("older block order: moved every LayerNorm one slot (ln_0 -> layers.0.norm1, "
                     "layers.l.norm1 -> norm2, layers.l.norm2 -> layers.l+1.norm1, the last -> ln_f)")
    return renamed, notes


def _shift_layer_norms(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LayerNorms under their current names: the old `ln_0` ran before layer 0's mixer,
    each old `norm1` before its layer's MLP, each old `norm2` before the next layer's mixer."""
    n_layer = _n_layer(sd)
    moves = {"backbone.ln_0": "backbone.layers.0.norm1"}
    for i in range(n_layer):
        moves[f"backbone.layers.{i}.norm1"] = f"backbone.layers.{i}.norm2"
        moves[f"backbone.layers.{i}.norm2"] = f"backbone.layers.{i + 1}.norm1" if i + 1 < n_layer else "backbone.ln_f"
    # An old file's own ln_f, if any, is overwritten, as in the authors' loader.
    out = {k: v for k, v in sd.items() if k.rsplit(".", 1)[0] not in moves}
    for old, new in moves.items():
        for w in ("weight", "bias"):
            if f"{old}.{w}" not in sd:
                raise ConfigError(f"older layout: {old}.{w} is missing, so the LayerNorms cannot be moved "
                                  "to the current block order; the file is incomplete")
            out[f"{new}.{w}"] = sd[f"{old}.{w}"]
    return out


def read_h3_state_dict(path: str | Path, *, trust_pickle: bool = False) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The file's tensors under the authors' current keys, and notes on how they were read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "no such checkpoint file", str(path))
    sd, notes = _unwrap(_load(path, trust_pickle), path)
    sd, renamed = _rename_old_layout(sd)
    return sd, notes + renamed


# --------------------------------------------------------------------------------- inference
def _n_layer(sd: dict[str, torch.Tensor]) -> int:
    layers = {int(m.group(1)) for k in sd if (m := _LAYER.match(k))}
    if not layers:
        raise ConfigError(f"no backbone.layers.* tensors (first key: {next(iter(sd))!r}): not an H3 checkpoint")
    return max(layers) + 1


def _shape(sd: dict[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in sd:
        raise ConfigError(f"{key} is missing: not an H3 checkpoint of the authors' layout")
    if sd[key].ndim != ndim:
        raise ConfigError(f"{key} has shape {tuple(sd[key].shape)}, expected {ndim} dims")
    return tuple(sd[key].shape)


def _architecture(sd: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the tensors show: sizes, which layers are attention, rotary width."""
    rows, d_model = _shape(sd, EMBEDDING, 2)
    n_layer = _n_layer(sd)
    attn, d_state = [], None
    for i in range(n_layer):
        p = f"backbone.layers.{i}.mixer."
        if f"{p}Wqkv.weight" in sd:
            attn.append(i)
        elif f"{p}q_proj.weight" in sd:
            d_state = d_state or _shape(sd, f"{p}ssm_k_kernel.kernel.B", 2)[1]
        else:
            raise ConfigError(f"layer {i} has neither {p}q_proj.weight (H3) nor {p}Wqkv.weight (attention)")
    hidden = _shape(sd, "backbone.layers.0.mlp.fc1.weight", 2)[0]
    if hidden % d_model:
        raise ConfigError(f"backbone.layers.0.mlp.fc1.weight has shape {(hidden, d_model)}: its "
                          f"{hidden} rows are not a multiple of d_model={d_model}")
    rotary = [sd[k].numel() * 2 for i in attn if (k := f"backbone.layers.{i}.{_ROTARY}") in sd]
    return dict(rows=rows, d_model=d_model, n_layer=n_layer, attn_layer_idx=attn, d_state=d_state or 64,
                mlp_ratio=hidden // d_model, rotary_dim=rotary[0] if rotary else None)


def _pad_multiple(rows: int, vocab_size: int) -> int:
    for multiple in (8, 1):
        if -(-vocab_size // multiple) * multiple == rows:
            return multiple
    raise ConfigError(f"{EMBEDDING} has {rows} rows, but the tokenizer's {vocab_size} tokens pad to "
                      f"{-(-vocab_size // 8) * 8}: pass the tokenizer the model was trained with")


def _check_against(base: ModelConfig, arch: dict[str, Any], vocab_size: int, name: str) -> list[str]:
    """Refuse a config whose sizes differ from the file's; layer placement and rotary come from the
    file (the shipped configs place attention where the authors' training configs did, not where
    their released files do), reported in the notes."""
    if base.vocab_size != vocab_size:
        raise ConfigError(f"config {name}: model.vocab_size={base.vocab_size}, but the tokenizer has {vocab_size} "
                          "tokens; pass the tokenizer the model was trained with")
    shown = {"d_model": arch["d_model"], "n_layer": arch["n_layer"], "mlp_ratio": arch["mlp_ratio"],
             "padded_vocab_size": arch["rows"]}
    if len(arch["attn_layer_idx"]) < arch["n_layer"]:
        shown["d_state"] = arch["d_state"]
    for field, value in shown.items():
        if getattr(base, field) != value:
            raise ConfigError(f"config {name}: model.{field}={getattr(base, field)}, but the checkpoint has "
                              f"{value}; pick the config of this model size, or pass --n-head instead")
    if base.mixer != "h3" and len(arch["attn_layer_idx"]) < arch["n_layer"]:
        raise ConfigError(f"config {name}: model.mixer={base.mixer}, but the checkpoint's non-attention layers are H3")
    if base.position_embedding == "learned":
        raise ConfigError(f"config {name}: model.position_embedding=learned, but the checkpoint has no position table")
    notes = []
    if sorted(base.attn_layer_idx) != arch["attn_layer_idx"]:
        notes.append(f"attention layers {arch['attn_layer_idx']} from the checkpoint (config {name} says "
                     f"{sorted(base.attn_layer_idx)})")
    file_rotary = "rotary" if arch["rotary_dim"] else "none"
    if base.position_embedding != file_rotary:
        notes.append(f"position embedding {file_rotary} from the checkpoint "
                     f"(config {name} says {base.position_embedding})")
    return notes


def infer_model_config(sd: dict[str, torch.Tensor], *, vocab_size: int, n_head: int | None = None,
                       base: ModelConfig | None = None, base_name: str = "") -> tuple[ModelConfig, list[str]]:
    """The Hippo config of the authors' model in `sd` (current keys). Heads come from `n_head` or
    `base` (a shipped config, checked against every size the tensors show): tensors do not show them."""
    arch = _architecture(sd)
    notes = _check_against(base, arch, vocab_size, base_name) if base is not None else []
    heads = n_head or (base.n_head if base is not None else None)
    if arch["attn_layer_idx"] and heads is None:
        raise ConfigError(f"attention layers {arch['attn_layer_idx']} need the number of heads, which the tensors "
                          "do not show: pass --n-head N or --config NAME (released: 12 for H3-125M, 16 for "
                          "355M and 1.3B, 20 for 2.7B)")
    fields = dict(vocab_size=vocab_size, pad_vocab_multiple=_pad_multiple(arch["rows"], vocab_size),
                  d_model=arch["d_model"], n_layer=arch["n_layer"], n_head=heads or 1, mixer="h3",
                  attn_layer_idx=arch["attn_layer_idx"], d_state=arch["d_state"], mlp_ratio=arch["mlp_ratio"],
                  position_embedding="rotary" if arch["rotary_dim"] else "none", rotary_dim=arch["rotary_dim"],
                  layer_norm_eps=1e-5)
    if base is not None:
        fields = {**dataclasses.asdict(base), **fields, "pad_vocab_multiple": base.pad_vocab_multiple}
    if arch["rotary_dim"] and arch["d_model"] % fields["n_head"] == 0 \
            and arch["rotary_dim"] == arch["d_model"] // fields["n_head"]:
        fields["rotary_dim"] = None  # rotary over the whole head: Hippo's plain rotary
    try:
        return ModelConfig(**fields), notes
    except ConfigError as e:
        raise ConfigError(f"the checkpoint's architecture does not fit: {e}") from None


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The authors' tensors for `cfg`, derived from Hippo's own parameter shapes through the rules."""
    with torch.device("meta"):
        params = dict(HippoLM(cfg, init=False).named_parameters())
    shapes = {r.authors: tuple(_to_authors([params[h] for h in r.hippo], r.transform).shape) for r in _rules(cfg)}
    shapes[LM_HEAD] = shapes[EMBEDDING]
    if cfg.position_embedding == "rotary":
        rotary_dim = cfg.rotary_dim or cfg.d_model // cfg.n_head
        shapes.update({f"backbone.layers.{i}.{_ROTARY}": (rotary_dim // 2,) for i in cfg.attn_layer_idx})
    return shapes


def _check_layout(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Every tensor known and of its shape, none missing; the head tied; rotary base 10000."""
    expected = _expected_shapes(cfg)
    where = f"the authors' layout for d_model={cfg.d_model}, n_layer={cfg.n_layer}, attention at {cfg.attn_layer_idx}"
    for key, t in sd.items():
        if key not in expected:
            raise ConfigError(f"unknown key {key} (shape {tuple(t.shape)}): not part of {where}; Hippo cannot map it")
        if tuple(t.shape) != expected[key]:
            raise ConfigError(f"{key} has shape {tuple(t.shape)}, expected {expected[key]} in {where}")
        if not t.is_floating_point():
            raise ConfigError(f"{key} has dtype {t.dtype}, expected a floating-point tensor")
    missing = [k for k in expected if k not in sd and k != LM_HEAD]
    if missing:
        raise ConfigError(f"{missing[0]} is missing ({len(missing)} tensors of {where} are)")
    if LM_HEAD in sd and not torch.equal(sd[LM_HEAD], sd[EMBEDDING]):
        raise ConfigError(f"{LM_HEAD} differs from {EMBEDDING}: Hippo ties the LM head to the embedding, "
                          "so this untied model cannot be represented")
    for i in cfg.attn_layer_idx if cfg.position_embedding == "rotary" else ():
        key = f"backbone.layers.{i}.{_ROTARY}"
        want = rotary_inv_freq(2 * sd[key].numel(), ROTARY_BASE)
        if not torch.allclose(sd[key].float(), want, rtol=1e-2, atol=0):  # a half-precision buffer passes
            raise ConfigError(f"{key} is not rotary base {ROTARY_BASE:g} over {2 * sd[key].numel()} dims: "
                              "Hippo's rotary uses that base")


def to_hippo_params(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HippoLM's parameters from the authors' tensors (checked first), dtypes kept."""
    _check_layout(sd, cfg)
    params = {}
    for rule in _rules(cfg):
        params.update(zip(rule.hippo, _to_hippo(sd[rule.authors], rule.transform)))
    return params


def import_h3(checkpoint: str | Path, out: str | Path, *, tokenizer: str | None, config: str | None = None,
              n_head: int | None = None, trust_pickle: bool = False) -> ImportResult:
    """Write the Hippo export of an authors' H3 checkpoint file (step 0)."""
    from hippo.data_pipeline.tokenizer import load_tokenizer
    from hippo.pretrain.export import save_export

    if tokenizer is None:
        raise ConfigError("--tokenizer is required: the released H3 models use GPT-2's tokenizer; download its "
                          f"tokenizer.json ({GPT2_TOKENIZER}) and pass --tokenizer tokenizer.json")
    tok = load_tokenizer(tokenizer)
    sd, notes = read_h3_state_dict(checkpoint, trust_pickle=trust_pickle)
    base = load_config(config).model if config is not None else None
    cfg, config_notes = infer_model_config(sd, vocab_size=tok.vocab_size, n_head=n_head, base=base,
                                           base_name=config or "")
    folder = save_export(Path(out), to_hippo_params(sd, cfg), cfg, tokenizer=tok, step=0)
    if base is not None:
        config_notes.append(_init_from_hint(config, base, cfg, folder))
    return ImportResult(folder, cfg, notes + config_notes)


def _init_from_hint(name: str, base: ModelConfig, cfg: ModelConfig, folder: Path) -> str:
    """The `hippo train` line that continues pretraining from the export with config `name`
    (`--init-from` needs the model sections equal: the file's attention placement differs)."""
    ours, theirs = dataclasses.asdict(cfg), dataclasses.asdict(base)
    sets = [f"--set model.{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
            for k, v in ours.items() if theirs[k] != v]
    return " ".join(["continue pretraining with: hippo train", name, "--init-from", str(folder), *sets,
                     "--set data.paths=[DATA]"])


# ----------------------------------------------------------------------------------- writing
def _check_exportable(cfg: ModelConfig) -> None:
    if cfg.mixer != "h3" and len(cfg.attn_layer_idx) < cfg.n_layer:
        raise ConfigError(f"model.mixer={cfg.mixer} has no counterpart in the authors' H3 layout "
                          "(H3 and attention only)")
    if cfg.position_embedding == "learned":
        raise ConfigError("model.position_embedding=learned has no counterpart in the authors' H3 layout "
                          "(none or rotary only)")


def to_h3_state_dict(params: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The authors' current layout (what their `SSMLMHeadModel.state_dict()` holds) of a Hippo model."""
    _check_exportable(cfg)
    sd = {r.authors: _to_authors([params[h] for h in r.hippo], r.transform) for r in _rules(cfg)}
    sd[LM_HEAD] = sd[EMBEDDING]  # tied: one tensor under both names, as in their state dict
    if cfg.position_embedding == "rotary":
        rotary_dim = cfg.rotary_dim or cfg.d_model // cfg.n_head
        for i in cfg.attn_layer_idx:
            sd[f"backbone.layers.{i}.{_ROTARY}"] = rotary_inv_freq(rotary_dim, ROTARY_BASE)
    return sd


def h3_model_args(cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments of the authors' `SSMLMHeadModel` for this model."""
    attn_cfg: dict[str, Any] = {"num_heads": cfg.n_head}
    if cfg.position_embedding == "rotary":
        attn_cfg["rotary_emb_dim"] = cfg.rotary_dim or cfg.d_model // cfg.n_head
    return {"d_model": cfg.d_model, "n_layer": cfg.n_layer, "d_inner": cfg.mlp_ratio * cfg.d_model,
            "vocab_size": cfg.vocab_size, "pad_vocab_size_multiple": cfg.pad_vocab_multiple,
            "ssm_cfg": {"mode": "diag", "measure": "diag-lin", "d_state": cfg.d_state},
            "attn_layer_idx": cfg.attn_layer_idx, "attn_cfg": attn_cfg, "layer_norm_epsilon": cfg.layer_norm_eps}


def _hippo_parameters(source: Path, out: Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Tensors under HippoLM names and the model config, of an export folder or a training checkpoint
    (converted in a scratch folder inside `out`)."""
    from hippo.pretrain.checkpoint import CheckpointManager
    from hippo.pretrain.export import checkpoint_parameters
    from hippo.pretrain.models.pretrained import INDEX, WEIGHTS, load_weights, read_config

    if (source / WEIGHTS).is_file() or (source / INDEX).is_file():  # a run folder has a config.json too
        return load_weights(source), from_dict(ModelConfig, read_config(source)["model"], "model")
    params, cfg = checkpoint_parameters(CheckpointManager(source).resolve(source), out)
    return params, cfg.model


def export_h3(source: str | Path, out: str | Path) -> Path:
    """`out`/model.pt (the authors' layout, a plain state dict) and `out`/h3_config.json (their
    model's arguments) from a Hippo export folder or training checkpoint."""
    out = Path(out)
    params, cfg = _hippo_parameters(Path(source), out)
    refuse_document_isolation(cfg, "the authors' H3 model")
    sd = to_h3_state_dict(params, cfg)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{H3_WEIGHTS}.tmp{os.getpid()}"
    torch.save(sd, tmp)
    os.replace(tmp, out / H3_WEIGHTS)
    (out / H3_CONFIG).write_text(json.dumps(h3_model_args(cfg), indent=1))
    return out / H3_WEIGHTS
