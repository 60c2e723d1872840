"""Faults and bad input: what AstrID does when a run is stopped, a disk fills or a file lies.

Read top to bottom:

    interruption and resume -> atomic checkpoints -> a full disk -> MLflow out of reach
    -> reproducibility -> refusals of bad input.

What a process does is tested on real processes. The training runs are true subprocesses
(``python standalone_training.py train ...``), stopped with ``os.kill``, their MLflow runs read
back from real SQLite stores; they share one fixture and run side by side. The many short
refusals run the CLI's ``main`` in processes forked from a server that imported the module once
(each fresh interpreter spends seconds importing torch); refusals by true subprocesses are
tested on the training runs here and in test_integrity.py. Configurations are tiny: the CI
machine has two busy cores.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import multiprocessing
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
import torch
from astropy.io import fits

import standalone_training as st
from conftest import cli_env

HERE = Path(__file__).resolve().parent
MODULE = HERE / "standalone_training.py"
RUNNER = HERE / "run_standalone_training.py"
IS_ROOT = os.geteuid() == 0


def _permission_bits_bind() -> bool:
    """Whether a directory without write permission refuses new files (not for root with CAP_DAC_OVERRIDE)."""
    with tempfile.TemporaryDirectory() as scratch:
        locked = Path(scratch) / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            (locked / "probe").touch()
        except PermissionError:
            return True
        finally:
            locked.chmod(0o700)
        return False


PERMISSION_BITS_BIND = _permission_bits_bind()

# One small run for every training process here: 19 train / 5 validation samples of 32x32 px,
# 5 steps an epoch. Six epochs leave seconds of training after the first last.pt appears, so
# a signal sent then always lands mid-run; patience 100 keeps early stopping out of the way.
EPOCHS, STEPS_PER_EPOCH = 6, 5
RUN = ["train", "--samples", "24", "--epochs", str(EPOCHS), "--batch-size", "4", "--test-samples", "4", "--image-size", "32",
       "--width", "8", "--patience", "100", "--seed", "7", "--device", "cpu"]
OFFLINE = ["--no-mlflow", "--no-energy"]
# Timing fields of history.json: they measure the machine, not the model.
TIMING_FIELDS = ("epoch_time_s", "train_samples_per_s")


# ----------------------------------------------------------------------------
# Helpers: watched processes
# ----------------------------------------------------------------------------


class Job:
    """`python standalone_training.py ARGS` whose output goes to files, so it can be watched live."""

    def __init__(self, name: str, args: list[str], *, cwd: Path, script: Path = MODULE) -> None:
        self.name, self.args = name, args
        cwd.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = cwd / f"{name}.stdout", cwd / f"{name}.stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(script), *args], cwd=cwd, env=cli_env(), stdout=out, stderr=err)
        self.started = time.monotonic()
        self.ended: float | None = None
        self.events: dict[str, float] = {}  # what the driver saw or did, and when (monotonic s)

    def poll(self) -> bool:
        if self.ended is None and self.proc.poll() is not None:
            self.ended = time.monotonic()
        return self.ended is not None

    @property
    def rc(self) -> int | None:
        return self.proc.returncode

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# A step: when condition(job) first holds, action(job) runs once; steps of one job run in order.
Step = tuple[Callable[[Job], bool], Callable[[Job], None]]


def exited(job: Job) -> bool:
    """The condition of a step that follows a job's end."""
    return job.poll()


def drive(jobs: dict[str, Job], steps: dict[str, list[Step]], *, timeout: float) -> None:
    """Poll every job and fire its steps until all have exited; a job still alive at `timeout` fails the test.

    Steps may add jobs to `jobs`. However the call ends, no job outlives it.
    """
    deadline = time.monotonic() + timeout
    pending = {name: list(s) for name, s in steps.items()}
    try:
        while True:
            all_exited = all([job.poll() for job in jobs.values()])  # a list: poll every job, for its exit time
            fired = False
            for name in list(pending):
                job = jobs[name]
                while pending[name] and pending[name][0][0](job):
                    pending[name].pop(0)[1](job)
                    fired = True
            # Once every job has exited and nothing fired, no step can fire any more.
            if all_exited and not fired:
                return
            if time.monotonic() > deadline:
                alive = [n for n, j in jobs.items() if j.ended is None]
                pytest.fail(f"still running after {timeout} s: {alive}; pending steps: {[n for n, s in pending.items() if s]}")
            time.sleep(0.01)
    finally:
        for job in list(jobs.values()):
            job.kill()


def nonblank_lines(text: str) -> list[str]:
    """Lines a person would see: tqdm's carriage-return redraws and blank lines dropped."""
    return [part.strip() for line in text.splitlines() for part in line.split("\r")[-1:] if part.strip()]


def strays(directory: Path) -> list[Path]:
    """Temporary files atomic_write leaves only if it is killed mid-write."""
    return sorted(directory.glob(".*.tmp"))


def mlflow_client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def wait_for(condition: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.001)


# ----------------------------------------------------------------------------
# Interruption, resume, a full disk, MLflow out of reach, determinism: one set of runs
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, *, size: str = "64m"):
    """A real filesystem that can fill up; None where this user cannot mount one."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = IS_ROOT and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0
    try:
        yield path if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(directory: Path) -> None:
    """Write zeros until the filesystem says ENOSPC."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for chunk in (b"\0" * 2**20, b"\0" * 4096, b"\0"):
            with contextlib.suppress(OSError):
                while os.write(fd, chunk):
                    pass
    finally:
        os.close(fd)


