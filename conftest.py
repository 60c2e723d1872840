"""What every test file shares: markers, the environment of CLI subprocesses, one torch thread.

Markers:

- ``slow``: a test that trains, runs the CLI in subprocesses, starts a server or reproduces a
  documented evaluation. ``python -m pytest -m "not slow"`` runs the fast specification (well
  under a minute); a plain ``python -m pytest`` runs everything.
- ``remote_data``: a test that talks to real services; skipped unless pytest runs with
  ``--remote-data`` (the astropy convention, without needing pytest-remotedata).

Helpers, imported by the test files (``from conftest import cli_env, free_port``):

- ``cli_env()``: the environment for ``python standalone_training.py ...`` subprocesses.
- ``free_port()``: a TCP port on 127.0.0.1 that nothing listens on.
- ``start_mlflow_server(directory)``, ``healthy(url)``, ``kill_group(proc)``: a real
  ``mlflow server`` on 127.0.0.1 (sqlite store and proxied artifacts in `directory`), whether
  it answers, and killing it with its workers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--remote-data", action="store_true", default=False,
                     help="run tests that reach real remote services (SkyView, MAST, CDS)")


def pytest_configure(config):
    config.addinivalue_line("markers", "remote_data: test needs internet access to real services")
    config.addinivalue_line("markers", "slow: trains, runs CLI subprocesses or servers; deselect with -m \"not slow\"")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--remote-data"):
        return
    skip = pytest.mark.skip(reason="needs --remote-data")
    for item in items:
        if "remote_data" in item.keywords:
            item.add_marker(skip)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess: one OpenMP thread, no MLflow telemetry, and no
    MLFLOW_TRACKING_URI inherited from the shell (each test names its own store); `extra` on top."""
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it; the race is harmless here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(directory: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on 127.0.0.1 in its own process group (so that it can be killed whole)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with open(directory / "server.log", "w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{directory / 'server.db'}",
             "--artifacts-destination", str(directory / "artifacts"), "--serve-artifacts", "--workers", "1"],
            cwd=directory, env=cli_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{port}"


def healthy(url: str) -> bool:
    """Whether an MLflow server at `url` answers its /health check."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def kill_group(proc: subprocess.Popen) -> None:
    """Kill a process started in its own session, with every worker it forked."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op torch thread in the test process: the convolutions here are small, and on a
    shared two-core machine oversubscribed OpenMP threads (ours beside the CLI subprocesses')
    make torch an order of magnitude slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
