"""The paper's synthetic languages (H3 paper, Table 1): associative recall and induction head.

Both test in-context recall, the ability the paper shows S4D-style SSMs lack and H3's shift SSM
plus multiplicative interaction provide. Vocabulary: ordinary tokens 0..V-3, then "=>" (V-2)
and a no-op (V-1).
- Associative recall: each sequence draws its own random key->value map (keys from the first
  half of the ordinary tokens, values from the second), lists `num_pairs` key-value pairs,
  then "=>", one of the keys that appeared (uniform over the distinct keys), and its value.
- Induction head: `seq_len` random tokens in which "=>" X appears once, never as the last two
  of them; the sequence ends with "=>" and the model must emit X.
Each split holds distinct sequences.

The recipe follows the authors' safari configs (`configs/experiment/synthetics/*`, the `lm_simple`
model, `src/dataloaders/synthetics.py`); BENCHMARKS.md lists each point and the few deliberate
differences (a separate validation set for early stopping, a seed that also draws the data).
Training uses next-token loss on every position by default (`loss="all"`, as the authors' code
does) or on the answer token only (`loss="last"`); accuracy is on the last token either way.

Training runs several seeds as one batched ensemble (`EnsembleLM`): parameters carry a leading
seed dimension (the per-channel SSMs hold every member's channels side by side), so one step of
E seeds is one pass of batched matmuls and one SSM call instead of E passes of tiny ops. Dropout
masks come from each member's own generator, so a member trains exactly as it would alone
(`tests/pretrain/test_synthetic.py` checks the weights and losses against one-seed runs).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from hippo.kernels import h3_core
from hippo.pretrain.models import HippoLM
from hippo.pretrain.models.config import ModelConfig
from hippo.pretrain.models.h3 import CONV_IMPLS
from hippo.pretrain.models.init import init_parameters, parameter_seed
from hippo.pretrain.models.ssm import DiagonalSSM, ShiftSSM, is_ssm_dynamics

log = logging.getLogger(__name__)

Task = Literal["associative_recall", "induction_head"]


@dataclass(kw_only=True)
class SyntheticConfig:
    task: Task = "associative_recall"
    mixer: Literal["h3", "s4d", "attention"] = "h3"
    vocab_size: int = 20
    """Including the two special tokens."""
    seq_len: int = 30
    """Induction head: random tokens before the final "=>" (associative recall uses num_pairs)."""
    num_pairs: int = 20
    num_train: int = 5000
    num_val: int = 500
    num_test: int = 500
    epochs: int = 400
    """The paper's budget (with early stop on validation accuracy)."""
    batch_size: int = 32
    lr: float = 5e-4
    warmup_fraction: float = 0.1
    """Linear warmup over ceil(fraction x epochs) epochs (the authors: div_up(max_epochs, 10))."""
    warmup_lr_init: float = 1e-6
    """The warmup starts here (timm's `warmup_lr_init` in the authors' config), not at 0."""
    min_lr_ratio: float = 0.1
    """The cosine ends at lr x this (the authors' `lr_min: 0.1 * lr`)."""
    weight_decay: float = 0.1
    """On every parameter but the SSM dynamics, biases and norms included (the authors' optimizer
    has no parameter grouping for these runs)."""
    grad_clip: float = 0.0
    """Per-seed gradient-norm clip; 0 (the authors' trainer default) disables it."""
    d_model: int = 32
    n_layer: int = 2
    n_head: int = 1
    embed_dropout: float = 0.1
    """On the embeddings (the authors' `embed_dropout`; their residual dropout is 0)."""
    attn_dropout: float = 0.1
    """On the attention probabilities (the authors' transformer `attn_cfg.dropout`)."""
    s4d_glu: bool = False
    """S4D baseline output map: the authors' plain d -> d (False) or Hippo's gated GLU (True)."""
    loss: Literal["all", "last"] = "all"
    """Next-token loss on every position (the authors' objective) or on the answer token only."""
    stop_accuracy: float = 1.0
    """Stop once validation accuracy reaches this (checked every epoch)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.vocab_size < 6:
            raise ValueError("--vocab-size must be >= 6 (two special tokens, >= 2 keys and values)")
        if self.num_pairs < 1 or self.seq_len < 3:
            raise ValueError("--num-pairs must be >= 1 and --seq-len >= 3")
        if self.loss not in ("all", "last"):
            raise ValueError(f"--loss must be 'all' or 'last', got {self.loss!r}")
        if self.grad_clip < 0:
            raise ValueError(f"--grad-clip must be >= 0, got {self.grad_clip}")


def special_tokens(vocab_size: int) -> tuple[int, int]:
    """(arrow "=>", no-op)."""
    return vocab_size - 2, vocab_size - 1


# --------------------------------------------------------------------------- data


def associative_recall(n: int, vocab_size: int, num_pairs: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2 num_pairs + 3) sequences ending in "=>", key, value.

    As the authors draw them: a fresh key -> value map per sequence (values with replacement),
    keys of the pairs uniform with replacement, the query uniform over the distinct keys present
    (not weighted by how often a key occurs)."""
    ordinary = vocab_size - 2
    keys = np.arange(ordinary // 2)
    values = np.arange(ordinary // 2, ordinary)
    arrow, _ = special_tokens(vocab_size)
    out = np.empty((n, 2 * num_pairs + 3), dtype=np.int64)
    for i in range(n):
        kv_map = rng.choice(values, size=len(keys))  # this sequence's own key -> value map
        ks = rng.choice(keys, size=num_pairs)
        out[i, 0 : 2 * num_pairs : 2] = ks
        out[i, 1 : 2 * num_pairs : 2] = kv_map[ks]
        query = rng.choice(np.unique(ks))
        out[i, -3:] = (arrow, query, kv_map[query])
    return out


def induction_head(n: int, vocab_size: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """(n, seq_len + 2) sequences: random tokens with one "=>" X inside, then "=>", X.

    The inner "=>" sits at 0..seq_len-3 (the authors' `integers(input_seq_len - 2)`), so X is
    never the token right before the final "=>"."""
    ordinary = vocab_size - 2
    arrow, _ = special_tokens(vocab_size)
    out = np.empty((n, seq_len + 2), dtype=np.int64)
    for i in range(n):
        seq = rng.integers(0, ordinary, size=seq_len)
        pos = rng.integers(0, seq_len - 2)  # "=>" at pos, X at pos + 1 <= seq_len - 2
        seq[pos] = arrow
        out[i, :seq_len] = seq
        out[i, seq_len:] = (arrow, seq[pos + 1])
    return out


def query_occurrences(seqs: torch.Tensor) -> torch.Tensor:
    """(..., 2 P + 3) associative-recall sequences -> (...,) how many of the P pairs hold the
    queried key. A key seen once must be looked up exactly; a key seen several times has its value
    stored several times, which a lossy superposed memory (an SSM state) recalls more easily."""
    return (seqs[..., 0:-3:2] == seqs[..., -2:-1]).sum(-1)


OCCURRENCE_GROUPS = ("1", "2", "3+")
"""How `accuracy_by_occurrence` groups the validation set: queries of a key seen 1, 2, >= 3 times."""


def distinct_sequences(draw: Callable[[int], np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct sequences from `draw`, in random order: the authors deduplicate each split, so a
    small task cannot fill it with copies of a few sequences."""
    data = np.unique(draw(n), axis=0)
    for _ in range(100):
        if len(data) >= n:
            return data[rng.permutation(len(data))]
        data = np.unique(np.concatenate([data, draw(n - len(data))]), axis=0)
    raise ValueError(f"could not draw {n} distinct sequences: the task has too few (raise --vocab-size or the length)")


def make_split(cfg: SyntheticConfig, n: int, rng: np.random.Generator) -> torch.Tensor:
    if cfg.task == "associative_recall":
        draw = lambda m: associative_recall(m, cfg.vocab_size, cfg.num_pairs, rng)  # noqa: E731
    else:
        draw = lambda m: induction_head(m, cfg.vocab_size, cfg.seq_len, rng)  # noqa: E731
    return torch.from_numpy(distinct_sequences(draw, n, rng))


def make_splits(cfg: SyntheticConfig, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train, val, test) of one seed, drawn in that order from one generator."""
    rng = np.random.default_rng(seed)
    return tuple(make_split(cfg, n, rng) for n in (cfg.num_train, cfg.num_val, cfg.num_test))  # type: ignore[return-value]


# --------------------------------------------------------------------------- model


def build_model(cfg: SyntheticConfig, length: int, seed: int | None = None) -> HippoLM:
    """The authors' `lm_simple` at d_model 32: pre-norm blocks, MLP 4 x d_model with tanh-GELU,
    final LayerNorm, head tied to an unpadded embedding; learned positions for attention only.

    Dropout is 0 inside the model: `EnsembleLM` applies the embedding and attention dropout with
    per-seed generators (the model's own would draw from the global RNG). H3 runs the reference
    convolution (one full-length FFT, as the authors' layer does): at these lengths (<= 43) it
    beats the chunked state-passing path's many small blocks, 1.3-1.7x a training step measured."""
    seed = cfg.seed if seed is None else seed
    attention = cfg.mixer == "attention"
    model_cfg = ModelConfig(
        vocab_size=cfg.vocab_size,
        pad_vocab_multiple=1,
        d_model=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        mixer=cfg.mixer,
        position_embedding="learned" if attention else "none",
        max_position_embeddings=length,
        dropout=0.0,
        conv_impl="reference",
    )
    model = HippoLM(model_cfg, init=False)
    if cfg.mixer == "s4d" and not cfg.s4d_glu:
        for block in model.layers.values():
            block.mixer.glu = False
            block.mixer.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
    init_parameters(model, model_cfg, seed=seed)
    return model


_SSM_TYPES = (ShiftSSM, DiagonalSSM)


def _key(name: str) -> str:
    return name.replace(".", "__")


class EnsembleLM(nn.Module):
    """E copies of one `build_model` architecture as one module: every parameter gets a leading
    seed dimension, except the per-channel SSM parameters, whose members sit side by side on the
    channel axis (E x C channels), so one `h3_core` or SSM call serves every seed.

    Computes `HippoLM.forward` of each member (checked in the tests), plus the authors' dropout:
    on the embeddings and on the attention probabilities, masks from each member's generator.
    """

    def __init__(self, members: Sequence[HippoLM], cfg: SyntheticConfig):
        super().__init__()
        ref = members[0]
        self.E, self.cfg, self.model_cfg = len(members), cfg, ref.cfg
        self.ssm_paths = sorted(n for n, m in ref.named_modules() if isinstance(m, _SSM_TYPES))
        self.stacked = nn.ParameterDict()
        self.ssms = nn.ModuleDict()
        member_params = [dict(m.named_parameters()) for m in members]
        for name in member_params[0]:
            if name.rsplit(".", 1)[0] not in self.ssm_paths:
                self.stacked[_key(name)] = nn.Parameter(torch.stack([p[name].detach() for p in member_params]))
        for path in self.ssm_paths:
            self.ssms[_key(path)] = self._side_by_side([m.get_submodule(path) for m in members])
        self.conv_impl = CONV_IMPLS[self.model_cfg.conv_impl]
        self.causal = torch.ones(0, 0, dtype=torch.bool)

    def _side_by_side(self, mods: list[nn.Module]) -> nn.Module:
        channels, d_state = mods[0].D.shape[0], mods[0].C.shape[1] * (2 if isinstance(mods[0], DiagonalSSM) else 1)
        big = type(mods[0])(self.E * channels, d_state)
        with torch.no_grad():
            for name, p in big.named_parameters(recurse=False):
                p.copy_(torch.cat([getattr(m, name) for m in mods]))
        return big

    def member_parameters(self, e: int) -> dict[str, torch.Tensor]:
        """Member e's parameters under `HippoLM` names (views)."""
        out = {k.replace("__", "."): p[e] for k, p in self.stacked.items()}
        for path in self.ssm_paths:
            for name, p in self.ssms[_key(path)].named_parameters(recurse=False):
                out[f"{path}.{name}"] = p.view(self.E, -1, *p.shape[1:])[e]
        return out

    @torch.no_grad()
    def select(self, members: Sequence[int], optimizer: torch.optim.Optimizer) -> None:
        """Keep only `members` (indices, in this order), their AdamW moments with them: seeds that
        have stopped leave the ensemble, so the rest train at the cost of fewer seeds."""
        idx = torch.tensor(list(members))

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(self.E, -1)[idx].reshape(t.shape[0] // self.E * len(idx), *t.shape[1:])

        for p in self.parameters():
            state = optimizer.state.get(p, {})
            for name in ("exp_avg", "exp_avg_sq"):
                if name in state:
                    state[name] = pick(state[name])
            p.data, p.grad = pick(p.data), None
        self.E = len(idx)

    def _p(self, name: str) -> torch.Tensor:
        return self.stacked[_key(name)]

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x (E, ..., in) through member e's Linear `name` (weight (E, out, in), bias (E, out))."""
        w, b = self._p(name + ".weight"), self._p(name + ".bias")
        y = torch.baddbmm(b.unsqueeze(1), x.reshape(self.E, -1, x.shape[-1]), w.transpose(1, 2))
        return y.view(*x.shape[:-1], w.shape[1])

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w, b = self._p(name + ".weight"), self._p(name + ".bias")
        y = F.layer_norm(x, x.shape[-1:], eps=self.model_cfg.layer_norm_eps)
        return y * w[:, None, None] + b[:, None, None]

    @staticmethod
    def _dropout(x: torch.Tensor, p: float, gens: Sequence[torch.Generator] | None) -> torch.Tensor:
        """Member e's slice x[e] masked by a draw of its own generator, the same draw whatever E."""
        if gens is None or p == 0.0:
            return x
        keep = torch.stack([torch.rand(x.shape[1:], generator=g) for g in gens]) >= p
        return x * keep * (1.0 / (1.0 - p))

    def _channels(self, x: torch.Tensor) -> torch.Tensor:
        """(E, B, L, D) -> (B, E*D, L): the member's batch goes to its own channels."""
        E, B, L, D = x.shape
        return x.permute(1, 0, 3, 2).reshape(B, E * D, L)

    def _unchannels(self, y: torch.Tensor) -> torch.Tensor:
        B, ED, L = y.shape
        return y.view(B, self.E, ED // self.E, L).permute(1, 0, 3, 2)

    def _h3(self, x: torch.Tensor, pre: str) -> torch.Tensor:
        q, k, v = (self._channels(self._linear(x, f"{pre}.{n}_proj")) for n in ("q", "k", "v"))
        sh, dg = self.ssms[_key(pre + ".shift_ssm")], self.ssms[_key(pre + ".diag_ssm")]
        y = h3_core(q, k, v, sh.B.float(), sh.C.float(), sh.D.float(), dg.discrete(), dg.D.float(), impl=self.conv_impl)
        return self._linear(self._unchannels(y), pre + ".out_proj")

    def _s4d(self, x: torch.Tensor, pre: str) -> torch.Tensor:
        y = F.gelu(self._unchannels(self.ssms[_key(pre + ".ssm")](self._channels(x))))
        y = self._linear(y, pre + ".out_proj")
        return F.glu(y, dim=-1) if self.cfg.s4d_glu else y

    def _attention(self, x: torch.Tensor, pre: str, gens: Sequence[torch.Generator] | None) -> torch.Tensor:
        E, B, L, D = x.shape
        H = self.model_cfg.n_head
        q, k, v = (self._linear(x, f"{pre}.{n}_proj").view(E, B, L, H, D // H).transpose(2, 3) for n in ("q", "k", "v"))
        scores = (q @ k.transpose(-1, -2)) * (D // H) ** -0.5  # (E, B, H, L, L)
        if self.causal.shape[0] != L:
            self.causal = torch.ones(L, L, dtype=torch.bool).triu(1)
        probs = self._dropout(scores.masked_fill(self.causal, float("-inf")).softmax(-1), self.cfg.attn_dropout, gens)
        y = (probs @ v).transpose(2, 3).reshape(E, B, L, D)
        return self._linear(y, pre + ".out_proj")

    def forward(self, ids: torch.Tensor, gens: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """ids (E, B, L) -> logits (E, B, L, vocab); `gens` (one per member) turns dropout on."""
        E, B, L = ids.shape
        h = self._p("embedding.word.weight")[torch.arange(E)[:, None, None], ids]
        if _key("embedding.position.weight") in self.stacked:
            h = h + self._p("embedding.position.weight")[:, None, :L]
        h = self._dropout(h, self.cfg.embed_dropout, gens)
        for i, kind in enumerate(self.model_cfg.layer_mixers):
            pre = f"layers.{i}"
            x = self._norm(h, pre + ".norm1")
            if kind == "h3":
                h = h + self._h3(x, pre + ".mixer")
            elif kind == "s4d":
                h = h + self._s4d(x, pre + ".mixer")
            else:
                h = h + self._attention(x, pre + ".mixer", gens)
            x = self._norm(h, pre + ".norm2")
            h = h + self._linear(F.gelu(self._linear(x, pre + ".mlp.fc1"), approximate="tanh"), pre + ".mlp.fc2")
        h = self._norm(h, "norm_f")
        word = self._p("embedding.word.weight")
        return torch.bmm(h.reshape(E, B * L, -1), word.transpose(1, 2)).view(E, B, L, -1)


# --------------------------------------------------------------------------- optimizer and schedule


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, init_ratio: float, min_ratio: float) -> float:
    """The authors' schedule (timm CosineLRScheduler, t_in_epochs False, warmup_prefix False):
    linear warmup from init_ratio, then the cosine of the *absolute* step over all steps, so after
    a 10% warmup it starts at 0.978 x lr (0.1 + 0.45 (1 + cos(0.1 pi))): the peak lr is never used.
    It ends at min_ratio."""
    if step < warmup_steps:
        return init_ratio + step * (1.0 - init_ratio) / warmup_steps
    if step >= total_steps:
        return min_ratio
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * step / total_steps))


def steps_per_epoch(cfg: SyntheticConfig) -> int:
    return (cfg.num_train + cfg.batch_size - 1) // cfg.batch_size


def warmup_steps(cfg: SyntheticConfig) -> int:
    """Whole epochs, as the authors count them: steps_per_epoch x div_up(epochs, 10)."""
    return steps_per_epoch(cfg) * math.ceil(cfg.warmup_fraction * cfg.epochs - 1e-9)


def build_optimizer(model: EnsembleLM, cfg: SyntheticConfig) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW: the SSM dynamics (log_dt, A, B) at min(1e-3, lr) without decay, every other
    parameter at lr with decay (the authors' `_optim` hook and plain AdamW); AdamW is elementwise,
    so the stacked members update exactly as separate optimizers would."""
    ssm = [p for p in model.parameters() if is_ssm_dynamics(p)]
    rest = [p for p in model.parameters() if not is_ssm_dynamics(p)]
    groups = [
        {"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": ssm, "lr": min(1e-3, cfg.lr), "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    total = cfg.epochs * steps_per_epoch(cfg)
    lambdas = [_group_schedule(g["lr"], cfg, total) for g in groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def _group_schedule(group_lr: float, cfg: SyntheticConfig, total: int) -> Callable[[int], float]:
    """timm's warmup start and floor are absolute lrs, shared by every group."""
    init, floor = cfg.warmup_lr_init / group_lr, cfg.min_lr_ratio * cfg.lr / group_lr
    warm = warmup_steps(cfg)
    return lambda s: lr_multiplier(s, total, warm, init, floor)


# --------------------------------------------------------------------------- training


class EnsembleTrainer:
    """Trains one `EnsembleLM` of the given seeds; member e sees exactly what a one-seed run
    of seeds[e] sees: its data, its shuffling, its init, its dropout masks."""

    def __init__(self, cfg: SyntheticConfig, seeds: Sequence[int]):
        self.cfg, self.seeds, self.E = cfg, list(seeds), len(seeds)
        splits = [make_splits(cfg, s) for s in self.seeds]
        self.train, self.val, self.test = (torch.stack([s[i] for s in splits]) for i in range(3))
        length = self.train.shape[-1] - 1
        self.model = EnsembleLM([build_model(cfg, length, seed=s) for s in self.seeds], cfg)
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg)
        self.order_gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        self.dropout_gens = [torch.Generator().manual_seed(parameter_seed(s, "synthetic dropout")) for s in self.seeds]

    def select(self, members: Sequence[int]) -> None:
        """Continue with `members` (indices into the current seeds) only."""
        self.model.select(members, self.optimizer)
        idx = torch.tensor(list(members))
        self.train, self.val, self.test = self.train[idx], self.val[idx], self.test[idx]
        self.seeds = [self.seeds[e] for e in members]
        self.order_gens = [self.order_gens[e] for e in members]
        self.dropout_gens = [self.dropout_gens[e] for e in members]
        self.E = len(self.seeds)

    def step(self, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on seqs (E, b, L); returns (training loss (E,), answer-token
        cross-entropy summed over the batch (E,)), both on the device, not synced."""
        logits = self.model(seqs[:, :, :-1], self.dropout_gens)
        losses = self._loss(logits, seqs)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # members share no parameter: each gets its own loss's gradient
        if self.cfg.grad_clip > 0:
            self._clip_per_member(self.cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        answer = F.cross_entropy(logits[:, :, -1].detach().flatten(0, 1), seqs[:, :, -1].flatten(), reduction="none")
        return losses.detach(), answer.view(self.E, -1).sum(1)

    def _loss(self, logits: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
        """Per member: mean next-token cross entropy over every position, or the answer only."""
        if self.cfg.loss == "last":
            logits, targets = logits[:, :, -1:], seqs[:, :, -1:]
        else:
            targets = seqs[:, :, 1:]
        ce = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none")
        return ce.view(self.E, -1).mean(1)

    def _member_views(self) -> list[torch.Tensor]:
        """Every gradient as (E, -1): stacked ones by their first dim, SSM ones by channel block."""
        return [p.grad.view(self.E, -1) for p in self.model.parameters() if p.grad is not None]

    @torch.no_grad()
    def _clip_per_member(self, max_norm: float) -> None:
        """`clip_grad_norm_` of each member on its own gradients."""
        grads = self._member_views()
        norms = torch.stack([g.pow(2).sum(1) for g in grads]).sum(0).sqrt()
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef[:, None])

    def train_epoch(self) -> torch.Tensor:
        """One epoch, each member in its own shuffled order; answer-token loss sums (E,)."""
        orders = torch.stack([torch.randperm(self.train.shape[1], generator=g) for g in self.order_gens])
        members = torch.arange(self.E)[:, None]
        answer = torch.zeros(self.E)
        for start in range(0, self.train.shape[1], self.cfg.batch_size):
            _, a = self.step(self.train[members, orders[:, start : start + self.cfg.batch_size]])
            answer += a
        return answer

    @torch.no_grad()
    def answer_logits(self, data: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        """(E, n, V) logits of the answer token of every sequence of data (E, n, L), eval mode."""
        return torch.cat([self.model(data[:, s : s + batch_size, :-1])[:, :, -1]
                          for s in range(0, data.shape[1], batch_size)], dim=1)

    def evaluate(self, data: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """(accuracy, mean cross entropy) of the answer token per member; ln(V - 2) is chance loss."""
        logits = self.answer_logits(data, batch_size)
        correct = (logits.argmax(-1) == data[:, :, -1]).float().mean(1)
        ce = F.cross_entropy(logits.flatten(0, 1), data[:, :, -1].flatten(), reduction="none")
        return correct, ce.view(self.E, -1).mean(1)

    def accuracy_by_occurrence(self, data: torch.Tensor) -> torch.Tensor:
        """(E, 3) associative-recall accuracy per member on the queries of a key the context holds
        once, twice, three times or more (`OCCURRENCE_GROUPS`); NaN for an empty group."""
        correct = (self.answer_logits(data).argmax(-1) == data[:, :, -1]).float()
        count = query_occurrences(data).clamp(max=len(OCCURRENCE_GROUPS))
        out = torch.full((self.E, len(OCCURRENCE_GROUPS)), float("nan"))
        for g in range(len(OCCURRENCE_GROUPS)):
            mask = count == g + 1
            out[:, g] = (correct * mask).sum(1) / mask.sum(1)
        return out


def run_seeds(cfg: SyntheticConfig, seeds: Sequence[int], progress: bool = True, log_every: int = 10) -> list[dict]:
    """Train one model per seed, all as one ensemble; per seed: the test accuracy at its best
    validation epoch, the validation accuracy and epoch it stopped at, its validation accuracy at
    every epoch, and the ensemble's seconds until then.

    Model selection follows the authors' checkpoint on the best validation accuracy, with a
    validation set of its own (theirs is the test set): `test_accuracy` is read at the first
    epoch with the seed's highest validation accuracy, `test_accuracy_last` at its last epoch.
    A seed stops (and leaves the ensemble) at the first epoch its validation accuracy reaches
    `stop_accuracy`. Every `log_every` epochs logs each seed's answer-token loss on the training
    batches and on the validation set: a model stuck at chance shows both at ln(V - 2); one
    memorising the training set shows the first falling while the second rises. On associative
    recall it also logs (and keeps, `val_by_query_count`) the validation accuracy split by how
    often the queried key occurs in the context: a model that recalls only repeated keys shows
    it there.
    """
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds repeat: {list(seeds)}")
    trainer = EnsembleTrainer(cfg, seeds)
    results: dict[int, dict] = {}
    curves: dict[int, list[float]] = {s: [] for s in seeds}
    occurrence: dict[int, list[tuple[int, list[float]]]] = {s: [] for s in seeds}
    best: dict[int, tuple[float, int, float]] = {s: (-1.0, 0, 0.0) for s in seeds}  # (val, epoch, test)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=f"{cfg.task}/{cfg.mixer} x{trainer.E}", disable=not progress)
    for epoch in bar:
        answer = trainer.train_epoch()
        val_acc, val_loss = trainer.evaluate(trainer.val)
        val_acc_l = val_acc.tolist()  # the one host sync of an epoch (and one more when a seed improves)
        bar.set_postfix(val_acc=" ".join(f"{a:.3f}" for a in val_acc_l))
        for e, seed in enumerate(trainer.seeds):
            curves[seed].append(round(val_acc_l[e], 4))
        improved = [e for e, seed in enumerate(trainer.seeds) if val_acc_l[e] > best[seed][0]]
        last = epoch + 1 == cfg.epochs
        stopping = [e for e in range(trainer.E) if last or val_acc_l[e] >= cfg.stop_accuracy]
        test_acc = trainer.evaluate(trainer.test)[0].tolist() if improved or stopping else None
        for e in improved:
            best[trainer.seeds[e]] = (val_acc_l[e], epoch + 1, test_acc[e])
        if log_every and (epoch + 1) % log_every == 0:
            by_count = trainer.accuracy_by_occurrence(trainer.val).tolist() if cfg.task == "associative_recall" else None
            for e, seed in enumerate(trainer.seeds):
                split = ""
                if by_count is not None:
                    occurrence[seed].append((epoch + 1, [round(a, 4) for a in by_count[e]]))
                    split = ", by query-key count " + " ".join(
                        f"{g}: {a:.3f}" for g, a in zip(OCCURRENCE_GROUPS, by_count[e]))
                log.info("seed %d epoch %d: answer-token loss train %.3f val %.3f, val accuracy %.3f (best %.3f at %d)%s",
                         seed, epoch + 1, answer[e].item() / trainer.train.shape[1], val_loss[e].item(),
                         val_acc_l[e], best[seed][0], best[seed][1], split)
        if not stopping:
            continue
        for e in stopping:
            seed = trainer.seeds[e]
            results[seed] = {"seed": seed, "test_accuracy": best[seed][2], "test_accuracy_last": test_acc[e],
                             "best_epoch": best[seed][1], "val_accuracy": val_acc_l[e], "epochs": epoch + 1,
                             "val_curve": curves[seed], "val_by_query_count": occurrence[seed],
                             "seconds": time.perf_counter() - t0}
        staying = [e for e in range(trainer.E) if e not in stopping]
        if not staying:
            break
        trainer.select(staying)
    return [results[s] for s in seeds]


def run(cfg: SyntheticConfig, progress: bool = True, log_every: int = 10) -> dict[str, float]:
    """One seed (`cfg.seed`): an ensemble of one."""
    return run_seeds(cfg, [cfg.seed], progress=progress, log_every=log_every)[0]


def summarize(results: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean and minimum test accuracy over seeds: the issue's targets are mean >= 0.97, min >= 0.95."""
    accs = [r["test_accuracy"] for r in results]
    return {"mean": float(np.mean(accs)), "min": float(np.min(accs))}