class Runs(NamedTuple):
    jobs: dict[str, Job]
    root: Path
    interrupted: dict[str, dict]  # per interrupted run, read as it exited: MLflow status, files written
    disk: Path | None  # the tmpfs the disk-full run wrote to, None where none could be mounted


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    """Every training process of this file, side by side, each stopped or broken on cue.

    - sigint / sigterm: the signal once the first last.pt exists (training is then surely running);
      sigint is then resumed from its last.pt, and sigterm's last.pt, relabelled as width 16, too.
    - reference: the sigint run, uninterrupted; deterministic: the same offline, with --deterministic.
    - double: SIGINT, and a second SIGINT as soon as the first is acknowledged.
    - disk_full: writes to a 64 MiB tmpfs that is filled once the first last.pt exists.
    - mlflow_down / mlflow_optional: a tracking server that nothing listens on.
    """
    root = tmp_path_factory.mktemp("runs")
    uri = {name: f"sqlite:///{root / name}.db" for name in ("sigint", "sigterm", "reference")}
    specs = {
        "sigint": [*RUN, "--no-energy", "--tracking-uri", uri["sigint"], "--output-dir", str(root / "sigint")],
        "sigterm": [*RUN, "--tracking-uri", uri["sigterm"], "--output-dir", str(root / "sigterm")],  # energy on
        "reference": [*RUN, "--no-energy", "--tracking-uri", uri["reference"], "--output-dir", str(root / "reference")],
        "deterministic": [*RUN, *OFFLINE, "--deterministic", "--output-dir", str(root / "deterministic")],
        "double": [*RUN, *OFFLINE, "--output-dir", str(root / "double")],
        "mlflow_down": [*RUN, "--no-energy", "--tracking-uri", "http://127.0.0.1:1", "--output-dir", str(root / "mlflow_down")],
        "mlflow_optional": [*RUN, "--no-energy", "--tracking-uri", "http://127.0.0.1:1", "--mlflow-optional", "--output-dir", str(root / "mlflow_optional")],
    }
    interrupted: dict[str, dict] = {}
    with small_tmpfs(root / "tmpfs") as disk:
        if disk is not None:
            specs["disk_full"] = [*RUN, *OFFLINE, "--output-dir", str(disk / "run")]
        # mlflow_optional runs in a directory of its own: a local store it fell back to would show there.
        cwd = {"mlflow_optional": root / "mlflow_optional_cwd"}
        jobs = {name: Job(name, args, cwd=cwd.get(name, root)) for name, args in specs.items()}

        def exists(path: Path) -> Callable[[Job], bool]:
            return lambda job: path.exists()

        def acknowledged(job: Job) -> bool:
            return "SIGINT received" in job.stderr or job.poll()

        def send(sig: int, event: str) -> Callable[[Job], None]:
            def action(job: Job) -> None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(job.proc.pid, sig)
                job.events[event] = time.monotonic()
            return action

        def record(job: Job) -> None:
            """What an interrupted run left, before anything (a resume) changes it."""
            out = root / job.name
            state = interrupted[job.name] = {"files": sorted(p.name for p in out.iterdir()), "mlflow_status": None}
            if (out / "last.pt").exists():
                shutil.copy2(out / "last.pt", root / f"{job.name}-interrupted-last.pt")
                run_id = st.load_checkpoint(out / "last.pt").get("mlflow_run_id", "")
                state["mlflow_status"] = mlflow_client(uri[job.name]).get_run(run_id).info.status if run_id else "no run id"

        def resume(job: Job) -> None:
            """Through the runner, whose default mode is a preset the user never typed, plus a typed --lr."""
            jobs["resume"] = Job("resume", ["--resume", str(root / "sigint" / "last.pt"), "--device", "cpu", "--lr", "0.5"], cwd=root, script=RUNNER)

        def resume_best(job: Job) -> None:
            """The finished reference run's best.pt, copied so that a wrongful resume harms no other test."""
            (root / "best_copy").mkdir()
            shutil.copy2(root / "reference" / "best.pt", root / "best_copy" / "best.pt")
            jobs["resume_best"] = Job("resume_best", ["train", "--resume", str(root / "best_copy" / "best.pt"), "--device", "cpu"], cwd=root)

        def resume_other_architecture(job: Job) -> None:
            """A real last.pt (width 8) whose architecture record now claims width 16."""
            payload = st.load_checkpoint(root / "sigterm" / "last.pt")
            payload["model_config"] = {**payload["model_config"], "width": 16}
            payload["config"] = {**payload["config"], "width": 16}
            path = st.save_checkpoint(root / "tampered" / "last.pt", payload)
            jobs["resume_other_architecture"] = Job("resume_other_architecture", ["train", "--resume", str(path), "--device", "cpu"], cwd=root)

        def fill(job: Job) -> None:
            fill_disk(disk)
            job.events["disk full"] = time.monotonic()

        def mark(event: str) -> Callable[[Job], None]:
            return lambda job: job.events.setdefault(event, time.monotonic())

        steps: dict[str, list[Step]] = {
            "sigint": [(exists(root / "sigint" / "last.pt"), send(signal.SIGINT, "signal")), (exited, record), (exited, resume)],
            "sigterm": [(exists(root / "sigterm" / "last.pt"), send(signal.SIGTERM, "signal")), (exited, record), (exited, resume_other_architecture)],
            "double": [(exists(root / "double" / "last.pt"), send(signal.SIGINT, "signal")), (acknowledged, send(signal.SIGINT, "second signal"))],
            "reference": [(exited, resume_best)],
            "mlflow_down": [(exists(root / "mlflow_down" / "config.json"), mark("config.json"))],
        }
        if disk is not None:
            steps["disk_full"] = [(exists(disk / "run" / "last.pt"), fill)]
        drive(jobs, steps, timeout=600)
        yield Runs(jobs, root, interrupted, disk)


def describe(job: Job) -> str:
    return f"{job.name}: rc {job.rc}\n--- stderr (tail) ---\n{job.stderr[-3000:]}\n--- stdout ---\n{job.stdout[-1000:]}"


