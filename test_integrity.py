"""Nothing lost, nothing overwritten, nothing crashes: runs, outputs, MLflow and hostile files.

Read top to bottom:

    plots never follow a symlink -> runs never overwrite each other -> a tracker never kills a
    run -> training semantics -> stale temporaries and errors that are bugs -> predict replaces
    its files as one set -> memory.

Hostile checkpoints and the one-line refusals of bad values, unreadable files and budgets are
rows of the refusal table in test_faults.py; resuming from best.pt and the resume warning are
tested on its runs.

Every process here is real: `python standalone_training.py ...` subprocesses, side by side in
one fixture, a real `mlflow server` killed mid-run, and a stub HTTP server on 127.0.0.1 whose
/health answers while MLflow's API fails (HTTP 500) or hangs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import resource
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pytest
from astropy.io import fits

import standalone_training as st
from conftest import cli_env, healthy, kill_group, start_mlflow_server
from test_faults import IS_ROOT, MODULE, OFFLINE, PERMISSION_BITS_BIND, Job, describe, drive, exited, mlflow_client, nonblank_lines, strays, write_lying_fits

# One epoch of 6 train / 2 validation samples of 32x32 px: the smallest run that writes everything.
TINY = ["--samples", "8", "--epochs", "1", "--batch-size", "4", "--test-samples", "4", "--image-size", "32", "--width", "8", "--seed", "7", "--device", "cpu",
        "--no-null-tests"]  # the null battery is not what these runs test (test_null_tests.py is), and it is 10 s of CPU each
# Runs that lose their tracking server mid-run: short epochs, enough of them that the kill lands while they train.
LONG = ["--samples", "24", "--batch-size", "4", "--test-samples", "4", "--image-size", "32", "--width", "8", "--patience", "100", "--seed", "7", "--device", "cpu",
        "--no-null-tests"]
PRECIOUS = b"precious: must never be overwritten\n"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def one_line_error(job) -> str:
    """The single line of a refusal: rc 2, no traceback, the last line says why."""
    assert job.rc == 2, describe(job)
    assert "Traceback" not in job.stderr, describe(job)
    last = nonblank_lines(job.stderr)[-1]
    assert last.startswith("astrid: error: "), describe(job)
    return last


def is_png_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink() and path.read_bytes()[:8] == PNG_SIGNATURE


# ----------------------------------------------------------------------------
# Servers: a real MLflow server, and a stub whose API fails
# ----------------------------------------------------------------------------


class _BrokenApi(BaseHTTPRequestHandler):
    """/health says OK; every MLflow API call fails with HTTP 500, or hangs (server.mode)."""

    def _answer(self) -> None:
        if self.path.rstrip("/").endswith("/health"):
            body, status = b"OK", 200
        elif self.server.mode == "hang":
            self.server.release.wait(120)
            return
        else:
            body, status = b'{"error_code": "INTERNAL_ERROR", "message": "the database is on fire"}', 500
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_DELETE = do_PUT = _answer

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def broken_api(mode: str):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _BrokenApi)
    server.daemon_threads = True
    server.mode, server.release = mode, threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def read_only(directory: Path):
    """`directory` made read-only for real: a read-only bind mount for root, permission bits otherwise."""
    if PERMISSION_BITS_BIND:
        directory.chmod(0o555)
        try:
            yield True
        finally:
            directory.chmod(0o755)
        return
    mounted = IS_ROOT and subprocess.run(["mount", "--bind", str(directory), str(directory)], capture_output=True).returncode == 0
    if mounted and subprocess.run(["mount", "-o", "remount,bind,ro", str(directory)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)


# ----------------------------------------------------------------------------
# Every process of this file, side by side
# ----------------------------------------------------------------------------


class Jobs(NamedTuple):
    jobs: dict[str, Job]
    root: Path
    seen: dict[str, object]  # what the driver recorded between jobs
    read_only_db: bool  # whether a read-only database could be made here


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Jobs:
    """
    - evaluate / evaluate_again: an output dir whose plot names are symlinks to a victim; then the same again.
    - first / second / overwrite: train into one directory (planted symlinks too), again, then --overwrite.
    - twin_a, twin_b, twin_c: three first runs at once in a fresh directory, no --output-dir, default MLflow.
    - same_dir_a, same_dir_b: two runs started together into one --output-dir.
    - server_dies(_optional): a real MLflow server, killed once both runs have a last.pt. The optional
      run starts once the other has one (their starts never race on the fresh server, and a run
      that cannot start is reported), and the other has 300 epochs, so that it is still training
      at the kill however slowly the optional one starts (the kill ends it at its next epoch).
    - api_500(_optional), api_hangs_optional: a server whose /health answers but whose API fails.
    - readonly_db(_optional): a read-only SQLite tracking store.
    - diverges: --lr 1e10.
    """
    root = tmp_path_factory.mktemp("integrity")
    seen: dict[str, object] = {}
    (root / "victim.txt").write_bytes(PRECIOUS)
    # Symlinks where the plots go, pointing out of the output directory.
    (root / "ev").mkdir()
    for name in ("completeness.png", "precision_recall.png", "object_gallery.png"):
        (root / "ev" / name).symlink_to("../victim.txt")
    (root / "twice" / "evaluation").mkdir(parents=True)
    for name in ("loss_curves.png", "predictions.png"):
        (root / "twice" / name).symlink_to("../victim.txt")
    (root / "twice" / "evaluation" / "completeness.png").symlink_to("../../victim.txt")
    # Directories named as the old code named runs, for the next few minutes: a run must never enter one.
    fresh = root / "fresh"
    now = time.time()
    for t in range(-2, 600):
        stamped = fresh / "runs" / time.strftime("%Y%m%d-%H%M%S", time.localtime(now + t))
        stamped.mkdir(parents=True, exist_ok=True)
        (stamped / "sentinel.txt").write_bytes(PRECIOUS)
    # A SQLite store with its schema, then made read-only.
    ro = root / "ro"
    ro.mkdir()
    mlflow_client(f"sqlite:///{ro / 'ro.db'}").search_experiments()

    specs = {
        "evaluate": ["evaluate", "--samples", "4", "--image-size", "32", "--device", "cpu", "--output-dir", "ev", "--no-null-tests", "--no-real-pixels"],
        "first": ["train", *TINY, *OFFLINE, "--output-dir", "twice"],
        # Three steps an epoch: enough for --lr 1e10 to reach NaN within the first epoch.
        "diverges": ["train", *TINY, "--samples", "12", "--epochs", "2", "--lr", "1e10", *OFFLINE, "--output-dir", "diverges"],
        **{f"twin_{k}": ["train", *TINY, "--no-energy"] for k in "abc"},
        **{f"same_dir_{k}": ["train", *TINY, *OFFLINE, "--output-dir", "same_dir"] for k in "ab"},
    }
    cwd = {name: fresh if name.startswith("twin_") else root for name in specs}
    with broken_api("500") as api_500, broken_api("hang") as api_hangs, read_only(ro) as ro_ok, contextlib.ExitStack() as stack:
        specs.update({
            "api_500": ["train", *TINY, "--no-energy", "--tracking-uri", api_500, "--output-dir", "api_500"],
            "api_500_optional": ["train", *TINY, "--no-energy", "--tracking-uri", api_500, "--mlflow-optional", "--output-dir", "api_500_optional"],
            "api_hangs_optional": ["train", *TINY, "--no-energy", "--tracking-uri", api_hangs, "--mlflow-optional", "--timeout", "2", "--output-dir", "api_hangs_optional"],
        })
        if ro_ok:
            uri = f"sqlite:///{ro / 'ro.db'}"
            specs["readonly_db"] = ["train", *TINY, "--no-energy", "--tracking-uri", uri, "--output-dir", "readonly_db"]
            specs["readonly_db_optional"] = ["train", *TINY, "--no-energy", "--tracking-uri", uri, "--mlflow-optional", "--output-dir", "readonly_db_optional"]
        server, server_url = start_mlflow_server(root / "server")
        stack.callback(kill_group, server)
        jobs = {name: Job(name, args, cwd=cwd.get(name, root)) for name, args in specs.items()}
        # The server starts while the others run; the runs that need it start once it answers.
        deadline = time.monotonic() + 180
        while not healthy(server_url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not become healthy:\n{(root / 'server' / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)
        seen["server_url"] = server_url
        server_runs = {name: ["train", *LONG, *extra, "--no-energy", "--tracking-uri", server_url, "--output-dir", name]
                       for name, extra in (("server_dies", ["--epochs", "300"]), ("server_dies_optional", ["--epochs", "10", "--mlflow-optional"]))}
        jobs["server_dies"] = Job("server_dies", server_runs["server_dies"], cwd=root)

        def launch(name: str, args: list[str], before: Callable[[], None] = lambda: None) -> Callable[[Job], None]:
            def action(job: Job) -> None:
                before()
                jobs[name] = Job(name, args, cwd=root)
            return action

        def keep_first_run() -> None:
            seen["first"] = {n: (root / "twice" / n).read_bytes() for n in ("best.pt", "metrics.json", "config.json")}

        def plant_stale_temporary() -> None:
            """What atomic_write leaves when killed mid-write (test_faults.py makes real ones)."""
            seen["second"] = {n: (root / "twice" / n).read_bytes() for n in ("best.pt", "metrics.json", "config.json")}
            (root / "twice" / ".last.pt.k1ll3d_x.tmp").write_bytes(b"half a checkpoint")

        def tracking(name: str) -> bool:
            """A run past its first epoch, or one that ended without reaching it (the test reports it)."""
            return (root / name / "last.pt").exists() or jobs[name].poll()

        def kill_server(job: Job) -> None:
            kill_group(server)
            seen["server killed"] = time.monotonic()

        steps = {
            "evaluate": [(exited, launch("evaluate_again", specs["evaluate"]))],
            "first": [
                (exited, launch("second", specs["first"], keep_first_run)),
                (lambda job: jobs["second"].poll(), launch("overwrite", [*specs["first"], "--overwrite"], plant_stale_temporary)),
            ],
            "server_dies": [
                (lambda job: tracking("server_dies"), launch("server_dies_optional", server_runs["server_dies_optional"])),
                (lambda job: tracking("server_dies_optional"), kill_server),
            ],
        }
        drive(jobs, steps, timeout=600)
        yield Jobs(jobs, root, seen, ro_ok)


# -- Plots never follow a symlink ----------------------------------------------------------


@pytest.mark.slow
def test_evaluate_replaces_a_symlinked_plot_and_never_writes_through_it(runs):
    job, ev = runs.jobs["evaluate"], runs.root / "ev"
    assert job.rc == 0, describe(job)
    assert (runs.root / "victim.txt").read_bytes() == PRECIOUS
    assert is_png_file(ev / "completeness.png")
    assert (ev / "evaluation.json").is_file() and not (ev / "evaluation.json").is_symlink()


@pytest.mark.slow
def test_train_replaces_symlinked_plots_and_never_writes_through_them(runs):
    out = runs.root / "twice"
    assert runs.jobs["first"].rc == 0, describe(runs.jobs["first"])
    assert (runs.root / "victim.txt").read_bytes() == PRECIOUS
    for name in ("loss_curves.png", "predictions.png", "evaluation/completeness.png"):
        assert is_png_file(out / name), name


# -- Runs never overwrite each other ---------------------------------------------------------


@pytest.mark.slow
def test_a_second_run_into_a_used_output_dir_is_refused_and_loses_nothing(runs):
    last = one_line_error(runs.jobs["second"])
    assert "already holds a training run" in last and "--overwrite" in last and "--resume" in last
    assert runs.seen["second"] == runs.seen["first"], "the first run's best.pt, metrics.json and config.json are untouched"


@pytest.mark.slow
def test_overwrite_says_what_it_replaces_and_replaces_it(runs):
    job, out = runs.jobs["overwrite"], runs.root / "twice"
    assert job.rc == 0, describe(job)
    said = [line for line in nonblank_lines(job.stderr) if "--overwrite: replacing" in line]
    assert len(said) == 1 and all(name in said[0] for name in ("best.pt", "metrics.json", "config.json")), describe(job)
    assert json.loads((out / "config.json").read_text())["overwrite"] is True
    assert (out / "best.pt").read_bytes() != runs.seen["first"]["best.pt"]


@pytest.mark.slow
def test_evaluate_twice_into_one_dir_is_refused(runs):
    last = one_line_error(runs.jobs["evaluate_again"])
    assert "ev already holds an evaluation (evaluation.json)" in last and "--overwrite" in last


@pytest.mark.slow
def test_runs_started_together_without_output_dir_never_share_a_directory(runs):
    twins = [runs.jobs[f"twin_{k}"] for k in "abc"]
    for job in twins:
        assert job.rc == 0, describe(job)
    fresh = runs.root / "fresh"
    dirs = [Path(job.stdout.strip().splitlines()[-1].split("outputs: ")[1].split("  |")[0]) for job in twins]
    assert len(set(dirs)) == 3, dirs
    for d in dirs:
        assert (fresh / d / "metrics.json").is_file()
    # The directories named as the old code named them were never entered.
    for stamped in (fresh / "runs").iterdir():
        if stamped not in {fresh / d for d in dirs}:
            assert sorted(p.name for p in stamped.iterdir()) == ["sentinel.txt"], stamped


@pytest.mark.slow
def test_two_runs_started_together_into_one_output_dir_never_mix(runs):
    """One trains; the other is refused in one line, whichever moment it checks the directory."""
    pair = sorted((runs.jobs[f"same_dir_{k}"] for k in "ab"), key=lambda job: job.rc)
    winner, loser = pair
    assert winner.rc == 0, describe(winner)
    last = one_line_error(loser)
    assert "is in use by another run" in last or "already holds a training run" in last, last
    config = json.loads((runs.root / "same_dir" / "config.json").read_text())
    assert config["output_dir"] == "same_dir" and (runs.root / "same_dir" / "metrics.json").is_file()


@pytest.mark.slow
def test_simultaneous_first_runs_each_track_their_own_run_in_one_new_database(runs):
    """Three first runs in a fresh directory: none crashes in the schema migration, each MLflow run holds its own files."""
    fresh = runs.root / "fresh"
    client = mlflow_client(f"sqlite:///{fresh / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("astrid")
    found = client.search_runs([experiment.experiment_id])
    assert len(found) == 3
    for run in found:
        assert run.info.status == "FINISHED"
        out = fresh / "runs" / run.info.run_name
        (runs.root / "downloads" / run.info.run_id).mkdir(parents=True)
        local = Path(client.download_artifacts(run.info.run_id, "metrics.json", str(runs.root / "downloads" / run.info.run_id)))
        assert local.read_bytes() == (out / "metrics.json").read_bytes(), run.info.run_name


# -- A tracker never kills a run -------------------------------------------------------------


@pytest.mark.slow
def test_a_server_that_dies_mid_run_fails_it_in_one_line_after_saving_last_pt(runs):
    job, out = runs.jobs["server_dies"], runs.root / "server_dies"
    assert "server killed" in runs.seen, f"the server was never killed:\n{describe(job)}\n{describe(runs.jobs['server_dies_optional'])}"
    last = one_line_error(job)
    assert last.startswith("astrid: error: MLflow failed at epoch "), last
    assert last.endswith("server_dies/last.pt is saved: resume with --resume server_dies/last.pt"), last
    assert not any(line.startswith("File ") for line in nonblank_lines(job.stderr))
    failed_epoch = int(last.split("MLflow failed at epoch ")[1].split()[0])
    # The epoch whose metrics could not be logged was checkpointed first.
    assert st.load_checkpoint(out / "last.pt")["epoch"] == failed_epoch
    assert not (out / "metrics.json").exists()


@pytest.mark.slow
def test_a_server_that_dies_mid_run_is_survived_with_mlflow_optional(runs):
    job, out = runs.jobs["server_dies_optional"], runs.root / "server_dies_optional"
    assert job.rc == 0, describe(job)
    assert "Traceback" not in job.stderr
    record = json.loads((out / "metrics.json").read_text())["mlflow"]
    assert record["enabled"] is False and record["failed_at"].startswith(("epoch ", "the end of")), record
    assert record["reason_off"].startswith(f"MLflow failed at {record['failed_at']} (")
    assert any("continuing WITHOUT MLflow" in line and record["failed_at"] in line for line in nonblank_lines(job.stderr))
    assert "(incomplete: MLflow failed at" in job.stdout.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["api_500", "readonly_db"])
def test_a_tracker_that_fails_at_start_stops_the_run_in_one_line(runs, name):
    if name == "readonly_db" and not runs.read_only_db:
        pytest.skip("no read-only directory can be made here")
    last = one_line_error(runs.jobs[name])
    assert last.startswith("astrid: error: MLflow failed at start ("), last
    assert "--mlflow-optional" in last
    assert not (runs.root / name / "last.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["api_500_optional", "api_hangs_optional", "readonly_db_optional"])
def test_mlflow_optional_trains_on_whatever_the_tracker_does(runs, name):
    if name == "readonly_db_optional" and not runs.read_only_db:
        pytest.skip("no read-only directory can be made here")
    job = runs.jobs[name]
    assert job.rc == 0, describe(job)
    assert "Traceback" not in job.stderr
    record = json.loads((runs.root / name / "metrics.json").read_text())["mlflow"]
    assert record["enabled"] is False and record["failed_at"] == "start", record
    assert record["reason_off"].startswith("MLflow failed at start (")
    assert any("continuing WITHOUT MLflow" in line for line in nonblank_lines(job.stderr))


@pytest.mark.slow
def test_a_hanging_api_costs_seconds_not_minutes(runs):
    """--timeout 2: the call gives up after a few tries of 2 s, not MLflow's default of 120 s each.

    Timed by the run's own log, from the line just before tracking starts to the warning that it
    failed: the rest of the process's life measures the busy machine, not the tracker.
    """
    job = runs.jobs["api_hangs_optional"]
    lines = nonblank_lines(job.stderr)

    def clock(fragment: str) -> int:
        line = next(line for line in lines if fragment in line)
        h, m, s = (int(part) for part in line.split()[0].split(":"))
        return 3600 * h + 60 * m + s

    waited = (clock("MLflow failed at start") - clock("outputs in ")) % 86400
    assert waited < 60, waited


# -- Training semantics ----------------------------------------------------------------------


@pytest.mark.slow
def test_a_diverging_run_ends_with_the_nan_early_stop_in_one_line(runs):
    job, out = runs.jobs["diverges"], runs.root / "diverges"
    last = one_line_error(job)
    assert "training diverged" in last and "nan" in last and "--lr" in last, last
    assert "Input contains NaN" not in job.stderr
    assert any("early stopping: monitored metric is nan at epoch 1" in line for line in nonblank_lines(job.stderr))
    assert (out / "last.pt").exists() and not (out / "best.pt").exists() and not (out / "metrics.json").exists()


@pytest.mark.slow
def test_resume_restores_the_python_and_numpy_random_states(runs):
    """The states saved in last.pt are the states a resumed trainer continues with."""
    path = runs.root / "twice" / "last.pt"
    saved = st.load_checkpoint(path)["rng"]
    trainer = st.StandaloneTrainer(dataclasses.replace(st.TrainConfig(), resume=str(path), device="cpu"))
    resume = trainer._load_resume()
    trainer.train_ds, trainer.val_ds, trainer.test_ds, _ = st.build_datasets(trainer.cfg)
    trainer._build_model()
    random.seed(0)
    np.random.seed(0)
    trainer._restore(resume)
    assert random.getstate()[1] == tuple(saved["python"])
    state = np.random.get_state()
    assert np.array_equal(state[1], saved["numpy"].numpy().astype(np.uint32)) and state[2] == saved["numpy_pos"]
    expected = (random.random(), np.random.random())
    st.restore_rng(saved)
    assert (random.random(), np.random.random()) == expected


# -- Stale temporaries, and errors that are bugs ---------------------------------------------


@pytest.mark.slow
def test_a_run_removes_temporaries_that_a_killed_write_left(runs):
    job, out = runs.jobs["overwrite"], runs.root / "twice"
    assert job.rc == 0, describe(job)
    assert strays(out) == []
    assert any("removed 1 temporary file(s) left by an interrupted write: .last.pt.k1ll3d_x.tmp" in line for line in nonblank_lines(job.stderr))


def test_a_bug_keeps_its_traceback_and_a_refusal_is_one_line(tmp_path, capsys):
    """cli() turns the project's refusals and OS errors into one line and exit status 2; any other
    exception is a bug and leaves cli() as it was raised, for the interpreter to print its traceback."""
    with pytest.raises(ValueError, match="invalid literal for int"):
        st.cli(lambda: int("not a number"), debug=False)
    assert capsys.readouterr().err == ""
    assert st.cli(lambda: st.check_image_size(40), debug=False) == 2
    assert nonblank_lines(capsys.readouterr().err) == ["astrid: error: image-size must be a multiple of 16 and >= 32, got 40"]
    assert st.cli(lambda: (tmp_path / "nowhere" / "file").read_text(), debug=False) == 2
    (line,) = nonblank_lines(capsys.readouterr().err)
    assert line.startswith("astrid: error: [Errno 2] No such file or directory"), line


# ----------------------------------------------------------------------------
# predict replaces its three files as one set
# ----------------------------------------------------------------------------


def _predict(args: list[str], *, cwd: Path, file_size_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return subprocess.run([sys.executable, str(MODULE), "predict", "--device", "cpu", *args], cwd=cwd, env=cli_env(), capture_output=True,
                          text=True, timeout=300, preexec_fn=limit if file_size_limit else None)


@pytest.mark.slow
def test_a_failed_predict_leaves_the_previous_set_whole(tmp_path):
    rng = np.random.default_rng(5)
    for name in ("science", "reference"):
        fits.PrimaryHDU(rng.normal(100, 5, (32, 32))).writeto(tmp_path / f"{name}.fits")
    # Noise frames have no stars to fit a flux ratio on: the ratio is given.
    pair = ["--science", str(tmp_path / "science.fits"), "--reference", str(tmp_path / "reference.fits"), "--output-dir", "out", "--flux-ratio", "1"]
    first = _predict([*pair, "--threshold", "0.9"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    files = ("detections.csv", "mask.fits", "overlay.png")
    before = {n: (tmp_path / "out" / n).read_bytes() for n in files}
    # The overlay is by far the largest file: a size limit between the others' and its own makes
    # the last of the three writes fail, as a full disk would.
    assert max(len(before["detections.csv"]), len(before["mask.fits"])) < 20_000 < len(before["overlay.png"])
    failed = _predict([*pair, "--threshold", "0.5", "--overwrite"], cwd=tmp_path, file_size_limit=20_000)
    assert failed.returncode == 2, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr
    assert nonblank_lines(failed.stderr)[-1].startswith("astrid: error: ") and "File too large" in failed.stderr
    assert {n: (tmp_path / "out" / n).read_bytes() for n in files} == before, "no file of the previous set was replaced"
    assert strays(tmp_path / "out") == []
    # Without --overwrite the set is not touched at all; with it, the whole set is replaced.
    refused = _predict([*pair, "--threshold", "0.5"], cwd=tmp_path)
    assert refused.returncode == 2 and "already holds a prediction" in nonblank_lines(refused.stderr)[-1]
    assert {n: (tmp_path / "out" / n).read_bytes() for n in files} == before
    replaced = _predict([*pair, "--threshold", "0.5", "--overwrite"], cwd=tmp_path)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert fits.getheader(tmp_path / "out" / "mask.fits")["THRESH"] == 0.5


# ----------------------------------------------------------------------------
# A FITS header that lies about its size
# ----------------------------------------------------------------------------


def test_a_header_declaring_40_gb_in_a_14_kb_file_allocates_nothing(tmp_path):
    """In-process; the CLI's refusals of the same file are rows of test_faults.py's table."""
    path = Path(write_lying_fits(tmp_path / "bomb.fits"))
    assert path.stat().st_size < 15_000
    with pytest.raises(st.DataError, match="truncated .*100000x100000"):
        st.read_fits_image(path)
    with pytest.raises(st.DataError, match="pixel budget of 1000000"):
        st.read_fits_image(path, max_pixels=10**6)


def test_the_memory_estimate_grows_with_the_configuration_and_a_tiny_run_fits():
    tiny = st.TrainConfig(samples=8, batch_size=4, test_samples=4, image_size=32, width=8)
    small = st.training_memory(tiny)
    assert small["model"] == 16 * st.count_parameters(st.StandaloneUNet(width=8))
    st.check_memory(small)  # fits: it is what the runs above trained
    for change in (dict(width=16), dict(image_size=64), dict(batch_size=8), dict(samples=16)):
        bigger = st.training_memory(dataclasses.replace(tiny, **change))
        assert sum(bigger.values()) > sum(small.values()), change
    with pytest.raises(st.AstridError, match="needs about"):
        st.check_memory({"data": 2**62})
