"""Typed configuration: one dataclass per section, loaded from YAML, validated in one place.

Unknown keys are errors (a typo in a YAML file must not silently fall back to a default), and
every message names the offending option by its dotted path.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hippo.data_pipeline.config import DataConfig, validate_data_parallel
from hippo.parallel.layout import ParallelLayout, PipelinePartition
from hippo.pretrain.models.config import RUNTIME_FIELDS, ConfigError, ModelConfig

__all__ = [
    "ConfigError",
    "HippoConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "ParallelLayout",
    "CheckpointConfig",
    "TrackingConfig",
    "CONFIG_DIR",
    "from_dict",
    "to_dict",
    "load_config",
    "load_yaml",
    "apply_overrides",
    "resolve_config_path",
]

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW with the paper's SSM parameter rule, and the warmup + cosine schedule."""

    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio."""
    warmup_fraction: float = 0.01
    """Linear warmup over this fraction of the total steps."""
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    ssm_lr_cap: float = 1e-3
    """SSM dynamics (log_dt, A, B of both SSMs) train at min(ssm_lr_cap, lr), without decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"optim.warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip must be >= 0, got {self.grad_clip}")
        self.betas = tuple(self.betas)  # YAML gives lists


@dataclass(kw_only=True)
class TrainConfig:
    """Batch shapes, precision and seed of a training run."""

    steps: int = 1000
    """Optimizer steps of the whole run (the learning-rate schedule spans them)."""
    seq_len: int = 2048
    """Tokens per sample fed to the model (samples hold seq_len + 1 tokens: inputs and labels)."""
    micro_batch_size: int = 1
    """Sequences per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks (micro batch x accumulation x data parallel)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 is for GPUs: CPUs here run bf16 matmuls ~400x slower than fp32."""
    seed: int = 0
    log_interval: int = 1
    """Console lines every this many steps (metrics.jsonl and MLflow get every step)."""
    eval_interval: int = 100
    """Validation loss and perplexity every this many steps, and at the end (0: only at the end)."""
    eval_batches: int = 8
    """Global batches of the validation split per evaluation."""
    max_skipped_steps: int = 5
    """Stop (after a checkpoint of the last good state) after this many non-finite steps in a row."""
    exit_interval: int = 0
    """Checkpoint and exit when the step is a multiple of this (a job-length limit); 0: never."""
    eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks run every `eval_interval` steps and at the end (rank 0, on the
    gathered weights; logged to MLflow as eval/<task>/<metric>); needs the `eval` extra."""
    eval_tasks_include_path: str | None = None
    """Folder of task YAMLs (e.g. over local files) for `eval_tasks`."""
    eval_tasks_limit: float | None = None
    """Examples per task (a fraction when < 1); None: all."""
    time_limit: float = 0.0
    """Wall-clock seconds this invocation may run (e.g. the scheduler's limit minus start-up): the
    run checkpoints and exits cleanly when the next step and checkpoint would not fit; 0: none."""
    eod_mask_loss: bool = False
    """Leave out of the loss every position whose *input* token is the EOS (Megatron-LM's
    `--eod-mask-loss`): the guess of a new document's first token from the end of the previous one.
    The loss is then the mean over the kept positions of the whole global batch, whatever the layout
    (micro-batches, data and context ranks), and the validation loss is masked the same way (as
    Megatron's). The EOS is `model.eos_id`, else the data's tokenizer's (`hippo train`); the model
    config is not changed, so turning it on or off on resume is a `--allow-config-change` change.
    Off, every position counts, as the paper trained."""
    compile: Literal[True, False, "auto"] = "auto"
    """Compile each block in place (`torch.compile` through `nn.Module.compile()`: state-dict keys
    and checkpoints unchanged), in every layout; the compile time is logged once, a failed
    compilation trains eager with one warning. auto: on for CUDA, off on CPU, where it does not
    pay for itself within the quickstart's 300 steps (BENCHMARKS.md, "Compiled blocks")."""
    peak_flops: float = 0.0
    """Peak FLOP/s of one device for MFU (e.g. 989e12 for an H100 in bf16); 0: detected from the GPU's
    name (`hippo.parallel.runtime.PEAK_BF16_FLOPS`; nothing on CPU or an unknown GPU)."""

    def compile_on(self, device_type: str) -> bool:
        """Whether the blocks are compiled on this device type (`compile` with auto resolved)."""
        return device_type == "cuda" if self.compile == "auto" else bool(self.compile)

    def __post_init__(self) -> None:
        for name in ("steps", "seq_len", "micro_batch_size", "global_batch_size", "log_interval", "eval_batches",
                     "max_skipped_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_interval", "exit_interval", "time_limit"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.compile is not True and self.compile is not False and self.compile != "auto":
            raise ConfigError(f"train.compile must be true, false or auto, got {self.compile!r}")
        if self.eval_tasks_limit is not None and self.eval_tasks_limit <= 0:
            raise ConfigError(f"train.eval_tasks_limit must be > 0 (a count, or a fraction below 1), got {self.eval_tasks_limit}")


@dataclass(kw_only=True)
class ParallelConfig:
    """How the model is split: tensor (Megatron layers), pipeline (DeepSpeed), context (each
    sequence in chunks over ranks), data (ZeRO).

    The data-parallel size is what is left of the world size: world / (tensor x pipeline x context).
    """

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    """Split every training sequence into this many contiguous chunks, one per rank of a
    context-parallel group: SSM layers exchange only their states (independent of seq_len),
    attention layers gather keys and values. Gradients are averaged and ZeRO partitions over
    data x context."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0 (none), 1 (optimizer state), 2 (+ gradients; pipeline = 1 only)."""
    pipeline_partition: PipelinePartition = "parameters"
    """How blocks are spread over pipeline stages when `stage_layers` is not given."""
    stage_layers: list[int] = field(default_factory=list)
    """Explicit blocks per pipeline stage (embedding on the first, norm + head on the last)."""
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass (DeepSpeed's checkpointing: TP-dropout safe)."""
    sequence_parallel: bool = False
    """Split norms, residuals and dropout along the sequence over the TP group (tensor > 1)."""

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "context"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.zero_stage == 3:
            raise ConfigError("parallel.zero_stage=3 is not supported by Hippo yet; use 1 (or 2 without a pipeline)")
        if self.zero_stage >= 2 and self.pipeline > 1:
            raise ConfigError(
                f"parallel.zero_stage={self.zero_stage} with parallel.pipeline={self.pipeline}: DeepSpeed "
                "partitions gradients (ZeRO-2/3) only without pipeline parallelism; use zero_stage 0 or 1"
            )


@dataclass(kw_only=True)
class CheckpointConfig:
    """When checkpoints are written and how many are kept (under <run dir>/checkpoints)."""

    interval: int = 1000
    """Save every this many steps (and always at the end and on SIGTERM/SIGINT); 0: only then."""
    keep_last: int = 3
    """Older checkpoints are deleted once a newer one is complete."""

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ConfigError(f"checkpoint.interval must be >= 0, got {self.interval}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass(kw_only=True)
class TrackingConfig:
    """MLflow: a local store in the run folder unless a tracking URI is given."""

    enabled: bool = True
    experiment: str = "hippo"
    tracking_uri: str | None = None
    """None: $MLFLOW_TRACKING_URI if set, else sqlite in the run folder (no server needed)."""
    system_metrics: bool = True


# ------------------------------------------------------------------------------ loading
# Own coercion, not pydantic/dacite/OmegaConf: keeps the sections plain dataclasses, names the dotted
# option in every error, refuses bools as ints, and reads YAML 1.1's "6e-4" strings as floats.
def _convert(value: Any, tp: Any, path: str) -> Any:
    """Coerce a YAML value into annotation `tp`, recursing into dataclasses."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path} must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error names the problem
            return _convert(value, options[0], path)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}={value!r} does not match {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed arity: tuple[float, float]
            if len(value) != len(args):
                raise ConfigError(f"{path} must have {len(args)} items, got {value!r}")
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "6e-4" as a string
        except ValueError:
            pass
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{path} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys raise naming the option."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    prefix = f"{path}." if path else ""
    if unknown:
        raise ConfigError(f"unknown option(s) {[prefix + k for k in unknown]}; valid: {sorted(names)}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in data.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"missing required option(s) {[prefix + k for k in missing]}")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # sections outside this module validate with ValueError
        raise ConfigError(str(e)) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain (YAML/JSON-serializable) form of a config dataclass."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a shipped config in `configs/` (with or without .yaml)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    for candidate in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if candidate.exists():
            return candidate
    raise ConfigError(f"config {str(name_or_path)!r} not found (nor in {CONFIG_DIR})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = resolve_config_path(path)
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


@dataclass(kw_only=True)
class HippoConfig:
    """The whole run. Sections are added as components land; each validates its own fields."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig | None = None
    """Prepared training data (`hippo data prepare`); required by `hippo train`."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def layout(self, world_size: int) -> ParallelLayout:
        """Check the sections against each other and the world size; refuse any layout that
        cannot run, before a process does work. Each message names the option to change."""
        m, p, t = self.model, self.parallel, self.train
        tp, pp, cp = p.tensor, p.pipeline, p.context
        if world_size % (tp * pp * cp):
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor x parallel.pipeline x parallel.context "
                f"= {tp} x {pp} x {cp}"
            )
        dp = world_size // (tp * pp * cp)
        if cp > 1:
            self._check_context(cp)
        if m.d_model % tp:
            raise ConfigError(f"model.d_model={m.d_model} is not divisible by parallel.tensor={tp}")
        if m.uses_attention and m.n_head % tp:
            raise ConfigError(f"model.n_head={m.n_head} is not divisible by parallel.tensor={tp}")
        if m.padded_vocab_size % tp:
            raise ConfigError(
                f"padded vocabulary {m.padded_vocab_size} is not divisible by parallel.tensor={tp}: "
                f"set model.pad_vocab_multiple to a multiple of {tp}"
            )
        if tp > 1 and "s4d" in m.layer_mixers:
            raise ConfigError("model.mixer=s4d (the paper's baseline) does not support parallel.tensor > 1")
        if p.sequence_parallel:
            if tp == 1:
                raise ConfigError("parallel.sequence_parallel needs parallel.tensor > 1")
            if t.seq_len % tp:
                raise ConfigError(f"parallel.sequence_parallel: train.seq_len={t.seq_len} is not divisible by parallel.tensor={tp}")
            if m.position_embedding == "learned":
                raise ConfigError("parallel.sequence_parallel does not support model.position_embedding=learned (use rotary)")
        if m.document_isolation and p.activation_checkpointing and pp == 1 and p.zero_stage >= 2:
            raise ConfigError("parallel.activation_checkpointing with model.document_isolation and parallel.zero_stage>=2 "
                              "is not supported yet (the plain engine's recomputed blocks would drop the boundary map's "
                              "gradient path); use zero_stage 1 or turn one of them off")
        if m.n_layer < pp:
            raise ConfigError(f"model.n_layer={m.n_layer} is fewer than parallel.pipeline={pp} stages")
        if p.stage_layers:
            if len(p.stage_layers) != pp or sum(p.stage_layers) != m.n_layer or min(p.stage_layers) < 1:
                raise ConfigError(
                    f"parallel.stage_layers={p.stage_layers} must list parallel.pipeline={pp} counts >= 1 "
                    f"summing to model.n_layer={m.n_layer}"
                )
        if self.data is not None:
            try:
                validate_data_parallel(self.data, dp, t.micro_batch_size, t.global_batch_size)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        per_step = t.micro_batch_size * dp
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size x "
                f"data-parallel size = {t.micro_batch_size} x {dp}"
            )
        return ParallelLayout(
            world_size, tp, pp, dp, t.micro_batch_size, t.global_batch_size // per_step, context=cp, zero_stage=p.zero_stage,
            sequence_parallel=p.sequence_parallel, activation_checkpointing=p.activation_checkpointing,
            pipeline_partition=p.pipeline_partition, stage_layers=tuple(p.stage_layers),
        )


    def _check_context(self, cp: int) -> None:
        m, p, t = self.model, self.parallel, self.train
        if t.seq_len % cp:
            raise ConfigError(f"train.seq_len={t.seq_len} is not divisible by parallel.context={cp}: "
                              "every rank holds an equal chunk of each sequence")
        if p.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel with parallel.context > 1 is not supported yet; "
                              "use one of them")
        if m.dropout > 0 and m.uses_attention:
            raise ConfigError(f"model.dropout={m.dropout} with parallel.context={cp} is not supported yet for models "
                              "with attention layers (attention dropout's masks would differ from one process's); "
                              "set model.dropout=0")
        if m.position_embedding == "learned" and t.seq_len > m.max_position_embeddings:
            raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_position_embeddings="
                              f"{m.max_position_embeddings}")


RESUME_FREE = ("parallel.", "model.conv_impl", "train.compile", "train.exit_interval", "train.time_limit",
               "train.log_interval", "data.max_corrupt_fraction")
"""May differ from the checkpoint's config: a new layout loads through a universal checkpoint, and
these say how this invocation runs, not what is trained."""
RESUME_NEVER = ("model.",)
"""Never differ on resume: they say what the checkpoint's tensors mean (`RUNTIME_FIELDS` excepted)."""


_MODEL_DEFAULTS = {f"model.{k}": v for k, v in dataclasses.asdict(ModelConfig()).items()}


def resume_changes(saved: dict[str, Any], cfg: HippoConfig) -> tuple[list[str], list[str]]:
    """How `cfg` differs from a checkpoint's saved config, as 'key: old -> new' lines:
    (changes that are refused, changes that need `--allow-config-change`)."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix[:-1]: d}
        return {k: v for key, value in d.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    old, new = flat(saved), flat(to_dict(cfg))
    for side in (old, new):  # the same folders, written as another relative path
        if isinstance(side.get("data.paths"), list):
            side["data.paths"] = [str(Path(p).resolve()) for p in side["data.paths"]]
    never, flagged = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or key.startswith(RESUME_FREE):
            continue
        if key not in old and not any(k.startswith(key + ".") for k in old):
            # An option added since the checkpoint was written: it had its default there, so only
            # a model option set away from its default is a change (isolation on over weights
            # trained without it); others keep their old leniency.
            default = _MODEL_DEFAULTS.get(key, new.get(key))
            if new.get(key) == default:
                continue
            old[key] = default
        line = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        weights_meaning = key.startswith(RESUME_NEVER) and key.split(".", 1)[1] not in RUNTIME_FIELDS
        (never if weights_meaning else flagged).append(line)
    return never, flagged


def run_folder(config: str, run_dir: str | None) -> Path:
    """`--run-dir`, else `runs/<config name>`; a regular file there is refused (mkdir would fail later)."""
    folder = Path(run_dir) if run_dir else Path("runs") / Path(config).stem
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--run-dir {folder} is a file, not a folder: name a folder (it is created if missing)")
    return folder


def load_config(path: str | Path, overrides: list[str] | None = None) -> HippoConfig:
    """YAML file (or shipped config name) + `key=value` overrides -> validated HippoConfig."""
    data = apply_overrides(load_yaml(path), overrides or [])
    return from_dict(HippoConfig, data)