# -- Interruption ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name, signame", [("sigint", "SIGINT"), ("sigterm", "SIGTERM")])
def test_a_signal_saves_last_pt_and_says_how_to_resume(runs, name, signame):
    job, out = runs.jobs[name], runs.root / name
    assert job.rc == 130, describe(job)
    assert "Traceback" not in job.stderr, describe(job)
    lines = nonblank_lines(job.stderr)
    resume_lines = [line for line in lines if "--resume" in line]
    assert len(resume_lines) == 1, describe(job)
    assert resume_lines[0] == lines[-1], "the resume hint is the last thing said"
    assert f"--resume {out / 'last.pt'}" in lines[-1]
    assert signame in lines[-1]
    # last.pt holds the state after the step in progress: mid-run, at least one step into an epoch.
    payload = st.load_checkpoint(runs.root / f"{name}-interrupted-last.pt")  # copied as it exited
    assert 1 <= payload["step"] <= STEPS_PER_EPOCH and 0 <= payload["epoch"] < EPOCHS
    assert f"epoch {payload['epoch'] + 1}, step {payload['step']}" in lines[-1]
    files = runs.interrupted[name]["files"]
    assert "last.pt" in files
    assert "metrics.json" not in files, "an interrupted run must not pose as finished"
    assert not [f for f in files if f.endswith(".tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sigint", "sigterm"])
def test_an_interrupted_run_is_killed_in_mlflow(runs, name):
    assert runs.interrupted[name]["mlflow_status"] == "KILLED"


@pytest.mark.slow
def test_the_energy_tracker_is_stopped_and_recorded_on_interrupt(runs):
    """CodeCarbon is stopped on the way out and its reading lands in the KILLED MLflow run."""
    job = runs.jobs["sigterm"]
    assert job.rc == 130, describe(job)
    if "CodeCarbon could not start" in job.stderr:
        pytest.skip("CodeCarbon cannot run on this machine, so there is no tracker to stop")
    run_id = st.load_checkpoint(runs.root / "sigterm" / "last.pt")["mlflow_run_id"]
    metrics = mlflow_client(f"sqlite:///{runs.root / 'sigterm'}.db").get_run(run_id).data.metrics
    assert {"energy_kwh", "emissions_kg_co2eq", "duration_s"} <= set(metrics), sorted(metrics)
    assert metrics["duration_s"] > 0


# -- Resume ------------------------------------------------------------------


@pytest.mark.slow
def test_resume_ends_exactly_where_an_uninterrupted_run_ends(runs):
    """Model, optimiser, schedule, early stopping, epoch, step and data order all survive."""
    resumed, reference = runs.jobs["resume"], runs.jobs["reference"]
    assert resumed.rc == 0, describe(resumed)
    assert reference.rc == 0, describe(reference)
    a, b = runs.root / "sigint", runs.root / "reference"
    assert (a / "metrics.json").read_bytes() == (b / "metrics.json").read_bytes()
    assert st.load_checkpoint(a / "best.pt")["early_stopping"] == st.load_checkpoint(b / "best.pt")["early_stopping"]


@pytest.mark.slow
def test_resume_reproduces_the_history_but_the_interrupted_epochs_train_loss_rounds_differently(runs):
    """history.json matches field by field, timings aside.

    The train loss of the interrupted epoch is a float32 sum before the interruption plus a
    float32 sum after it, added in float64, so it may differ in the 7th significant digit.
    """
    resumed = json.loads((runs.root / "sigint" / "history.json").read_text())
    reference = json.loads((runs.root / "reference" / "history.json").read_text())
    assert [r["epoch"] for r in resumed] == [r["epoch"] for r in reference] == list(range(1, EPOCHS + 1))
    for r, s in zip(resumed, reference):
        for key in r.keys() - set(TIMING_FIELDS) - {"train_loss"}:
            assert r[key] == s[key], (r["epoch"], key)
        assert r["train_loss"] == pytest.approx(s["train_loss"], rel=1e-6)


