"""`hippo train` end to end: resume equivalence, SIGTERM, a crash while checkpointing.

The reference for a resumed run is a second, uninterrupted run of the same config: per-step
losses must be identical (bitwise: CPU, fp32). Every run is a real `hippo train` process (plain,
or under torchrun), so each costs its start-up; each assertion reads runs shared by the module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hippo.pretrain.checkpoint import CRASH_BEFORE_MARKER_ENV, MARKER
from tests.helpers import DROPOUT, ROOT, STEPS, hippo_train, latest_step, losses, torchrun, train_flags


@pytest.fixture(scope="module")
def data(train_data):
    return train_data

pytestmark = pytest.mark.slow

def mlflow_runs(run_dir: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    return [(client, r) for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference")
    hippo_train(run, data, DROPOUT)
    return run


@pytest.fixture(scope="module")
def reference(reference_run) -> dict[int, float]:
    got = losses(reference_run)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got[STEPS] < got[1] - 0.5  # it learns (the text is far from random bytes)
    return got


def test_export_evaluates_on_one_process_like_the_trainer_did(reference_run, data):
    """The consolidated export, run by plain HippoLM, gives the trainer's final validation loss."""
    from hippo.pretrain.evaluation import evaluate_export

    [(client, run)] = mlflow_runs(reference_run)
    [final_val] = [m for m in client.get_metric_history(run.info.run_id, "val_loss") if m.step == STEPS]
    loss, _ = evaluate_export(reference_run / "export", [str(data)], max_batches=2)
    assert loss == pytest.approx(final_val.value, rel=1e-5)
    assert run.data.params["config.model.d_model"] == "32"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(data, reference, tmp_path, sig):
    """SIGTERM (a scheduler) or SIGINT (Ctrl-C): the step ends, a checkpoint is written, and the run
    exits 128 + the signal as a shell reports a signalled command (it exited 0, as if it had finished)."""
    run = tmp_path / "run"
    sets = train_flags(data, DROPOUT)
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "hippo.pretrain.cli", "train", "tiny_hybrid", "--run-dir", str(run), *sets],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, out
    stopped = latest_step(run)
    assert 3 <= stopped < STEPS, out
    assert f"received {sig.name}" in out

    hippo_train(run, data, DROPOUT)  # resumes from the latest checkpoint by itself
    assert losses(run) == reference
    # One MLflow run, continued: one loss point per step, the same values as metrics.jsonl.
    [(client, mlrun)] = mlflow_runs(run)
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert {m.step: m.value for m in history} == pytest.approx(reference, rel=1e-6)


def test_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(data, reference, tmp_path):
    run = tmp_path / "run"
    died = hippo_train(run, data, DROPOUT, env={CRASH_BEFORE_MARKER_ENV: "16"}, check=False)
    assert died.returncode == -signal.SIGKILL, died.stdout[-2000:] + died.stderr[-4000:]
    assert latest_step(run) == 8
    assert (run / "checkpoints" / "global_step16").exists() and not (run / "checkpoints" / "global_step16" / MARKER).exists()

    hippo_train(run, data, DROPOUT)
    assert losses(run) == reference
    assert latest_step(run) == STEPS


PARALLEL = {"dp2_zero1": (2, []), "tp2_pp2": (4, ["parallel.tensor=2", "parallel.pipeline=2"]),
            "cp2": (2, ["parallel.context=2"])}


