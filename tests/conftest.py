"""Fixtures shared by several test folders."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from hippo.data_pipeline.prepare import prepare
from tests.helpers import free_port, text_document


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    """Tests that start processes (dist) or compile (compile) are slow too, so `-m "not slow"`
    stays the in-process fast tier."""
    for item in items:
        if item.get_closest_marker("dist") or item.get_closest_marker("compile"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` (sqlite backend, proxied artifacts) in its own process group."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    mlflow_exe = Path(sys.executable).parent / "mlflow"
    cmd = [
        str(mlflow_exe), "server",
        "--backend-store-uri", f"sqlite:///{tmp_path}/srv.db",
        "--artifacts-destination", str(tmp_path / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    log_file = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 90 s"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log_file.close()




@pytest.fixture(scope="session")
def train_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train_data")
    rng = random.Random(0)
    src = root / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": text_document(rng)}) + "\n" for _ in range(1500)))
    prepare([src], root / "prepared", tokenizer="byte", seq_len=32, val_fraction=0.1, shard_bytes=30_000, progress=False)
    return root / "prepared"
