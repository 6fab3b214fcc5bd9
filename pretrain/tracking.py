"""MLflow tracking for training runs: one run per training run, continued on resume.

Training must never wait on, or die because of, the tracking server. Params, metrics and tags go
through `log_batch` on a thread of Hippo's own (MLflow's asynchronous mode hides why a request
failed, and can report merged-in records as logged when it did); each record is kept until its
request is known to have succeeded (checked on every call, waited for at close). Metrics of
consecutive steps share one request, at most one per METRICS_INTERVAL_S (see there). If the server
cannot be reached (or answers but is not MLflow), or fails mid-run, records go to
`<run_dir>/mlflow_pending.jsonl` and `upload_pending` (`hippo mlflow upload RUN_DIR`) replays them later.
Hand-written stays only what MLflow lacks: an offline store (the pending file), a fast probe, de-duplication.

mlflow is imported lazily: ranks with `enabled=False` never pay its import time.
"""

from __future__ import annotations

import errno
import importlib.util
from concurrent.futures import Future, ThreadPoolExecutor
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hippo.pretrain.mlflow_compat import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH
from hippo.pretrain.system_metrics import SystemMetricsSampler

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["PENDING_FILE", "UPLOADED_FILE", "Tracker", "TrackingError", "upload_pending"]

log = logging.getLogger(__name__)

PENDING_FILE = "mlflow_pending.jsonl"
UPLOADED_FILE = "mlflow_pending.uploaded.jsonl"
HEALTH_TIMEOUT_S = 5
# A read-only MLflow REST call: MLflow answers it with JSON (the experiment, or 404
# RESOURCE_DOES_NOT_EXIST); any other web server with a page of its own.
PROBE_PATH = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
PROBE_BYTES = 1 << 16
# A login in front of the server: urllib has no credentials, MLflow's client may (MLFLOW_TRACKING_TOKEN).
AUTH_STATUS = (401, 403, 407)
# MLflow's defaults (7 retries with exponential backoff, 120 s timeout) would let a dead server
# stall `close()` for minutes; these apply unless the user set them.
HTTP_ENV_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# One MLflow request (sqlite store or server) costs ~6 ms of CPU whatever it holds, in the sending
# thread: per step, ~4% of a tiny model's step on 2 cores (benchmarks/bench_train_overhead.py).
# Metrics records wait up to this long to share a request with the next steps' (a timer sends the
# last ones; another kind of record, and close, send them at once); a step slower than this goes alone.
METRICS_INTERVAL_S = 1.0


class TrackingError(RuntimeError):
    """`upload_pending` cannot send the records now; the pending file is kept for another try."""