@pytest.fixture(scope="module")
def parallel_runs(data, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per layout: an uninterrupted run, and one that exits at step 12 and is resumed."""
    runs = {}
    for name, (nproc, layout) in PARALLEL.items():
        full, split = tmp_path_factory.mktemp(f"{name}_full"), tmp_path_factory.mktemp(f"{name}_split")
        hippo_train(full, data, *layout, nproc=nproc)
        hippo_train(split, data, *layout, "train.exit_interval=12", nproc=nproc)
        assert latest_step(split) == 12 and max(losses(split)) == 12
        hippo_train(split, data, *layout, nproc=nproc)
        runs[name] = (full, split)
    return runs


@pytest.mark.parametrize("name", list(PARALLEL))
def test_stop_and_resume_equals_uninterrupted_run_in_parallel(parallel_runs, name):
    full, split = parallel_runs[name]
    assert losses(split) == losses(full)


def test_export_of_a_tp2_pp2_checkpoint_equals_the_gathered_export(parallel_runs, tmp_path):
    """`hippo export` (universal conversion, one process) vs the trainer's own end-of-run export
    (TP shards gathered within each stage, one file per pipeline stage): the same tensors, bit for bit."""
    from hippo.pretrain.models.pretrained import INDEX, load_weights

    full, _ = parallel_runs["tp2_pp2"]
    torchrun(0, ["-m", "hippo.pretrain.cli", "export", str(full), "-o", str(tmp_path / "export")])
    a, b = load_weights(full / "export"), load_weights(tmp_path / "export")
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a)
    weight_map = json.loads((full / "export" / INDEX).read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert weight_map["embedding.word.weight"] == "model-00001-of-00002.safetensors"  # the tied weight, once
    assert weight_map["norm_f.weight"] == "model-00002-of-00002.safetensors"


@pytest.mark.parametrize("name", list(PARALLEL))
def test_resume_on_one_process_from_a_parallel_checkpoint(parallel_runs, data, tmp_path, name):
    """DP=2 (ZeRO-1) and TP=2 x PP=2 checkpoints continue on one process via a universal checkpoint."""
    full, _ = parallel_runs[name]
    run = tmp_path / "single"
    hippo_train(run, data, "--resume", str(full / "checkpoints" / "global_step16"))
    expected, got = losses(full), losses(run)
    assert sorted(got) == list(range(17, STEPS + 1))
    # The first loss after the switch uses the loaded parameters: equal within 1e-5 relative.
    assert got[17] == pytest.approx(expected[17], rel=1e-5)
    # Later steps drift only by the float order of the new layout's reductions.
    for step in range(18, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step


def test_a_cp2_checkpoint_continues_at_cp4(parallel_runs, data, tmp_path):
    """Checkpoints do not depend on the context-parallel size: a CP 2 run's step 16 continues on
    4 ranks (chunks of 8 tokens) through a universal checkpoint, like the CP 2 run itself."""
    full, _ = parallel_runs["cp2"]
    run = tmp_path / "cp4"
    hippo_train(run, data, "parallel.context=4", "--resume", str(full / "checkpoints" / "global_step16"), nproc=4)
    expected, got = losses(full), losses(run)
    assert sorted(got) == list(range(17, STEPS + 1))
    assert got[17] == pytest.approx(expected[17], rel=1e-5)
    for step in range(18, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step


def test_non_finite_steps_are_skipped_then_the_run_stops_with_a_checkpoint(data, tmp_path):
    """lr 1e30 makes the first update blow the weights up: every later step is non-finite."""
    run = tmp_path / "run"
    proc = hippo_train(run, data, "optim.lr=1e30", "optim.warmup_fraction=0", "train.max_skipped_steps=3", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 steps in a row had a non-finite loss" in proc.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 2, 3]
    assert latest_step(run) == 4


def test_training_is_tracked_in_a_real_mlflow_server_and_resume_appends(data, tmp_path, mlflow_server):
    from mlflow import MlflowClient

    run = tmp_path / "run"
    uri = f"tracking.tracking_uri={mlflow_server}"
    hippo_train(run, data, uri, "train.exit_interval=12")
    hippo_train(run, data, uri)

    client = MlflowClient(tracking_uri=mlflow_server)
    [mlrun] = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert mlrun.info.status == "FINISHED"
    assert mlrun.data.params["config.model.d_model"] == "32" and mlrun.data.params["layout.data"] == "1"
    history = client.get_metric_history(mlrun.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert {m.step: m.value for m in history} == pytest.approx(losses(run), rel=1e-6)
    assert [m.step for m in client.get_metric_history(mlrun.info.run_id, "val_loss")] == [8, 16, 24]
    assert [a.path for a in client.list_artifacts(mlrun.info.run_id)] == ["config.json"]
    assert mlrun.data.tags["export"] == str((run / "export").resolve())
    assert not (run / "mlflow_pending.jsonl").exists()


def test_bf16_run_follows_the_fp32_run_within_bf16_precision(data, reference, tmp_path):
    """DeepSpeed's bf16 mode (bf16 weights and activations, fp32 master weights and SSM kernels):
    a GPU setting, run here for 3 steps only (these CPUs run bf16 matmuls ~400x slower)."""
    run = tmp_path / "run"
    hippo_train(run, data, DROPOUT, "train.precision=bf16", "train.exit_interval=3")
    got = losses(run)
    assert sorted(got) == [1, 2, 3]
    for step, loss in got.items():
        assert loss == pytest.approx(reference[step], rel=2e-2), step


# bf16 at ZeRO stage 0 is DeepSpeed's BF16_Optimizer, whose state DeepSpeed 0.19 writes in ZeRO files
# but at stage 0 neither reads back (KeyError: 0) nor describes for the universal converter. 4 steps
# without dropout (the DP=2 run changes layout): these CPUs run bf16 matmuls ~400x slower.
BF16_ZERO0 = ["train.precision=bf16", "parallel.zero_stage=0", "train.steps=4", "checkpoint.interval=2",
              "train.eval_interval=4"]


@pytest.fixture(scope="module")
def bf16_zero0_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("bf16_zero0")
    hippo_train(run, data, *BF16_ZERO0)
    return run


def test_bf16_without_zero_stops_and_resumes_like_an_uninterrupted_run(data, bf16_zero0_run, tmp_path):
    from hippo.pretrain.models.pretrained import load_weights

    run = tmp_path / "run"
    hippo_train(run, data, *BF16_ZERO0, "train.exit_interval=2")
    assert latest_step(run) == 2
    hippo_train(run, data, *BF16_ZERO0)
    assert losses(run) == losses(bf16_zero0_run)
    a, b = load_weights(bf16_zero0_run / "export"), load_weights(run / "export")
    assert set(a) == set(b) and all(a[k].equal(b[k]) for k in a)


def test_bf16_without_zero_continues_on_one_process_from_a_dp2_checkpoint(data, bf16_zero0_run, tmp_path):
    """Through a universal checkpoint. DP=2 reduces bf16 gradients in another order than one
    process: the losses follow the one-process run within 1e-3 (6e-5 seen)."""
    dp2, single = tmp_path / "dp2", tmp_path / "single"
    hippo_train(dp2, data, *BF16_ZERO0, "train.exit_interval=2", nproc=2)
    hippo_train(single, data, *BF16_ZERO0, "--resume", str(dp2 / "checkpoints" / "global_step2"))
    expected, got = losses(bf16_zero0_run), losses(single)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-3), (step, got, expected)


@pytest.mark.dist
def test_an_fp32_zero0_checkpoint_at_another_layout_is_refused_in_one_line(data, tmp_path):
    """DeepSpeed 0.19 cannot move an fp32 ZeRO-0 run's optimizer state (torch's AdamW state in the
    model-states file): continuing at DP 2 is refused before any conversion, in one line (the
    converter's "can't find *_optim_states.pt files" traceback before), the checkpoint untouched."""
    one, dp2 = tmp_path / "one", tmp_path / "dp2"
    flags = ["parallel.zero_stage=0", "train.steps=4", "checkpoint.interval=2", "train.eval_interval=4"]
    hippo_train(one, data, *flags, "train.exit_interval=2")
    ckpt = one / "checkpoints" / "global_step2"
    proc = hippo_train(dp2, data, *flags[1:], "--resume", str(ckpt), nproc=2, check=False)
    assert proc.returncode != 0 and not (dp2 / "metrics.jsonl").exists()
    [line] = {x.split("] ")[-1] for x in proc.stderr.splitlines() if "cannot move fp32 ZeRO-0" in x}
    assert "parallel.zero_stage=0 (fp32)" in line and "parallel.zero_stage=1 (fp32)" in line and "data=2" in line
    assert not (ckpt.parent / "global_step2_universal").exists()


def test_quickstart_runs_end_to_end(tmp_path):
    """The README's main job, shortened to 6 steps: corpus, prepare, train, eval, samples, MLflow."""
    run = tmp_path / "qs"
    proc = torchrun(0, ["-m", "hippo.pretrain.cli", "quickstart", "--run-dir", str(run), "--set", "train.steps=6",
                        "--set", "train.eval_interval=3", "--set", "checkpoint.interval=3",
                        "--set", "tracking.system_metrics=false"])
    out = proc.stdout
    assert "trained 6 steps; validation (" in out and out.count("--- sample from") == 3
    assert not library_internals(proc.stdout + proc.stderr)
    assert (run / "train" / "export" / "model.safetensors").exists() and latest_step(run / "train") == 6
    [(_, mlrun)] = mlflow_runs(run / "train")
    assert mlrun.data.metrics["val_loss"] < 5.55  # below a uniform guess over 257 bytes


# What DeepSpeed, Megatron and MLflow print on their own while a run starts (issue 22 §5).
LIBRARY_INTERNALS = ["SEED_LAYERS=", "BASE_SEED=", "Using topology", "stage=0 layers=", "BlockLayer", "  loss: loss",
                     "untested optimizer", "built successfully", "Transformer Engine", "Megatron-FSDP",
                     "Creating initial MLflow database tables", "[WARNING]", "[INFO]"]


def library_internals(output: str) -> list[str]:
    return [s for s in LIBRARY_INTERNALS if s in output]


def test_a_run_prints_hippo_lines_only(data, tmp_path):
    """Two pipeline stages (each with its layer list, DeepSpeed's topology and seed lines to hide):
    stdout stays empty and stderr holds Hippo's log lines only."""
    proc = hippo_train(tmp_path / "run", data, "parallel.pipeline=2", "train.steps=2", "train.eval_interval=2",
                       "checkpoint.interval=2", nproc=2)
    assert not library_internals(proc.stdout + proc.stderr), proc.stdout + proc.stderr
    assert proc.stdout.strip() == "", proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert any("step 2/2" in line for line in lines), proc.stderr
    foreign = [line for line in lines if " hippo." not in line]
    assert not foreign, "\n".join(foreign)


def test_a_checkpoint_of_the_old_stream_order_is_refused_in_one_line(data, tmp_path):
    """`fixtures/checkpoint_v0_1` was written by Hippo 0.1 (before `hippo.*`) with the 8-virtual-stream
    sample order, which issue 24 replaced by a global permutation: resuming it is refused before any
    work, in one line saying which Hippo reads it."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ROOT / "tests" / "fixtures" / "checkpoint_v0_1" / "run", run)
    proc = hippo_train(run, data, "tracking.enabled=false", "--allow-config-change", check=False)
    assert proc.returncode != 0 and not (run / "metrics.jsonl").exists()
    [line] = [x for x in proc.stderr.splitlines() if "sample order" in x]
    assert "global_step16" in line and "8-virtual-stream sample order" in line
    assert "Hippo 0.1.0 up to commit 9307dce" in line and "--run-dir" in line


def test_a_wall_clock_limit_stops_with_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(data, reference,
                                                                                                   tmp_path):
    """`train.time_limit` (a scheduler's limit): a second is gone before the first step ends, so
    the run checkpoints after it and exits cleanly; resumed without the limit, it trains exactly
    as the uninterrupted run did."""
    run = tmp_path / "run"
    first = hippo_train(run, data, DROPOUT, "train.time_limit=1")
    assert "checkpoint" in first.stderr and "(time limit)" in first.stderr
    assert latest_step(run) == 1 and not (run / "export").exists()
    hippo_train(run, data, DROPOUT)
    assert losses(run) == reference
