"""The synthetic languages follow the authors' generator, the model and optimizer their recipe
(HazyResearch/safari; BENCHMARKS.md), the seed ensemble trains each seed exactly as a one-seed run,
and the CLI runs end to end."""

import math

import numpy as np
import pytest
import torch

from hippo.pretrain.cli import _parse_seeds, main
from hippo.pretrain.models.ssm import is_ssm_dynamics
from hippo.pretrain.synthetic import (
    EnsembleTrainer,
    SyntheticConfig,
    associative_recall,
    build_model,
    build_optimizer,
    induction_head,
    make_split,
    query_occurrences,
    run_seeds,
    special_tokens,
    warmup_steps,
)


def test_associative_recall_sequences():
    rng = np.random.default_rng(0)
    data = associative_recall(200, vocab_size=20, num_pairs=20, rng=rng)
    arrow, noop = special_tokens(20)
    assert data.shape == (200, 43)
    for seq in data:
        keys, values = seq[0:40:2], seq[1:40:2]
        assert keys.max() < 9 and values.min() >= 9 and values.max() < 18
        assert seq[40] == arrow and seq[41] in keys
        # one map per sequence: a repeated key always carries the same value
        for k in set(keys.tolist()):
            assert len(set(values[keys == k].tolist())) == 1
        assert seq[42] == values[keys == seq[41]][0]
        assert noop not in seq
    # the map differs between sequences, so it cannot be memorized
    first_value_of_key0 = {int(s[1:40:2][s[0:40:2] == 0][0]) for s in data if (s[0:40:2] == 0).any()}
    assert len(first_value_of_key0) > 1


def test_associative_recall_query_is_uniform_over_the_distinct_keys():
    """The authors draw the query among the keys present, each once (not weighted by how often a
    key occurs): a key seen once is queried with probability 1/distinct, not 1/num_pairs."""
    data = associative_recall(3000, vocab_size=20, num_pairs=20, rng=np.random.default_rng(1))
    hit, uniform, weighted = 0, 0.0, 0.0
    for seq in data:
        keys = seq[0:40:2]
        counts = {k: int((keys == k).sum()) for k in set(keys.tolist())}
        singles = sum(c == 1 for c in counts.values())
        uniform += singles / len(counts)
        weighted += singles / len(keys)
        hit += counts[int(seq[41])] == 1
    observed, uniform, weighted = hit / len(data), uniform / len(data), weighted / len(data)
    assert abs(observed - uniform) < 0.03, (observed, uniform, weighted)
    assert abs(observed - weighted) > 0.08, (observed, uniform, weighted)


def test_accuracy_by_query_key_count_groups_the_validation_set():
    """The diagnostic split of issue 28: each member's accuracy on the queries of a key seen once,
    twice, three times or more, against a per-sequence count and tally in plain Python."""
    trainer = EnsembleTrainer(SyntheticConfig(num_train=32, num_val=200, num_test=8, epochs=1), [1, 2])
    for _ in range(3):  # a few steps, so that some answers are right
        trainer.step(trainer.train[:, :32])
    got = trainer.accuracy_by_occurrence(trainer.val)
    right = (trainer.answer_logits(trainer.val).argmax(-1) == trainer.val[:, :, -1]).tolist()
    counts = query_occurrences(trainer.val).tolist()
    for e in range(2):
        tally = {1: [0, 0], 2: [0, 0], 3: [0, 0]}
        for seq, ok in zip(trainer.val[e].tolist(), right[e]):
            count = min(seq[0:40:2].count(seq[41]), 3)
            tally[count][0] += ok
            tally[count][1] += 1
        assert min(n for _, n in tally.values()) > 20
        assert got[e].tolist() == pytest.approx([k / n for k, n in tally.values()])
        assert [min(c, 3) for c in counts[e]] == [min(s[0:40:2].count(s[41]), 3) for s in trainer.val[e].tolist()]


def test_induction_head_sequences():
    rng = np.random.default_rng(0)
    data = induction_head(2000, vocab_size=20, seq_len=30, rng=rng)
    arrow, _ = special_tokens(20)
    assert data.shape == (2000, 32)
    positions = []
    for seq in data:
        inner = np.flatnonzero(seq[:30] == arrow)
        assert len(inner) == 1
        assert seq[30] == arrow and seq[31] == seq[inner[0] + 1]
        assert seq[31] < 18
        positions.append(inner[0])
    # the authors' trigger range 0..L-3: X is never the token just before the final "=>"
    assert min(positions) == 0 and max(positions) == 27