class Tracker:
    """One MLflow run per training run. Only the process created with enabled=True does any I/O;
    with enabled=False every method is a cheap no-op (other ranks).

    Call `close()` (e.g. in a `finally`): it waits for the records still being sent and ends the run.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        experiment: str = "hippo",
        run_name: str | None = None,
        run_id: str | None = None,
        tracking_uri: str | None = None,
        system_metrics: bool = True,
    ) -> None:
        self.run_id = run_id if enabled else None
        self._enabled = enabled
        if not enabled:
            return
        from mlflow import MlflowClient

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self._pending = run_dir / PENDING_FILE
        self._uri = _resolve_uri(run_dir, tracking_uri)
        self._client: MlflowClient = MlflowClient(self._uri)
        self._experiment, self._run_name = experiment, run_name
        self._offline = False
        self._remote = self._uri.startswith(("http://", "https://"))
        # Records handed to the sending thread, kept until their request is known to have succeeded.
        # One thread: requests reach MLflow in the order they were made.
        self._sender = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hippo-mlflow")
        self._inflight: list[tuple[Future, list[dict[str, Any]]]] = []
        self._outage_seen = False  # set by the sending thread: later requests fail at once
        # Metrics records not sent yet (METRICS_INTERVAL_S); the timer thread sends them too, hence the lock.
        self._metrics: list[dict[str, Any]] = []
        self._metrics_sent_at = -float("inf")
        self._timer: threading.Timer | None = None
        self._lock = threading.RLock()
        self._sampler: SystemMetricsSampler | None = None
        # Resumed runs recompute steps that were already logged: these guard against duplicates.
        self._last_step: dict[str, int] = {}
        self._params: dict[str, str] = {}

        if self._remote:
            for name, value in HTTP_ENV_DEFAULTS.items():
                os.environ.setdefault(name, value)
            if reason := _unreachable(self._uri):
                self._go_offline(reason)
                return
        try:
            self._start_run()
        except Exception as e:
            if _is_rejection(e, remote=self._remote):  # e.g. an unknown run_id: a configuration error, not an outage
                raise
            self._go_offline(e)
            return
        if self._pending.exists():
            log.warning("%s holds records not yet in MLflow; add them with `%s`", self._pending, self._upload_command())
        if system_metrics:
            self._start_system_metrics()

    def _start_run(self) -> None:
        if self.run_id is None:
            experiment_id = _experiment_id(self._client, self._uri, self._experiment)
            self.run_id = self._client.create_run(experiment_id, run_name=self._run_name).info.run_id
            return
        run = self._client.get_run(self.run_id)
        self._client.update_run(self.run_id, status="RUNNING")
        self._params = dict(run.data.params)
        for key in run.data.metrics:
            self._last_step[key] = max(m.step for m in self._client.get_metric_history(self.run_id, key))

    def _start_system_metrics(self) -> None:
        """Hippo's CPU/memory/GPU-memory sampler (`system_metrics`), logging through this tracker; a
        resumed run's samples continue its step count."""
        if importlib.util.find_spec("psutil") is None:
            log.warning("psutil is not installed: MLflow system metrics are off")
            return
        last = max((step for key, step in self._last_step.items() if key.startswith("system/")), default=-1)
        self._sampler = SystemMetricsSampler(self.log_metrics, first_step=last + 1)
        self._sampler.start()

    def log_params(self, params: dict[str, Any]) -> None:
        """Nested dicts are flattened with dots ("model.d_model"). MLflow params are immutable, so
        on resume unchanged values are skipped and changed ones are refused with a warning."""
        if not self._enabled:
            return
        flat = _flatten(params)
        changed = sorted(k for k, v in flat.items() if self._params.get(k, v) != v)
        if changed:
            log.warning("MLflow params cannot change within a run; keeping the logged values of %s", changed)
        new = {k: v for k, v in flat.items() if k not in self._params}
        self._params.update(new)
        if new:
            self._submit({"kind": "params", "data": new})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Points at or before the last step logged for a key are dropped (resume recomputes them)."""
        if not self._enabled:
            return
        step = int(step)  # a numpy or tensor step would not survive json.dumps in the pending file
        with self._lock:  # the system-metrics sampler calls this from its own thread
            data = {k: float(v) for k, v in metrics.items() if step > self._last_step.get(k, -1)}
            if not self._enabled or not data:
                return
            self._last_step.update(dict.fromkeys(data, step))
            self._metrics.append({"kind": "metrics", "data": data, "step": step, "timestamp": int(time.time() * 1000)})
            wait = self._metrics_sent_at + METRICS_INTERVAL_S - time.monotonic()
            if wait <= 0:
                self._send_metrics()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self._send_metrics_later)
                self._timer.daemon = True
                self._timer.start()

    def set_tags(self, tags: dict[str, str]) -> None:
        """MLflow sends queued operations in parallel: of two quick values for one key, either may stay."""
        if not self._enabled:
            return
        self._submit({"kind": "tags", "data": {k: str(v)[:MAX_TAG_VAL_LENGTH] for k, v in tags.items()}})

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Uploads a file or directory before returning, so the caller may delete it afterwards."""
        if not self._enabled:
            return
        path = Path(path).resolve()
        if not path.exists():
            raise FileNotFoundError(path)
        record = {"kind": "artifact", "path": str(path), "artifact_path": artifact_path}
        with self._lock:
            self._send_metrics()  # records keep their order
        if self._offline:
            self._append_pending([record])
            return
        try:
            _log_path(self._client, self.run_id, path, artifact_path)
        except Exception as e:
            self._failed([record], e)

    def close(self, status: str = "FINISHED") -> None:
        """Stops the system metrics sampler, waits for every record still being sent (those that
        failed go to the pending file), and ends the run."""
        if not self._enabled:
            return
        if self._sampler is not None:
            self._sampler.stop()  # its last sample is sent below
        with self._lock:
            self._send_metrics()
            self._enabled = False  # later calls (and a second close) are no-ops; the timer too
        while self._inflight:  # a rejected request comes back as one request per record
            self._settle(wait=True)
        self._sender.shutdown(wait=True)
        end = {"kind": "end", "status": status}
        if self._offline:
            self._append_pending([end])
            return
        try:
            self._client.set_terminated(self.run_id, status)
        except Exception as e:
            self._failed([end], e)

    def _submit(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._send_metrics()  # records keep their order
            self._submit_records([record])

    def _submit_records(self, records: list[dict[str, Any]]) -> None:
        self._settle(wait=False)  # notices a failed server on the next call, without waiting
        if self._offline:
            self._append_pending(records)
        else:
            self._send(records)

    def _send_metrics(self) -> None:
        """Sends the metrics records waiting (call with the lock held)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        records, self._metrics = self._metrics, []
        if records:
            self._metrics_sent_at = time.monotonic()
            self._submit_records(records)

    def _send_metrics_later(self) -> None:
        with self._lock:
            self._timer = None
            if self._enabled:
                self._send_metrics()

    def _send(self, records: list[dict[str, Any]]) -> None:
        """One request for `records`, made by the sending thread; should MLflow reject it, `_settle`
        sends them again one per request, so that the rejection names exactly the record to drop."""
        entities = _entities(records)
        if not any(entities.values()):  # nothing to send
            return
        self._inflight.append((self._sender.submit(self._log_batch, entities), records))

    def _log_batch(self, entities: dict[str, list[Any]]) -> None:
        """On the sending thread. The client splits a batch to MLflow's per-request limits: records
        split over several requests, of which some arrived, are kept whole on a failure, and
        upload_pending skips what did arrive. After an outage, queued requests fail at once instead
        of each waiting out the HTTP timeouts."""
        if self._outage_seen:
            raise ConnectionError(f"MLflow at {self._uri} failed an earlier request")
        try:
            self._client.log_batch(self.run_id, **entities)
        except Exception as e:
            if not _is_rejection(e, remote=self._remote):
                self._outage_seen = True
            raise

    def _settle(self, *, wait: bool) -> None:
        """Forgets records MLflow has stored and hands failed ones to `_failed_batch`. Without
        `wait`, requests still running are kept for a later call."""
        running, inflight, self._inflight = [], self._inflight, []
        for future, records in inflight:
            if not wait and not future.done():
                running.append((future, records))
            elif (error := future.exception()) is not None:
                self._failed_batch(records, error)
        self._inflight = running + self._inflight

    def _failed_batch(self, records: list[dict[str, Any]], error: Exception) -> None:
        """A refused request of several records is sent again one per record, so only the refused
        one is dropped (a store skips the metric points it already has); else as `_failed`."""
        if len(records) > 1 and _is_rejection(error, remote=self._remote) and not self._offline:
            for record in records:
                self._send([record])
        else:
            self._failed(records, error)

    def _failed(self, records: list[dict[str, Any]], error: Exception) -> None:
        """A request MLflow refused would be refused again: drop it. Anything else is an outage."""
        if _is_rejection(error, remote=self._remote):
            log.warning("MLflow rejected %.300s, dropping it: %s", records, error)
            return
        self._go_offline(error)
        self._append_pending(records)

    def _go_offline(self, reason: object) -> None:
        if not self._offline:
            self._offline = True
            log.warning(
                "MLflow tracking server %s unreachable (%.300s); training continues and records are "
                "kept in %s: upload them later with `%s`",
                self._uri, reason, self._pending, self._upload_command(),
            )

    def _upload_command(self) -> str:
        """The command the warnings name, for this run folder and URI."""
        return f"hippo mlflow upload {self._pending.parent} --tracking-uri {self._uri}"

    def _append_pending(self, records: list[dict[str, Any]]) -> None:
        header = {"run_id": self.run_id, "experiment": self._experiment, "run_name": self._run_name}
        with self._pending.open("a") as f:
            for record in records:
                f.write(json.dumps({**header, **record}) + "\n")


def upload_pending(run_dir: Path, tracking_uri: str | None = None) -> int:
    """Replays `<run_dir>/mlflow_pending.jsonl` into MLflow and returns the number of records.

    Records without a run id (the server was down before any run existed) go to one new run.
    Metric steps and params the run already has are skipped, so uploading after a resumed run
    re-logged some steps creates no duplicates. The file is then renamed to UPLOADED_FILE.
    Raises TrackingError when the server is unreachable, is not MLflow, or fails on the way.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    pending = Path(run_dir) / PENDING_FILE
    if not pending.is_file():
        raise FileNotFoundError(errno.ENOENT, "no records waiting for upload (`hippo train` writes them "
                                "there while MLflow is unreachable)", str(pending))
    records = [json.loads(line) for line in pending.read_text().splitlines() if line.strip()]
    uri = _resolve_uri(Path(run_dir), tracking_uri)
    if uri.startswith(("http://", "https://")) and (reason := _unreachable(uri)):
        raise TrackingError(f"MLflow tracking server {uri} unreachable ({reason}); {pending} is kept: "
                            "retry once it is up, or pass the right --tracking-uri")
    try:
        _replay(MlflowClient(uri), uri, records)
    except MlflowException as e:
        raise TrackingError(f"MLflow at {uri} did not take the records ({str(e)[:300]}); {pending} is kept: "
                            "retry, or pass the right --tracking-uri") from e
    pending.rename(pending.with_name(UPLOADED_FILE))
    return len(records)


def _replay(client: MlflowClient, uri: str, records: list[dict[str, Any]]) -> None:
    by_run: dict[str | None, list[dict[str, Any]]] = {}
    for record in records:
        by_run.setdefault(record["run_id"], []).append(record)
    for run_id, run_records in by_run.items():
        if run_id is None:
            first = run_records[0]
            experiment_id = _experiment_id(client, uri, first["experiment"])
            run_id = client.create_run(experiment_id, run_name=first["run_name"]).info.run_id
        _log_records(client, run_id, _not_yet_logged(client, run_id, run_records))


def _not_yet_logged(client: MlflowClient, run_id: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    existing_params = client.get_run(run_id).data.params
    steps: dict[str, set[int]] = {}
    kept = []
    for record in records:
        if record["kind"] == "params":
            record = {**record, "data": {k: v for k, v in record["data"].items() if k not in existing_params}}
        elif record["kind"] == "metrics":
            data = {}
            for key, value in record["data"].items():
                if key not in steps:
                    steps[key] = {m.step for m in client.get_metric_history(run_id, key)}
                if record["step"] not in steps[key]:
                    steps[key].add(record["step"])
                    data[key] = value
            record = {**record, "data": data}
        kept.append(record)
    return kept


def _log_records(client: MlflowClient, run_id: str, records: list[dict[str, Any]]) -> None:
    """Sends records with one synchronous `log_batch` (the client splits it to MLflow's per-request
    limits), then their artifacts and the run's end."""
    status = None
    for record in records:
        if record["kind"] == "artifact":
            if Path(record["path"]).exists():
                _log_path(client, run_id, Path(record["path"]), record["artifact_path"])
            else:
                log.warning("artifact %s no longer exists, not uploaded", record["path"])
        elif record["kind"] == "end":
            status = record["status"]
    client.log_batch(run_id, **_entities(records))
    if status is not None:
        client.set_terminated(run_id, status)


def _entities(records: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """`log_batch` keyword arguments for the params, metrics and tags among records."""
    from mlflow.entities import Metric, Param, RunTag

    metrics, params, tags = [], {}, {}
    for record in records:
        kind, data = record["kind"], record.get("data", {})
        if kind == "metrics":
            metrics += [Metric(k, v, record["timestamp"], record["step"]) for k, v in data.items()]
        elif kind == "params":
            params.update(data)
        elif kind == "tags":
            tags.update(data)  # one value per key: MLflow refuses duplicate keys in a batch
    return {
        "metrics": metrics,
        "params": [Param(k, v) for k, v in params.items()],
        "tags": [RunTag(k, v) for k, v in tags.items()],
    }


def _log_path(client: MlflowClient, run_id: str, path: Path, artifact_path: str | None) -> None:
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def _resolve_uri(run_dir: Path, tracking_uri: str | None) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else a store inside the run folder (no server, and
    never MLflow's default ./mlflow.db in whatever the current directory happens to be)."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run_dir.resolve()}/mlflow.db"


def _experiment_id(client: MlflowClient, uri: str, name: str) -> str:
    """Gets or creates the experiment. A sqlite store keeps artifacts in `mlruns/` beside the
    database file; MLflow's default would be `./mlruns` under the current directory."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()
    return client.create_experiment(name, artifact_location=location)


def _unreachable(uri: str) -> str | None:
    """Why `uri` cannot take records, or None. One quick MLflow REST call, so a dead server costs
    seconds (not MLflow's retry schedule), and a web server that is not MLflow counts as down
    instead of as MLflow refusing every record."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + PROBE_PATH, timeout=HEALTH_TIMEOUT_S) as answer:
            status, body = answer.status, answer.read(PROBE_BYTES)
    except urllib.error.HTTPError as e:
        if e.code in AUTH_STATUS:
            return None  # reachable; whether the client's credentials pass shows on the first request
        try:
            status, body = e.code, e.read(PROBE_BYTES)
        except OSError as err:
            return str(err)
    except OSError as e:  # URLError, refused, timeout
        return str(e)
    if not _is_json_object(body):
        return f"it answered HTTP {status} without an MLflow reply: not an MLflow tracking server"
    return None


def _is_json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False


def _is_rejection(error: Exception, *, remote: bool) -> bool:
    """True when MLflow refuses the request itself (bad value, unknown run): sending it again cannot
    help. False for outages, and for auth or rate-limit answers, which may pass later. From a server
    only MLflow's own JSON reply (RestException) counts: a 4xx page of another web server is an outage."""
    from mlflow.exceptions import MlflowException, RestException

    if not isinstance(error, RestException if remote else MlflowException):
        return False
    status = error.get_http_status_code()
    return 400 <= status < 500 and status not in (401, 403, 429)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in params.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:MAX_PARAM_VAL_LENGTH]
    return flat