@pytest.mark.slow
def test_resume_continues_the_same_mlflow_run(runs):
    job = runs.jobs["resume"]
    assert job.rc == 0, describe(job)
    uri = f"sqlite:///{runs.root / 'sigint'}.db"
    run_id = st.load_checkpoint(runs.root / "sigint" / "best.pt")["mlflow_run_id"]
    assert job.stdout.strip().splitlines()[-1].endswith(f"MLflow run: {run_id}")
    client = mlflow_client(uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    experiment = client.get_experiment_by_name("astrid")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [run_id]
    steps = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert sorted(steps) == list(range(1, EPOCHS + 1)), "each epoch logged once across the interruption"


@pytest.mark.slow
def test_resume_warns_only_about_the_flags_the_user_typed(runs):
    """The runner's default mode sets --samples, --epochs and --batch-size; the user typed only --lr (and --device)."""
    job = runs.jobs["resume"]
    assert job.rc == 0, describe(job)
    warnings = [line for line in nonblank_lines(job.stderr) if "ignoring" in line]
    assert len(warnings) == 1, describe(job)
    assert warnings[0].endswith("resuming with the saved configuration; ignoring --lr"), warnings[0]
    assert json.loads((runs.root / "sigint" / "config.json").read_text())["lr"] == pytest.approx(st.TrainConfig().lr)


@pytest.mark.slow
def test_best_pt_is_the_best_epochs_own_state(runs):
    """Weights, history, optimiser and early stopping all of the best epoch: nothing from later epochs."""
    out = runs.root / "reference"
    best = st.load_checkpoint(out / "best.pt")
    metrics = json.loads((out / "metrics.json").read_text())
    assert best["kind"] == "best" and best["epoch"] == metrics["best_epoch"]
    assert [h["epoch"] for h in best["history"]] == list(range(1, best["epoch"] + 1))
    assert best["early_stopping"]["best_epoch"] == best["epoch"] and best["early_stopping"]["bad_epochs"] == 0
    assert best["threshold"] == metrics["threshold"]
    last = st.load_checkpoint(out / "last.pt")
    assert last["kind"] == "last" and len(last["history"]) == last["epoch"] == EPOCHS


def the_only_error_line(job: Job) -> str:
    """A refusal's whole stderr: exit status 2, no traceback, exactly one `astrid: error:` line."""
    assert job.rc == 2, describe(job)
    assert "Traceback" not in job.stderr, describe(job)
    lines = nonblank_lines(job.stderr)
    assert len(lines) == 1 and lines[0].startswith("astrid: error: "), describe(job)
    return lines[0]


@pytest.mark.slow
def test_resume_from_best_pt_is_refused_with_the_reason(runs):
    line = the_only_error_line(runs.jobs["resume_best"])
    assert "best epoch's weights" in line and "last.pt" in line
    assert sorted(p.name for p in (runs.root / "best_copy").iterdir()) == ["best.pt"], "nothing written beside it"


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_architecture_in_one_line(runs):
    line = the_only_error_line(runs.jobs["resume_other_architecture"])
    assert "different architecture" in line and "vs (16," in line
    assert not (runs.root / "tampered" / "metrics.json").exists()


# -- A second SIGINT ---------------------------------------------------------


@pytest.mark.slow
def test_a_second_sigint_exits_at_once_and_corrupts_nothing(runs):
    job, out = runs.jobs["double"], runs.root / "double"
    assert "second signal" in job.events, describe(job)
    assert job.rc in (130, -signal.SIGINT), describe(job)
    # Generous: "at once" means no further epochs, not a stopwatch on a loaded machine.
    assert job.ended - job.events["second signal"] < 30
    assert not (out / "metrics.json").exists()
    checkpoints = sorted(out.glob("*.pt"))
    assert checkpoints, "the first epoch's checkpoints were written before any signal"
    for path in checkpoints:
        st.load_checkpoint(path)
    assert strays(out) == []


# -- Atomic writes -------------------------------------------------------------


def signature(path: Path) -> tuple:
    """What changes when a file is written or replaced."""
    info = path.stat()
    return info.st_ino, info.st_size, info.st_mtime_ns


def _save_forever(path: Path, data: torch.Tensor, first_generation: int) -> None:
    """Child process: overwrite `path` with ever newer generations until killed."""
    generation = first_generation
    while True:
        st.save_checkpoint(path, {"generation": generation, "data": data})
        generation += 1


def test_sigkill_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    """Killed at any moment, the file at the path is an old or a new payload, never a partial one."""
    path = tmp_path / "last.pt"
    old = torch.zeros(4)
    st.save_checkpoint(path, {"generation": 0, "data": old})
    # Made before forking: the children only serialise, they run no torch kernels.
    new = torch.arange(4 * 2**20, dtype=torch.float32)
    fork = multiprocessing.get_context("fork")
    delays = np.random.default_rng(2024).uniform(0.0, 0.4, size=4)
    for round_, delay in enumerate([None, None, None, None, *delays]):
        child = fork.Process(target=_save_forever, args=(path, new, 1000 * (round_ + 1)), daemon=True)
        before = (set(strays(tmp_path)), signature(path))
        child.start()
        if delay is None:  # wait until a write has begun, beside the file or into it: a kill mid-write
            wait_for(lambda: (set(strays(tmp_path)) - before[0]) or signature(path) != before[1], timeout=60, what="a checkpoint write to start")
        else:
            time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=30)
        assert child.exitcode == -signal.SIGKILL
        payload = st.load_checkpoint(path)
        assert torch.equal(payload["data"], old if payload["generation"] == 0 else new), payload["generation"]
    leftovers = strays(tmp_path)
    assert leftovers, "no kill landed mid-write, so nothing was tested"
    unreadable = 0
    for stray in leftovers:
        try:
            st.load_checkpoint(stray)
        except st.AstridError:
            unreadable += 1
    assert unreadable, "a kill mid-write leaves a partial temporary file, never the checkpoint itself"
    # The strays never shadow the checkpoint, and the next save replaces it as usual.
    st.save_checkpoint(path, {"generation": -1, "data": old})
    assert st.load_checkpoint(path)["generation"] == -1
    assert path.name not in {p.name for p in leftovers}


# -- A full disk ---------------------------------------------------------------