def test_splits_hold_distinct_sequences():
    """A tiny associative-recall task (2 keys, 2 values, 2 pairs: 20 possible sequences): the
    authors deduplicate each split, and a split larger than the task is refused."""
    cfg = SyntheticConfig(vocab_size=6, num_pairs=2)
    split = make_split(cfg, 15, np.random.default_rng(0))
    assert split.shape == (15, 7) and len(torch.unique(split, dim=0)) == 15
    with pytest.raises(ValueError, match="distinct"):
        make_split(cfg, 21, np.random.default_rng(0))


def test_model_is_the_authors_lm_simple():
    """d_inner 4 x d_model, an unpadded tied vocabulary of 20, S4D with a plain d -> d output."""
    for mixer in ("h3", "s4d", "attention"):
        model = build_model(SyntheticConfig(mixer=mixer), length=42)
        block = model.layers["0"]
        assert block.mlp.fc1.out_features == 128 and block.mlp.fc2.in_features == 128
        assert model.embedding.word.weight.shape == (20, 32)
        assert (model.embedding.position is not None) == (mixer == "attention")
    s4d = build_model(SyntheticConfig(mixer="s4d"), length=42).layers["0"].mixer
    assert s4d.out_proj.weight.shape == (32, 32) and not s4d.glu
    glu = build_model(SyntheticConfig(mixer="s4d", s4d_glu=True), length=42).layers["0"].mixer
    assert glu.out_proj.weight.shape == (64, 32)


def _trainer(mixer: str, seeds, **kw) -> EnsembleTrainer:
    cfg = SyntheticConfig(mixer=mixer, num_train=96, num_val=16, num_test=16, epochs=2, **kw)
    return EnsembleTrainer(cfg, seeds)


def test_optimizer_decays_all_but_the_ssm_dynamics():
    """The authors' AdamW has no bias/norm grouping: weight decay 0.1 everywhere except the SSM
    dynamics (log_dt, A, B), which train at min(1e-3, lr) without decay."""
    trainer = _trainer("h3", [0])
    by_param = {id(p): g for g in trainer.optimizer.param_groups for p in g["params"]}
    for name, p in trainer.model.named_parameters():
        group = by_param[id(p)]
        if is_ssm_dynamics(p):
            assert group["weight_decay"] == 0.0 and group["initial_lr"] == 5e-4, name
        else:
            assert group["weight_decay"] == 0.1 and group["initial_lr"] == 5e-4, name
    names = [n for n, _ in trainer.model.named_parameters()]
    assert any("norm1__bias" in n for n in names) and any("q_proj__bias" in n for n in names)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler:UserWarning")
def test_schedule_is_the_authors_timm_cosine():
    """Warmup from 1e-6 over div_up(epochs, 10) epochs, then the cosine of the absolute step
    (it starts at 0.978 x lr, so lr itself is never reached), ending at 0.1 x lr."""
    cfg = SyntheticConfig(num_train=96, epochs=30)  # 3 steps an epoch, 90 steps, warmup 3 epochs
    trainer = EnsembleTrainer(SyntheticConfig(**{**cfg.__dict__, "num_val": 16, "num_test": 16}), [0])
    assert warmup_steps(cfg) == 9
    lrs = []
    for _ in range(90):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.scheduler.step()
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[8] == pytest.approx(1e-6 + 8 * (5e-4 - 1e-6) / 9)
    assert lrs[9] == pytest.approx(5e-5 + 0.5 * 4.5e-4 * (1 + math.cos(math.pi * 9 / 90)))
    assert max(lrs) < 5e-4  # the peak is skipped: warmup ends below lr, the cosine starts at 0.978 lr
    assert lrs[89] == pytest.approx(5e-5 + 0.5 * 4.5e-4 * (1 + math.cos(math.pi * 89 / 90)))
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(5e-5)


