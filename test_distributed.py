"""Specification of distributed training: two CPU processes under torchrun (gloo).

One tiny run, launched exactly as a user would launch it, answers every question: the
ranks end with identical weights, rank 0 alone tracks and writes, and the global batch
is the per-rank batch times the world size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

import standalone_training as st
from conftest import cli_env, free_port

pytestmark = pytest.mark.slow  # every test here reads the one torchrun run

HERE = Path(__file__).resolve().parent
MODULE = HERE / "standalone_training.py"
WORLD_SIZE = 2
BATCH_PER_RANK = 2


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    """A two-process run of a tiny config; everything it left behind lies under `root`."""
    root = tmp_path_factory.mktemp("ddp")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD_SIZE}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        str(MODULE), "train", "--samples", "16", "--epochs", "2", "--batch-size", str(BATCH_PER_RANK),
        "--image-size", "32", "--test-samples", "4", "--no-energy",
        "--output-dir", str(root / "run"), "--tracking-uri", uri,
    ]
    try:
        proc = subprocess.run(command, cwd=root, env=cli_env(), capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun did not finish within {exc.timeout} s; stderr tail:\n{(exc.stderr or b'')[-2000:]!r}")
    return dict(proc=proc, root=root, uri=uri)


def test_two_rank_run_succeeds(ddp_run):
    proc = ddp_run["proc"]
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}; stderr tail:\n{proc.stderr[-3000:]}"


def test_ranks_end_with_identical_parameters(ddp_run):
    metrics = json.loads((ddp_run["root"] / "run" / "metrics.json").read_text())
    checksums = metrics["parameter_checksums"]
    assert metrics["world_size"] == WORLD_SIZE
    assert len(checksums) == WORLD_SIZE
    assert len(set(checksums)) == 1, f"ranks diverged: {checksums}"


def test_best_checkpoint_holds_the_weights_every_rank_ended_with(ddp_run):
    run = ddp_run["root"] / "run"
    model = st.model_from_checkpoint(st.load_checkpoint(run / "best.pt"), path=run / "best.pt")
    saved = st._gather_parameter_checksums(model, st.DistInfo())
    assert saved == json.loads((run / "metrics.json").read_text())["parameter_checksums"][:1]


def only_mlflow_run(uri: str):
    """The one run the tracking store holds (fails if there are more or none)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, f"expected one MLflow run, found {len(runs)}"
    return runs[0]


def test_exactly_one_mlflow_run_records_the_global_batch(ddp_run):
    run = only_mlflow_run(ddp_run["uri"])
    assert run.info.status == "FINISHED"
    assert run.data.params["world_size"] == str(WORLD_SIZE)
    assert run.data.params["batch_size"] == str(BATCH_PER_RANK)
    assert run.data.params["global_batch_size"] == str(BATCH_PER_RANK * WORLD_SIZE)


def test_rank_zero_alone_writes_files_and_prints(ddp_run):
    root, proc = ddp_run["root"], ddp_run["proc"]
    # MLflow's artifact store (mlartifacts/ or mlruns/) keeps the copy of best.pt rank 0 logged.
    store = Path(urlparse(only_mlflow_run(ddp_run["uri"]).info.artifact_uri).path)
    assert root in store.parents
    store_top = root / store.relative_to(root).parts[0]

    def outside_store(name: str) -> list[Path]:
        return sorted(p for p in root.rglob(name) if store_top not in p.parents)

    assert outside_store("best.pt") == [root / "run" / "best.pt"]
    assert outside_store("last.pt") == [root / "run" / "last.pt"]
    assert [p.relative_to(store) for p in store.rglob("*.pt")] == [Path("best.pt")]
    assert {p.name for p in root.iterdir()} == {"run", "mlflow.db", "mlflow.db.lock", store_top.name}
    assert not [p for p in root.rglob("*") if "rank" in p.name.lower()]
    assert sum(line.startswith("outputs: ") for line in proc.stdout.splitlines()) == 1
    assert sum(" epoch   1/2 " in line for line in proc.stderr.splitlines()) == 1
