"""MLflow tracking: values read back through MlflowClient, resume without duplicates, offline fallback."""

import http.server
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from hippo.pretrain.cli import main
from hippo.pretrain.tracking import PENDING_FILE, UPLOADED_FILE, Tracker, upload_pending
from tests.helpers import free_port


@pytest.fixture(autouse=True)
def restore_environ():
    """Tracker sets MLflow's HTTP retry/timeout defaults in os.environ; keep them out of other tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_local_store_in_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # a stray default store would land here
    monkeypatch.setenv("MLFLOW_TRUNCATE_LONG_VALUES", "false")  # the store would refuse, not truncate
    run_dir = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  d_model: 64\n")
    (tmp_path / "eval").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "eval" / name).write_text(name)

    tracker = Tracker(run_dir, enabled=True, run_name="smoke", system_metrics=False)
    tracker.log_params({"model": {"d_model": 64, "mixer": "h3"}, "lr": 3e-4, "note": "x" * 7000})
    for step in range(1, 4):
        tracker.log_metrics({"loss": 1.0 / step, "lr": 1e-3 * step}, step=step)
    tracker.set_tags({"stage": "pretrain"})
    tracker.log_artifact(config, artifact_path="config")
    tracker.log_artifact(tmp_path / "eval", artifact_path="eval")
    tracker.close()

    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "smoke"
    assert client.get_experiment(run.info.experiment_id).name == "hippo"
    params = run.data.params
    assert params["model.d_model"] == "64" and params["model.mixer"] == "h3" and params["lr"] == "0.0003"
    assert params["note"] == "x" * 6000  # truncated to MLflow's limit instead of failing the batch
    assert run.data.tags["stage"] == "pretrain"
    assert history(client, tracker.run_id, "loss") == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert [s for s, _ in history(client, tracker.run_id, "lr")] == [1, 2, 3]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "config")] == ["config/config.yaml"]
    assert [a.path for a in client.list_artifacts(tracker.run_id, "eval")] == ["eval/a.txt", "eval/b.txt"]
    assert run.info.artifact_uri.startswith((run_dir / "mlruns").as_uri())
    local = client.download_artifacts(tracker.run_id, "config/config.yaml", str(tmp_path / "dl"))
    assert Path(local).read_text() == config.read_text()


def test_disabled_tracker_does_nothing(tmp_path):
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, enabled=False)
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.set_tags({"t": "v"})
    tracker.log_artifact(tmp_path / "missing.txt")
    tracker.close()
    assert tracker.run_id is None
    assert not run_dir.exists()


def test_env_uri_and_resume_without_duplicates(tmp_path, monkeypatch, caplog):
    uri = f"sqlite:///{tmp_path}/shared.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_dir = tmp_path / "run"

    first = Tracker(run_dir, enabled=True, system_metrics=False)
    first.log_params({"model": {"d_model": 64}})
    for step in range(1, 6):
        first.log_metrics({"loss": float(step)}, step=step)
    first.close(status="KILLED")
    assert not (run_dir / "mlflow.db").exists()

    # The resumed run recomputes steps 4 and 5 bit-identically, then continues.
    second = Tracker(run_dir, enabled=True, run_id=first.run_id, system_metrics=False)
    second.log_params({"model": {"d_model": 64}})  # same value again: skipped, no MLflow error
    with caplog.at_level(logging.WARNING, logger="hippo.pretrain.tracking"):
        second.log_params({"model": {"d_model": 128}})  # changed: refused with a warning
    assert "model.d_model" in caplog.text
    for step in range(4, 9):
        second.log_metrics({"loss": float(step), "tokens": 10.0 * step}, step=step)
    second.close()

    client = MlflowClient(tracking_uri=uri)
    assert second.run_id == first.run_id
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model.d_model": "64"}
    assert history(client, first.run_id, "loss") == [(s, float(s)) for s in range(1, 9)]
    assert history(client, first.run_id, "tokens") == [(s, 10.0 * s) for s in range(4, 9)]
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.parametrize("merging", [False, True])
def test_rejected_record_is_dropped_alone(tmp_path, caplog, monkeypatch, merging):
    if merging:  # MLflow would merge the queued batches and lose them all with the bad one
        monkeypatch.setenv("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(tmp_path, enabled=True, tracking_uri=uri, system_metrics=False)
    with caplog.at_level(logging.WARNING, logger="hippo.pretrain.tracking"):
        for step in range(1, 4):
            tracker.log_metrics({"bad!": 1.0}, step=step)  # an invalid name: MLflow answers 400
            tracker.log_metrics({"loss": float(step)}, step=step)
        tracker.close()
    assert "rejected" in caplog.text
    assert history(MlflowClient(tracking_uri=uri), tracker.run_id, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert not (tmp_path / PENDING_FILE).exists()  # a refusal is not an outage


def test_metrics_of_quick_steps_share_a_request_and_all_arrive_before_close(tmp_path, monkeypatch):
    """MLflow's cost is per request: steps faster than METRICS_INTERVAL_S are sent together, the last
    ones by a timer (a dashboard need not wait for the end of the run)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(tmp_path, enabled=True, tracking_uri=uri, system_metrics=False)
    sizes, log_batch = [], MlflowClient.log_batch

    def counted(self, run_id, *args, **kwargs):
        sizes.append(len(kwargs.get("metrics", [])))
        return log_batch(self, run_id, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_batch", counted)
    for step in range(1, 21):
        tracker.log_metrics({"loss": float(step), "lr": 0.1}, step=step)
    client, deadline = MlflowClient(tracking_uri=uri), time.monotonic() + 10
    while len(client.get_metric_history(tracker.run_id, "loss")) < 20:
        assert time.monotonic() < deadline, "the waiting steps were not sent"
        time.sleep(0.1)
    tracker.close()
    # The first step at once, the other 19 (well within the interval) together: 2 requests, not 20.
    assert sum(sizes) == 40 and sizes[0] == 2 and len(sizes) <= 3, sizes
    assert history(client, tracker.run_id, "loss") == [(s, float(s)) for s in range(1, 21)]


def test_system_metrics_go_through_the_tracker_and_a_resumed_run_continues_their_steps(tmp_path, monkeypatch):
    """Hippo's sampler (not MLflow's monitor): MLflow's metric names, consecutive steps, the last
    sample sent by close, and a resumed run's samples after the first run's."""
    from hippo.pretrain import system_metrics

    monkeypatch.setattr(system_metrics, "SAMPLE_INTERVAL_S", 0.1)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    first = Tracker(tmp_path, enabled=True, tracking_uri=uri)
    time.sleep(0.6)
    first.close()
    cpu = history(client, first.run_id, "system/cpu_utilization_percentage")
    assert [step for step, _ in cpu] == list(range(len(cpu))) and len(cpu) >= 2, cpu
    memory = history(client, first.run_id, "system/system_memory_usage_megabytes")
    assert len(memory) == len(cpu) and all(value > 0 for _, value in memory)
    second = Tracker(tmp_path, enabled=True, tracking_uri=uri, run_id=first.run_id)
    time.sleep(0.4)
    second.close()
    steps = [step for step, _ in history(client, first.run_id, "system/cpu_utilization_percentage")]
    assert steps == list(range(len(steps))) and len(steps) > len(cpu), steps


def test_system_metrics_sample_and_sampler():
    from hippo.pretrain.system_metrics import SystemMetricsSampler, sample

    values = sample()
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage", "system/process_memory_rss_megabytes"} <= set(values)
    assert values["system/process_memory_rss_megabytes"] > 0
    logged: list[int] = []
    sampler = SystemMetricsSampler(lambda metrics, step: logged.append(step), first_step=5, interval_s=0.05)
    sampler.start()
    time.sleep(0.3)
    sampler.stop()
    count = len(logged)
    time.sleep(0.1)
    assert logged == list(range(5, 5 + count)) and count >= 2 and len(logged) == count  # nothing after stop


def test_missing_psutil_warns_and_continues(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "psutil", None)  # find_spec("psutil") -> None
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with caplog.at_level(logging.WARNING, logger="hippo.pretrain.tracking"):
        tracker = Tracker(tmp_path, enabled=True, tracking_uri=uri)
    tracker.log_metrics({"loss": 2.0}, step=1)
    tracker.close()
    assert any("psutil" in r.getMessage() for r in caplog.records if r.name == "hippo.pretrain.tracking")
    assert history(MlflowClient(tracking_uri=uri), tracker.run_id, "loss") == [(1, 2.0)]


def test_unreachable_server_keeps_records_for_upload(tmp_path, caplog):
    run_dir = tmp_path / "run"
    artifact = tmp_path / "notes.txt"
    artifact.write_text("hello")
    dead = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="hippo.pretrain.tracking"):
        tracker = Tracker(run_dir, enabled=True, run_name="offline", tracking_uri=dead)
        tracker.log_params({"optim": {"lr": 0.01}})
        for step in range(1, 4):
            tracker.log_metrics({"loss": 10.0 - step}, step=step)
        tracker.log_metrics({"loss": 123.0}, step=3)  # a recomputed step is still dropped offline
        tracker.set_tags({"host": "a"})
        tracker.log_artifact(artifact)
        tracker.close()
    assert time.monotonic() - start < 10
    assert tracker.run_id is None
    warnings = [r for r in caplog.records if r.name == "hippo.pretrain.tracking" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "unreachable" in warnings[0].getMessage()

    lines = [json.loads(x) for x in (run_dir / PENDING_FILE).read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["params", "metrics", "metrics", "metrics", "tags", "artifact", "end"]
    assert lines[0]["data"] == {"optim.lr": "0.01"} and lines[0]["run_id"] is None
    assert [(r["step"], r["data"]["loss"]) for r in lines[1:4]] == [(1, 9.0), (2, 8.0), (3, 7.0)]

    uri = f"sqlite:///{tmp_path}/upload.db"
    assert upload_pending(run_dir, tracking_uri=uri) == 7
    assert not (run_dir / PENDING_FILE).exists() and (run_dir / UPLOADED_FILE).exists()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hippo").experiment_id])
    assert run.info.run_name == "offline" and run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.01"} and run.data.tags["host"] == "a"
    assert history(client, run.info.run_id, "loss") == [(1, 9.0), (2, 8.0), (3, 7.0)]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["notes.txt"]


def test_silent_server_does_not_stall(tmp_path, monkeypatch):
    """A host that accepts connections but never answers: the /health probe gives up quickly,
    where MLflow's own client would wait out its timeout and retries."""
    monkeypatch.setattr("hippo.pretrain.tracking.HEALTH_TIMEOUT_S", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        start = time.monotonic()
        tracker = Tracker(tmp_path, enabled=True, tracking_uri=f"http://127.0.0.1:{silent.getsockname()[1]}")
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.close()
        assert time.monotonic() - start < 5
    kinds = [json.loads(x)["kind"] for x in (tmp_path / PENDING_FILE).read_text().splitlines()]
    assert kinds == ["metrics", "end"]


class _HtmlEverywhere(http.server.BaseHTTPRequestHandler):
    """Some web application: 200 and an HTML page for any request."""

    status = 200

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"<html><body>Welcome</body></html>"
        self.send_response(self.status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


class _ReadOnlyProxy(_HtmlEverywhere):
    """A proxy that forwards MLflow's lookups but answers writes with its own HTML 404."""

    def do_GET(self) -> None:
        body = json.dumps({"experiment": {"experiment_id": "1", "name": "hippo", "artifact_location": "/x",
                                          "lifecycle_stage": "active"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.status = 404
        self._answer()


class _Quiet404(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(params=["http.server 404", "HTML 200", "proxy 404 on writes"])
def not_mlflow(request, tmp_path):
    """A loopback web server that answers, but is not an MLflow tracking server."""
    empty = tmp_path / "www"
    empty.mkdir()
    handler = {"http.server 404": lambda *a: _Quiet404(*a, directory=str(empty)),
               "HTML 200": _HtmlEverywhere, "proxy 404 on writes": _ReadOnlyProxy}[request.param]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_a_server_that_is_not_mlflow_counts_as_unreachable(tmp_path, not_mlflow, caplog, capsys):
    """One warning naming the upload command, no exception; the records wait in the pending file,
    `hippo mlflow upload` refuses that server and sends them to a real store."""
    run_dir = tmp_path / "run"
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="hippo.pretrain.tracking"):
        tracker = Tracker(run_dir, enabled=True, run_name="foreign", tracking_uri=not_mlflow, system_metrics=False)
        tracker.log_params({"lr": 0.1})
        for step in range(1, 3):
            tracker.log_metrics({"loss": float(step)}, step=step)
        tracker.close()
    assert time.monotonic() - start < 10
    warnings = [r.getMessage() for r in caplog.records if r.name == "hippo.pretrain.tracking"]
    assert len(warnings) == 1 and "unreachable" in warnings[0], warnings
    assert f"hippo mlflow upload {run_dir} --tracking-uri {not_mlflow}" in warnings[0]
    kinds = [json.loads(x)["kind"] for x in (run_dir / PENDING_FILE).read_text().splitlines()]
    assert kinds == ["params", "metrics", "metrics", "end"]

    capsys.readouterr()
    assert main(["mlflow", "upload", str(run_dir), "--tracking-uri", not_mlflow]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("hippo: error:") and not_mlflow in err[0], err
    assert (run_dir / PENDING_FILE).exists()

    uri = f"sqlite:///{tmp_path}/upload.db"
    assert main(["mlflow", "upload", str(run_dir), "--tracking-uri", uri]) == 0
    assert "uploaded 4 records" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("hippo").experiment_id])
    assert run.info.run_name == "foreign" and run.data.params == {"lr": "0.1"}
    assert history(client, run.info.run_id, "loss") == [(1, 1.0), (2, 2.0)]


def kill_server(url: str) -> None:
    """SIGKILLs the mlflow_server fixture's process group, as if its host had died. The fixture's
    teardown still finds the group: its unreaped leader stays a zombie member."""
    port = url.rsplit(":", 1)[1]
    pid = next(p.pid for p in psutil.process_iter(["cmdline"]) if port in (p.info["cmdline"] or []))
    assert os.getpgid(pid) != os.getpgid(0)
    os.killpg(os.getpgid(pid), signal.SIGKILL)


def test_server_dying_mid_run_loses_no_record(tmp_path, mlflow_server):
    """Records whose asynchronous log_batch fails after the server died end up in the pending file."""
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, enabled=True, tracking_uri=mlflow_server, system_metrics=False)
    tracker.log_params({"lr": 0.1})
    for step in range(1, 4):
        tracker.log_metrics({"loss": float(step)}, step=step)
    client = MlflowClient(tracking_uri=mlflow_server)
    deadline = time.monotonic() + 30
    while len(client.get_metric_history(tracker.run_id, "loss")) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.2)

    kill_server(mlflow_server)
    start = time.monotonic()
    for step in range(4, 7):  # sent while the tracker still believes the server is up
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.set_tags({"stage": "after"})
    assert time.monotonic() - start < 1  # training does not wait on the dead server
    tracker.close()

    lines = [json.loads(x) for x in (run_dir / PENDING_FILE).read_text().splitlines()]
    assert {4, 5, 6} <= {r["step"] for r in lines if r["kind"] == "metrics"}
    assert any(r["kind"] == "tags" for r in lines)
    assert lines[-1]["kind"] == "end" and all(r["run_id"] == tracker.run_id for r in lines)

    uri = f"sqlite:///{tmp_path}/srv.db"  # the dead server's own store
    assert upload_pending(run_dir, tracking_uri=uri) == len(lines)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.1"} and run.data.tags["stage"] == "after"
    assert history(client, tracker.run_id, "loss") == [(s, float(s)) for s in range(1, 7)]


def test_upload_pending_skips_steps_the_run_already_has(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(tmp_path, enabled=True, tracking_uri=uri, system_metrics=False)
    for step in range(1, 4):
        tracker.log_metrics({"loss": float(step)}, step=step)
    tracker.close()
    # As if the server had gone down after step 3 and the resumed run re-logged steps 2..5 offline.
    header = {"run_id": tracker.run_id, "experiment": "hippo", "run_name": None}
    with (tmp_path / PENDING_FILE).open("w") as f:
        for step in range(2, 6):
            record = {"kind": "metrics", "data": {"loss": float(step)}, "step": step, "timestamp": 0}
            f.write(json.dumps({**header, **record}) + "\n")
    assert upload_pending(tmp_path, tracking_uri=uri) == 4
    client = MlflowClient(tracking_uri=uri)
    assert history(client, tracker.run_id, "loss") == [(s, float(s)) for s in range(1, 6)]