@pytest.mark.parametrize("mixer", ["h3", "s4d", "attention"])
def test_ensemble_computes_each_members_hippolm(mixer):
    """Without dropout, member e's logits are `HippoLM(seed e)`'s (attention: explicit softmax
    against SDPA, <= 2e-7 measured)."""
    trainer = _trainer(mixer, [3, 4])
    ids = trainer.val[:, :8, :-1]
    with torch.no_grad():
        logits = trainer.model(ids)
        for e, seed in enumerate([3, 4]):
            model = build_model(trainer.cfg, ids.shape[-1], seed=seed).eval()
            torch.testing.assert_close(logits[e], model(ids[e]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mixer,clip", [("h3", 0.0), ("s4d", 0.0), ("attention", 0.0), ("h3", 0.5)])
def test_ensemble_of_three_seeds_equals_three_one_seed_runs(mixer, clip):
    """Five steps with dropout on (and per-seed clipping): the losses and weights of each member
    equal those of its one-seed run to fp32 rounding: losses to 1e-6, weights to 1e-6 + 1e-6 |w|
    (measured: losses bit-identical, weights within one ulp, e.g. 7.6e-6 on an A_imag of ~97)."""
    seeds = [1, 2, 3]
    together = _trainer(mixer, seeds, grad_clip=clip)
    batches = [together.train[:, i * 16 : (i + 1) * 16] for i in range(5)]
    losses = torch.stack([together.step(b)[0] for b in batches])  # (steps, E)
    for e, seed in enumerate(seeds):
        alone = _trainer(mixer, [seed], grad_clip=clip)
        torch.testing.assert_close(alone.train[0], together.train[e], rtol=0, atol=0)
        own = torch.stack([alone.step(b[e : e + 1])[0] for b in batches])[:, 0]
        torch.testing.assert_close(own, losses[:, e], rtol=0, atol=1e-6)
        mine, theirs = alone.model.member_parameters(0), together.model.member_parameters(e)
        assert mine.keys() == theirs.keys()
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-6, atol=1e-6, msg=name)


def test_a_seed_leaving_the_ensemble_leaves_the_others_unchanged():
    """A stopped seed leaves (its rows of every parameter and AdamW moment are dropped); the
    others go on exactly as their one-seed runs."""
    together = _trainer("h3", [1, 2, 3])
    for i in range(2):
        together.step(together.train[:, i * 16 : (i + 1) * 16])
    together.select([2, 0])
    assert together.seeds == [3, 1] and together.model.E == 2
    for i in range(2, 4):
        together.step(together.train[:, i * 16 : (i + 1) * 16])
    for e, seed in enumerate([3, 1]):
        alone = _trainer("h3", [seed])
        for i in range(4):
            alone.step(alone.train[:, i * 16 : (i + 1) * 16])
        mine, theirs = alone.model.member_parameters(0), together.model.member_parameters(e)
        for name in mine:
            torch.testing.assert_close(mine[name], theirs[name], rtol=1e-6, atol=1e-6, msg=name)


def test_run_seeds_equals_one_seed_runs_through_early_stops():
    """Seeds stopping at epochs 4, 7, 8 and 12 (each leaving the ensemble then): every seed's
    stopping epoch and accuracies are those of its one-seed run."""
    cfg = SyntheticConfig(task="induction_head", mixer="attention", loss="last", lr=3e-3, seq_len=12, num_train=256,
                          num_val=64, num_test=64, epochs=12, stop_accuracy=0.14)
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    together = [drop(r) for r in run_seeds(cfg, [1, 2, 3, 4], progress=False)]
    assert sorted(r["epochs"] for r in together) == [4, 7, 8, 12]
    assert together == [drop(run_seeds(cfg, [s], progress=False)[0]) for s in [1, 2, 3, 4]]


def test_test_accuracy_is_read_at_the_best_validation_epoch(monkeypatch):
    """The authors keep the checkpoint of the best validation accuracy: `test_accuracy` is the test
    accuracy at each seed's first epoch with its highest validation accuracy (read from every
    evaluation made), `test_accuracy_last` at its last epoch, `val_curve` every epoch's."""
    cfg = SyntheticConfig(task="induction_head", mixer="attention", loss="last", lr=3e-3, seq_len=12, num_train=256,
                          num_val=64, num_test=64, epochs=10, stop_accuracy=2.0)
    seen: list[tuple[str, list[float]]] = []
    evaluate = EnsembleTrainer.evaluate

    def spy(self, data, batch_size=500):
        out = evaluate(self, data, batch_size)
        seen.append(("test" if data is self.test else "val", out[0].tolist()))
        return out

    monkeypatch.setattr(EnsembleTrainer, "evaluate", spy)
    results = run_seeds(cfg, [1, 2, 3], progress=False)
    vals = [acc for kind, acc in seen if kind == "val"]
    assert len(vals) == cfg.epochs
    # The test accuracy of each epoch: the evaluation that follows that epoch's validation, if any.
    tests: dict[int, list[float]] = {}
    epoch = 0
    for kind, acc in seen:
        if kind == "val":
            epoch += 1
        else:
            tests[epoch] = acc
    for e, r in enumerate(results):
        curve = [v[e] for v in vals]
        assert r["val_curve"] == pytest.approx(curve, abs=1e-4)
        best = max(range(cfg.epochs), key=lambda i: (curve[i], -i)) + 1
        assert r["best_epoch"] == best
        assert r["test_accuracy"] == tests[best][e]
        assert r["test_accuracy_last"] == tests[cfg.epochs][e]
    assert any(r["best_epoch"] < cfg.epochs for r in results), "no seed peaked before its last epoch: a weak test"


def test_dropout_acts_in_training_only():
    trainer = _trainer("attention", [0])
    ids = trainer.val[:, :4, :-1]
    with torch.no_grad():
        plain = trainer.model(ids)
        assert torch.equal(plain, trainer.model(ids))
        assert not torch.allclose(plain, trainer.model(ids, trainer.dropout_gens))


def test_seed_lists_parse():
    assert _parse_seeds("1-3,7") == [1, 2, 3, 7]
    with pytest.raises(ValueError, match="repeats"):
        _parse_seeds("1,1")


@pytest.mark.parametrize("mixer", ["h3", "s4d", "attention"])
def test_cli_runs_and_prints_accuracy_last(mixer, capsys):
    rc = main(["synthetic", "--task", "induction_head", "--mixer", mixer, "--num-train", "64", "--num-val", "32",
               "--num-test", "32", "--epochs", "1", "--seq-len", "12", "--no-progress"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("test_accuracy=") and 0.0 <= float(last.split("=")[1]) <= 1.0


def test_cli_schedule_and_decay_options_reach_the_run(monkeypatch):
    seen = []
    monkeypatch.setattr("hippo.pretrain.synthetic.run_seeds",
                        lambda cfg, seeds, progress: seen.append(cfg) or [{"seed": 0, "test_accuracy": 0.5,
                        "test_accuracy_last": 0.5, "best_epoch": 1, "val_accuracy": 0.5, "epochs": 1, "seconds": 0.0}])
    assert main(["synthetic", "--lr", "2e-3", "--weight-decay", "0.05", "--warmup-fraction", "0.2",
                 "--min-lr-ratio", "1", "--no-progress"]) == 0
    cfg = seen[0]
    assert (cfg.lr, cfg.weight_decay, cfg.warmup_fraction, cfg.min_lr_ratio) == (2e-3, 0.05, 0.2, 1.0)


def test_cli_seeds_print_each_seed_mean_and_min(capsys):
    rc = main(["synthetic", "--task", "induction_head", "--num-train", "64", "--num-val", "32", "--num-test", "32",
               "--epochs", "1", "--seq-len", "12", "--no-progress", "--seeds", "1,2"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split("seed=")[1].split()[0] for ln in lines[:2]] == ["1", "2"]
    assert lines[-1].startswith("seeds=2 mean_test_accuracy=") and "min_test_accuracy=" in lines[-1]


@pytest.mark.slow
def test_attention_learns_the_induction_head_from_the_answer_loss():
    """Attention composes an induction head (learned positions, causal mask, two layers) once the
    loss is on the answer token (BENCHMARKS.md), so this is the check that the attention model
    itself is able to do the task."""
    from hippo.pretrain.synthetic import run

    cfg = SyntheticConfig(task="induction_head", mixer="attention", loss="last", num_val=200, num_test=200, epochs=40)
    result = run(cfg, progress=False)
    assert result["test_accuracy"] >= 0.95, result


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="--loss"):
        SyntheticConfig(loss="first")