def _save_under_size_limit(path: Path, data: torch.Tensor, limit: int, conn) -> None:
    """Child process: save `data` with files capped at `limit` bytes; report what was raised."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        st.save_checkpoint(path, {"generation": 2, "data": data})
        conn.send(("saved", "", None))
    except BaseException as exc:  # noqa: BLE001 - the parent asserts on exactly what came out
        conn.send(("raised", type(exc).__name__, getattr(exc, "errno", None)))


@pytest.fixture(scope="module")
def size_limited_save(tmp_path_factory):
    """A first small checkpoint, then a large one written under RLIMIT_FSIZE (ulimit -f)."""
    directory = tmp_path_factory.mktemp("fsize")
    path = directory / "last.pt"
    st.save_checkpoint(path, {"generation": 1, "data": torch.zeros(16)})
    before = path.read_bytes()
    big = torch.zeros(2**20)
    fork = multiprocessing.get_context("fork")
    parent, child_end = fork.Pipe()
    child = fork.Process(target=_save_under_size_limit, args=(path, big, 64 * 1024, child_end))
    child.start()
    outcome = parent.recv() if parent.poll(60) else ("no answer", "", None)
    child.join(timeout=30)
    return path, before, outcome


def test_a_file_size_limit_while_saving_keeps_the_previous_checkpoint(size_limited_save):
    path, before, (what, _, _) = size_limited_save
    assert what == "raised"
    assert path.read_bytes() == before
    assert st.load_checkpoint(path)["generation"] == 1
    assert strays(path.parent) == [], "the failed temporary file is removed"


def test_a_full_disk_while_saving_raises_the_os_error(size_limited_save):
    """The OSError itself, which the CLI reports in one line (torch's own writer hid it in a RuntimeError)."""
    _, _, (what, kind, code) = size_limited_save
    assert (what, kind, code) == ("raised", "OSError", errno.EFBIG)


@pytest.mark.slow
def test_a_disk_that_fills_during_training_keeps_the_last_good_checkpoints(runs):
    if runs.disk is None:
        pytest.skip("mounting a tmpfs needs root; the RLIMIT_FSIZE test covers save_checkpoint")
    job, out = runs.jobs["disk_full"], runs.disk / "run"
    assert "disk full" in job.events
    assert job.rc not in (0, None), describe(job)
    assert not (out / "metrics.json").exists()
    for name in ("best.pt", "last.pt"):
        assert st.load_checkpoint(out / name)["epoch"] >= 1
    assert strays(out) == [], "a failed save removes its temporary file"


@pytest.mark.slow
def test_a_disk_that_fills_during_training_is_reported_in_one_line(runs):
    if runs.disk is None:
        pytest.skip("mounting a tmpfs needs root")
    job = runs.jobs["disk_full"]
    assert job.rc == 2, describe(job)
    assert "Traceback" not in job.stderr, describe(job)
    last = nonblank_lines(job.stderr)[-1]
    assert last.startswith("astrid: error:") and "No space left on device" in last, last


# -- MLflow out of reach -------------------------------------------------------


@pytest.mark.slow
def test_an_unreachable_tracking_server_fails_fast_in_one_line(runs):
    job = runs.jobs["mlflow_down"]
    assert job.rc == 2, describe(job)
    assert "Traceback" not in job.stderr
    last = nonblank_lines(job.stderr)[-1]
    assert last.startswith("astrid: error: MLflow tracking server http://127.0.0.1:1 is unreachable"), last
    assert "--mlflow-optional" in last
    assert sum("127.0.0.1:1" in line for line in nonblank_lines(job.stderr)) == 1, "said once"
    # From the moment it was ready to track (config.json written) to its exit; process start-up excluded.
    assert "config.json" in job.events, "it stopped before it reached the tracking server"
    assert job.ended - job.events["config.json"] < 30
    assert not (runs.root / "mlflow_down" / "last.pt").exists(), "no training without the tracking the user asked for"


@pytest.mark.slow
def test_mlflow_optional_trains_on_and_says_mlflow_was_off(runs):
    """Loudly, and on the record: the log, the last line, and metrics.json; and nothing logged elsewhere."""
    job, out = runs.jobs["mlflow_optional"], runs.root / "mlflow_optional"
    assert job.rc == 0, describe(job)
    reason = "MLflow tracking server http://127.0.0.1:1 is unreachable (ConnectionError)"
    about_server = [line for line in nonblank_lines(job.stderr) if "127.0.0.1:1" in line]
    assert len(about_server) == 1 and "WARNING" in about_server[0] and "continuing WITHOUT MLflow" in about_server[0], describe(job)
    assert job.stdout.strip().splitlines()[-1].endswith(f"MLflow run: none ({reason})")
    assert json.loads((out / "metrics.json").read_text())["mlflow"] == {"enabled": False, "reason_off": reason, "failed_at": "start"}
    cwd = job.stdout_path.parent
    assert not (cwd / "mlflow.db").exists() and not (cwd / "mlruns").exists(), "nothing is logged to a local store instead"


# -- Reproducibility -------------------------------------------------------------


@pytest.mark.slow
def test_deterministic_gives_the_same_metrics_as_the_default_on_cpu(runs):
    """Same numbers with and without --deterministic; only the MLflow record differs (the reference tracks)."""
    det, ref = runs.jobs["deterministic"], runs.jobs["reference"]
    assert det.rc == 0, describe(det)
    assert ref.rc == 0, describe(ref)
    a, b = runs.root / "deterministic", runs.root / "reference"
    assert json.loads((a / "config.json").read_text())["deterministic"] is True
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert (ma.pop("mlflow"), mb.pop("mlflow")) == ({"enabled": False, "reason_off": "--no-mlflow", "failed_at": None},
                                                  {"enabled": True, "reason_off": "", "failed_at": None})
    assert ma == mb


# ----------------------------------------------------------------------------
# Refusals: one line on stderr, a non-zero exit, no traceback
# ----------------------------------------------------------------------------


class Inputs(NamedTuple):
    root: Path
    paths: dict[str, str]  # placeholders of the refusal table
    marker: Path  # what the checkpoint with code in it would create


def saved_config(*, width: int) -> dict:
    """A training config as checkpoints store it."""
    cfg = st.TrainConfig(samples=12, epochs=2, batch_size=4, test_samples=4, image_size=32, width=width, mlflow=False, energy=False, device="cpu")
    return dataclasses.asdict(cfg)


class Evil:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({self.marker!r}).touch()",))


def write_fits(path: Path, data: np.ndarray) -> str:
    fits.PrimaryHDU(data).writeto(path)
    return str(path)


def write_lying_fits(path: Path) -> str:
    """A 14 KB FITS file whose header declares 100000 x 100000 float32 pixels (40 GB)."""
    header = fits.Header([("SIMPLE", True), ("BITPIX", -32), ("NAXIS", 2), ("NAXIS1", 100_000), ("NAXIS2", 100_000)]).tostring().encode()
    path.write_bytes(header + b" " * (-len(header) % 2880) + bytes(4 * 2880))
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    """Checkpoints and FITS files, good and bad, each made once."""
    root = tmp_path_factory.mktemp("inputs")
    p: dict[str, str] = {"root": str(root)}
    # A valid checkpoint in the format prediction expects: weights, architecture, threshold.
    model = st.StandaloneUNet(width=4)
    p["ckpt"] = str(st.save_checkpoint(root / "good.pt", dict(model=model.state_dict(), model_config=model.config, threshold=0.5)))
    # What `export` keeps (model, model_config, config, epoch, threshold, history): no optimiser state.
    p["exported"] = str(st.save_checkpoint(root / "exported.pt", dict(model=model.state_dict(), model_config=model.config,
                                                                      config=saved_config(width=4), epoch=2, threshold=0.5, history=[])))
    # Weights of width 8 that claim to be width 16.
    narrow = st.StandaloneUNet(width=8)
    p["arch"] = str(st.save_checkpoint(root / "arch.pt", dict(model=narrow.state_dict(), model_config={**narrow.config, "width": 16}, threshold=0.5)))
    (root / "random.pt").write_bytes(np.random.default_rng(1).bytes(4096))
    (root / "empty.pt").write_bytes(b"")
    p.update(random=str(root / "random.pt"), empty=str(root / "empty.pt"), missing=str(root / "missing.pt"))
    marker = root / "MARKER"
    torch.save({"format": st.CHECKPOINT_FORMAT, "model": Evil(marker), "model_config": {}}, root / "code.pt")
    p["code"] = str(root / "code.pt")
    # A plain torch file: safe to load, but not a checkpoint AstrID wrote.
    torch.save({"weights": torch.zeros(3)}, root / "foreign.pt")
    p["foreign"] = str(root / "foreign.pt")
    # FITS: a good registered pair, and every way a file can be unusable.
    rng = np.random.default_rng(3)
    p["sci"] = write_fits(root / "science.fits", rng.normal(100, 5, (32, 32)))
    p["ref"] = write_fits(root / "reference.fits", rng.normal(100, 5, (32, 32)))
    p["ref_48x32"] = write_fits(root / "reference_48x32.fits", rng.normal(100, 5, (32, 48)))
    p["cube"] = write_fits(root / "cube.fits", rng.normal(100, 5, (3, 32, 32)))
    p["nan"] = write_fits(root / "nan.fits", np.full((32, 32), np.nan))
    p["big_sci"] = write_fits(root / "big_science.fits", rng.normal(100, 5, (64, 64)))
    p["big_ref"] = write_fits(root / "big_reference.fits", rng.normal(100, 5, (64, 64)))
    whole = Path(write_fits(root / "whole.fits", rng.normal(100, 5, (64, 64)))).read_bytes()
    (root / "truncated.fits").write_bytes(whole[: 2880 + 10_000])  # the header and part of the pixels
    (root / "empty.fits").write_bytes(b"")
    p.update(truncated=str(root / "truncated.fits"), empty_fits=str(root / "empty.fits"))
    # Somewhere no directory can be made, even for root: below a regular file.
    (root / "a_file").write_text("not a directory\n")
    p["under_file"] = str(root / "a_file" / "out")
    readonly = root / "readonly"
    readonly.mkdir()
    readonly.chmod(0o500)
    p["readonly"] = str(readonly / "out")
    p["tiny"] = " ".join(["--samples", "12", "--epochs", "2", "--batch-size", "4", "--test-samples", "4", "--image-size", "32", *OFFLINE, "--device", "cpu"])
    p["tiny_energy"] = p["tiny"].replace(" --no-energy", "")
    p["bomb"] = write_lying_fits(root / "bomb.fits")
    # Hostile checkpoints: a lying architecture record, no weights, NaN weights.
    weights = model.state_dict()
    for name, payload in {
        "cfg_unknown": dict(model=weights, model_config={**model.config, "depth": 5}),
        "cfg_negative": dict(model=weights, model_config={**model.config, "width": -4}),
        "cfg_string": dict(model=weights, model_config={**model.config, "width": "4"}),
        "no_model": dict(model_config=model.config, threshold=0.5),
        "nan_weights": dict(model={k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in weights.items()}, model_config=model.config, threshold=0.5),
    }.items():
        p[name] = str(st.save_checkpoint(root / f"{name}.pt", payload))
    # Resumable checkpoints (every key present) whose contents are tampered with.
    resumable = dict(model=weights, model_config=model.config, optimizer={}, scheduler={}, early_stopping={}, epoch=1, step=0,
                     history=[{"epoch": 1}], rng={}, loss_sum=0.0)
    for name, payload in {
        "resume_batch0": dict(resumable, config={**saved_config(width=4), "batch_size": 0}),
        "resume_batch_str": dict(resumable, config={**saved_config(width=4), "batch_size": "4"}),
        "resume_kind_best": dict(resumable, config=saved_config(width=4), kind="best"),
        "resume_inconsistent": dict(resumable, config=saved_config(width=4), history=[{"epoch": e} for e in (1, 2, 3)]),
    }.items():
        (root / name).mkdir()
        p[name] = str(st.save_checkpoint(root / name / "last.pt", payload))
    return Inputs(root, p, marker)


class Refusal(NamedTuple):
    id: str
    command: str  # placeholders {name} are filled from Inputs.paths; {out} is a fresh directory
    says: tuple[str, ...]  # fragments the one line must contain


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present, so --device cuda is not a refusal here")
UNLOCKABLE = pytest.mark.skipif(not PERMISSION_BITS_BIND, reason="this user (root) writes through chmod 0500; "
                                "the 'under a regular file' cases cover unwritable outputs")
PREDICT = "predict --output-dir {out} --device cpu"
EVALUATE = "evaluate --samples 2 --image-size 32 --output-dir {out} --device cpu"

REFUSALS = [
    # Bad values on the command line.
    Refusal("samples-zero", "train {tiny} --samples 0", ("samples must be >= 1",)),
    Refusal("samples-negative", "train {tiny} --samples -3", ("samples must be >= 1", "-3")),
    Refusal("epochs-zero", "train {tiny} --epochs 0", ("epochs must be >= 1",)),
    Refusal("epochs-negative", "train {tiny} --epochs -1", ("epochs must be >= 1",)),
    Refusal("batch-size-zero", "train {tiny} --batch-size 0", ("batch-size must be >= 1",)),
    Refusal("batch-size-negative", "train {tiny} --batch-size -2", ("batch-size must be >= 1",)),
    Refusal("image-size-not-multiple-of-16", "train {tiny} --image-size 40", ("multiple of 16", "40")),
    Refusal("val-fraction-0", "train {tiny} --val-fraction 0", ("val-fraction must lie in (0, 1)",)),
    Refusal("val-fraction-1", "train {tiny} --val-fraction 1", ("val-fraction must lie in (0, 1)",)),
    Refusal("device-unknown", "train {tiny} --device tpu", ("unknown device 'tpu'",)),
    pytest.param(Refusal("device-cuda-absent", "train {tiny} --device cuda", ("--device cuda", "no CUDA GPU")), marks=NO_CUDA),
    Refusal("train-output-under-a-file", "train {tiny} --output-dir {under_file}", ("is not writable",)),
    pytest.param(Refusal("train-output-read-only", "train {tiny} --output-dir {readonly}", ("is not writable",)), marks=UNLOCKABLE),
    # Checkpoints that are missing, unreadable, of another architecture, or carry code.
    Refusal("evaluate-missing-checkpoint", EVALUATE + " --checkpoint {missing}", ("checkpoint not found",)),
    Refusal("evaluate-random-bytes", EVALUATE + " --checkpoint {random}", ("cannot load checkpoint", "random.pt")),
    Refusal("evaluate-empty-checkpoint", EVALUATE + " --checkpoint {empty}", ("cannot load checkpoint", "empty.pt")),
    Refusal("evaluate-other-architecture", EVALUATE + " --checkpoint {arch}", ("different architecture", "(8, 3, 3, 3) vs (16, 3, 3, 3)")),
    Refusal("evaluate-code-in-pickle", EVALUATE + " --checkpoint {code}", ("not a safe AstrID checkpoint",)),
    Refusal("evaluate-foreign-torch-file", EVALUATE + " --checkpoint {foreign}", ("foreign.pt", "is not an AstrID checkpoint")),
    Refusal("predict-code-in-pickle", PREDICT + " --science {sci} --reference {ref} --checkpoint {code}", ("not a safe AstrID checkpoint",)),
    Refusal("predict-other-architecture", PREDICT + " --science {sci} --reference {ref} --checkpoint {arch}", ("different architecture", "(8, 3, 3, 3) vs (16, 3, 3, 3)")),
    Refusal("resume-missing-checkpoint", "train --device cpu --resume {missing}", ("checkpoint not found",)),
    Refusal("resume-random-bytes", "train --device cpu --resume {random}", ("cannot load checkpoint",)),
    Refusal("resume-code-in-pickle", "train --device cpu --resume {code}", ("not a safe AstrID checkpoint",)),
    Refusal("resume-exported-weights", "train --device cpu --resume {exported}", ("cannot be resumed", "optimizer")),
    # FITS that cannot be used, and images above the pixel budget.
    Refusal("fits-empty", PREDICT + " --science {empty_fits} --reference {ref} --checkpoint {ckpt}", ("empty.fits", "empty file")),
    Refusal("fits-truncated", PREDICT + " --science {truncated} --reference {ref} --checkpoint {ckpt}", ("truncated.fits", "truncated")),
    Refusal("fits-3d-cube", PREDICT + " --science {cube} --reference {ref} --checkpoint {ckpt}", ("cube.fits", "(3, 32, 32)", "2-D")),
    Refusal("fits-all-nan", PREDICT + " --science {sci} --reference {nan} --checkpoint {ckpt}", ("nan.fits", "every pixel is NaN")),
    Refusal("fits-shape-mismatch", PREDICT + " --science {sci} --reference {ref_48x32} --checkpoint {ckpt}", ("48x32", "32x32", "differ in shape")),
    Refusal("predict-above-max-pixels", PREDICT + " --science {big_sci} --reference {big_ref} --checkpoint {ckpt} --max-pixels 1000", ("64x64", "pixel budget of 1000")),
    Refusal("predict-output-under-a-file", "predict --output-dir {under_file} --device cpu --science {sci} --reference {ref} --checkpoint {ckpt}", ("cannot create output directory",)),
    pytest.param(Refusal("predict-output-read-only", "predict --output-dir {readonly} --device cpu --science {sci} --reference {ref} --checkpoint {ckpt}", ("cannot create output directory",)), marks=UNLOCKABLE),
    # Memory: configurations that cannot fit are refused before anything is allocated.
    Refusal("train-width-beyond-memory", "train {tiny} --width 512", ("needs about", "GiB of memory", "--width")),
    Refusal("train-image-size-beyond-memory", "train {tiny} --image-size 8192", ("needs about", "GiB of memory", "--image-size")),
    Refusal("evaluate-image-size-beyond-memory", "evaluate --samples 2 --image-size 8192 --output-dir {out} --device cpu --checkpoint {ckpt}", ("needs about", "GiB of memory")),
    Refusal("fits-header-declares-40-gb", PREDICT + " --science {bomb} --reference {ref} --checkpoint {ckpt}", ("bomb.fits", "100000x100000", "pixel budget")),
    Refusal("fits-header-declares-40-gb-with-a-large-budget", PREDICT + " --science {bomb} --reference {ref} --checkpoint {ckpt} --max-pixels 20000000000", ("bomb.fits", "truncated", "100000x100000")),
    # Hostile checkpoint contents.
    Refusal("checkpoint-unknown-model-config-key", EVALUATE + " --checkpoint {cfg_unknown}", ("model_config has unknown keys", "'depth'")),
    Refusal("checkpoint-negative-width", EVALUATE + " --checkpoint {cfg_negative}", ("model_config width must be a positive integer", "-4")),
    Refusal("checkpoint-string-width", PREDICT + " --science {sci} --reference {ref} --checkpoint {cfg_string}", ("model_config width must be a positive integer", "'4'")),
    Refusal("checkpoint-without-model", EVALUATE + " --checkpoint {no_model}", ("holds no model weights",)),
    Refusal("checkpoint-nan-weights-predict", PREDICT + " --science {sci} --reference {ref} --checkpoint {nan_weights}", ("non-finite weights",)),
    Refusal("checkpoint-nan-weights-evaluate", EVALUATE + " --checkpoint {nan_weights}", ("non-finite weights",)),
    Refusal("resume-tampered-batch-size-zero", "train --device cpu --resume {resume_batch0}", ("saved configuration is invalid", "batch-size must be >= 1")),
    Refusal("resume-tampered-batch-size-string", "train --device cpu --resume {resume_batch_str}", ("batch_size = '4'",)),
    Refusal("resume-best-checkpoint", "train --device cpu --resume {resume_kind_best}", ("best epoch's weights", "last.pt")),
    Refusal("resume-history-longer-than-epoch", "train --device cpu --resume {resume_inconsistent}", ("saved at epoch 1", "history holds 3 epochs")),
    # Smaller: values accepted elsewhere, a country without data, more threads than cores.
    Refusal("evaluate-threshold-above-1", EVALUATE + " --checkpoint {ckpt} --threshold 5", ("threshold must lie in (0, 1]", "5")),
    Refusal("train-unknown-country", "train {tiny_energy} --country ZZZ", ("--country 'ZZZ'", "world average")),
    Refusal("train-threads-beyond-cores", "train {tiny} --threads 999", ("--threads 999", "cores")),
]
# Not refusals, run alongside them: the same inputs accepted, and --debug's traceback.
CONTROLS = {
    "predict-valid": PREDICT + " --science {sci} --reference {ref} --checkpoint {ckpt} --flux-ratio 1",  # noise frames: no stars to fit a ratio on
    "evaluate-valid": EVALUATE + " --checkpoint {ckpt}",
    "debug-traceback": "--debug train {tiny} --samples 0",
}


def _refusal(case) -> Refusal:
    return case.values[0] if hasattr(case, "values") else case


def _skipped(case) -> bool:
    return any(m.name == "skipif" and m.args and m.args[0] for m in getattr(case, "marks", ()))


def _cli_in_child(argv: list[str], cwd: str, stdout: str, stderr: str) -> None:
    """`python standalone_training.py ARGV`, in a process forked from one that imported it already.

    multiprocessing's bootstrap plays the interpreter's top level: sys.exit's code becomes the
    exit status, and an uncaught exception prints its traceback to stderr and exits 1.
    """
    torch.set_num_threads(1)  # a child of the fork server, not of pytest: conftest's one_torch_thread never ran here
    os.chdir(cwd)
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.exit(st.main(argv))


class Forked(NamedTuple):
    rc: int | None
    stdout: str
    stderr: str
    name: str = ""


def run_forked(commands: dict[str, list[str]], *, logs: Path, timeout: float) -> dict[str, Forked]:
    """Run CLI commands side by side, each in its own process forked from a preloaded server.

    Each `python standalone_training.py` start spends seconds importing torch, astropy and
    scikit-learn; a fork server pays that once. The training runs above stay true subprocesses.
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["standalone_training", __name__])
    logs.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, argv in commands.items():
        proc = ctx.Process(target=_cli_in_child, args=(argv, str(logs), str(logs / f"{name}.stdout"), str(logs / f"{name}.stderr")), name=name)
        proc.start()
        procs[name] = proc
    deadline = time.monotonic() + timeout
    for proc in procs.values():
        proc.join(max(1.0, deadline - time.monotonic()))
    late = [name for name, proc in procs.items() if proc.is_alive()]
    for name in late:
        procs[name].kill()
        procs[name].join()
    if late:
        pytest.fail(f"still running after {timeout} s: {late}")
    read = lambda name, ext: (logs / f"{name}.{ext}").read_text(errors="replace")  # noqa: E731
    return {name: Forked(proc.exitcode, read(name, "stdout"), read(name, "stderr"), name) for name, proc in procs.items()}


@pytest.fixture(scope="module")
def refusals(inputs) -> dict[str, Forked]:
    """Every refusal and control, side by side."""
    commands = {_refusal(c).id: _refusal(c).command for c in REFUSALS if not _skipped(c)} | CONTROLS
    argv = {name: shlex.split(command.format(**inputs.paths, out=inputs.root / f"out-{name}")) for name, command in commands.items()}
    return run_forked(argv, logs=inputs.root / "logs", timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("case", REFUSALS, ids=lambda c: c.id)
def test_bad_input_is_refused_in_one_line(refusals, case):
    job = refusals[case.id]
    assert job.rc not in (0, None), describe(job)
    assert "Traceback" not in job.stderr, describe(job)
    lines = nonblank_lines(job.stderr)
    assert len(lines) == 1, describe(job)
    assert lines[0].startswith("astrid: error: ")
    for fragment in case.says:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_refusals_are_plain_text(refusals):
    """One line a log file or a CI page shows as it is: no terminal control codes."""
    for case in REFUSALS:
        job = refusals.get(_refusal(case).id)
        if job is not None:
            assert all(ch == "\n" or ch.isprintable() for ch in job.stderr), (job.name, job.stderr)
            assert "weights_only=False" not in job.stderr, "never advise loading a checkpoint unsafely"


@pytest.mark.slow
def test_the_controls_accept_the_same_inputs(refusals, inputs):
    """The refusals are about the bad part alone: the good checkpoint and FITS pair work."""
    for name in ("predict-valid", "evaluate-valid"):
        assert refusals[name].rc == 0, describe(refusals[name])
    assert (inputs.root / "out-predict-valid" / "detections.csv").is_file()
    assert (inputs.root / "out-predict-valid" / "mask.fits").is_file()


@pytest.mark.slow
def test_debug_shows_the_traceback(refusals):
    job = refusals["debug-traceback"]
    assert job.rc not in (0, None)
    assert "Traceback (most recent call last)" in job.stderr
    assert nonblank_lines(job.stderr)[-1].endswith("ConfigError: samples must be >= 1, got 0")
    assert issubclass(st.ConfigError, (st.AstridError, ValueError))


@pytest.mark.slow
def test_a_checkpoint_with_code_in_it_never_runs_the_code(refusals, inputs):
    for name in ("evaluate-code-in-pickle", "predict-code-in-pickle", "resume-code-in-pickle"):
        assert refusals[name].rc not in (0, None)
    assert not inputs.marker.exists(), "weights_only=True must refuse before anything is unpickled"
    # The file really is armed: loaded the unsafe way, it runs its code.
    torch.load(inputs.paths["code"], weights_only=False)
    assert inputs.marker.exists()
    inputs.marker.unlink()
