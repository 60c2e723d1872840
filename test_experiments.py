"""Experiments: the Optuna sweep, the synthetic-versus-real comparison, the SExtractor baseline
and the intervals drawn wherever completeness is.

Every run here is tiny (32 px, a few samples, one epoch): the tests check what is recorded
and where, not how well anything learns.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import standalone_training as st
from conftest import cli_env

HERE = Path(__file__).resolve().parent
TINY = ["--samples", "12", "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--test-samples", "2",
        "--threads", "1", "--no-energy", "--device", "cpu", "--no-null-tests"]  # each trial's null battery: 10 s of CPU that no test here reads
SPACE = {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True, "default": 3e-3},
         "width": {"type": "categorical", "choices": [4, 8], "default": 4}}


# ----------------------------------------------------------------------------
# Intervals
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("count, total", [(8, 20), (1, 20), (19, 20), (50, 100)])
def test_wilson_interval_matches_the_hand_computed_formula(count, total):
    z = 1.959963984540054  # the 97.5% point of the standard normal
    p = count / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z / (1 + z * z / total) * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    assert st.wilson_interval(count, total) == pytest.approx((centre - half, centre + half), rel=1e-9)


def test_wilson_interval_of_8_in_20_by_hand():
    # (0.4 + 1.9208/20) / 1.19208 -+ 1.95996/1.19208 * sqrt(0.012 + 0.0024010) by hand: 0.2188 and 0.6134.
    low, high = st.wilson_interval(8, 20)
    assert (round(low, 4), round(high, 4)) == (0.2188, 0.6134)


def test_wilson_interval_is_honest_at_the_edges():
    assert st.wilson_interval(0, 20)[0] == 0.0 and st.wilson_interval(0, 20)[1] > 0.1
    assert st.wilson_interval(20, 20)[1] == pytest.approx(1.0) and st.wilson_interval(20, 20)[0] < 0.9
    assert all(math.isnan(v) for v in st.wilson_interval(0, 0))


def test_bootstrap_interval_brackets_the_crossing_and_repeats():
    rng = np.random.default_rng(0)
    snr = np.exp(rng.uniform(np.log(3), np.log(100), 400))
    recovered = rng.random(400) < 1 / (1 + (6.0 / snr) ** 4)  # 50% at SNR 6
    edges = st.DEFAULT_SNR_EDGES
    centres, curve, _ = st.completeness_curve(snr, recovered, bins=edges)
    point = st.snr_at_completeness(centres, curve, 0.5)
    first = st.bootstrap_snr_at_completeness(snr, recovered, bins=edges, level=0.5, rng=np.random.default_rng(1))
    again = st.bootstrap_snr_at_completeness(snr, recovered, bins=edges, level=0.5, rng=np.random.default_rng(1))
    assert first == again
    assert first[0] < point < first[1] and first[1] - first[0] < 3


def test_summaries_carry_intervals():
    truth = [{"type": "transient", "x": 10.0, "y": 10.0, "snr": 8.0}, {"type": "transient", "x": 30.0, "y": 30.0, "snr": 20.0}]
    summary = st.summarise_objects([st.match_objects([{"x": 10.0, "y": 10.0}], truth)], [truth])
    overall = summary["completeness"]["overall"]
    assert overall["value"] == 0.5 and overall["interval"] == pytest.approx(list(st.wilson_interval(1, 2)))
    curve = summary["completeness_by_snr"]["overall"]
    assert len(curve["low"]) == len(curve["high"]) == len(curve["completeness"])
    assert len(summary["snr50_interval"]["overall"]) == 2


# ----------------------------------------------------------------------------
# SExtractor baseline
# ----------------------------------------------------------------------------

def test_sep_finds_both_signs_and_nothing_on_blank_noise():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:96, :96]
    image = rng.normal(0, 1, (96, 96))
    image += 40 * np.exp(-((xx - 30) ** 2 + (yy - 40) ** 2) / (2 * 1.5**2))
    image -= 40 * np.exp(-((xx - 70) ** 2 + (yy - 60) ** 2) / (2 * 1.5**2))
    found = st.sep_detections(image)
    signs = {d["sign"] for d in found if math.hypot(d["x"] - 30, d["y"] - 40) < 2 or math.hypot(d["x"] - 70, d["y"] - 60) < 2}
    assert signs == {1.0, -1.0}
    assert st.sep_detections(np.zeros((64, 64))) == []


# ----------------------------------------------------------------------------
# Sweep
# ----------------------------------------------------------------------------

def _sweep_args(root: Path, trials: int) -> list[str]:
    return ["sweep", *TINY, "--space", str(root / "space.json"), "--trials", str(trials), "--storage", f"sqlite:///{root / 'sweeps.db'}",
            "--study-name", "tiny", "--sweep-dir", str(root / "trials"), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "--experiment", "sweep-test"]


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    (root / "space.json").write_text(json.dumps(SPACE))
    assert st.main(_sweep_args(root, 2)) == 0
    return root


def _study(root: Path):
    import optuna

    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{root / 'sweeps.db'}")


def _children(root: Path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sweep-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "astrid.sweep" in r.data.tags]
    return client, parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


@pytest.mark.slow
def test_tiny_sweep_creates_an_optuna_study_and_nested_mlflow_runs(tiny_sweep):
    study = _study(tiny_sweep)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.trials[0].params == {"lr": 3e-3, "width": 4}  # the space's defaults come first
    client, parents, children = _children(tiny_sweep)
    assert len(parents) == 1 and study.user_attrs["mlflow_parent_run_id"] == parents[0].info.run_id
    assert len(children) == 2 and {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}
    artifacts = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"sweep.json", "optimization_history.png", "best_params.json"} <= artifacts


@pytest.mark.slow
def test_every_trial_is_an_ordinary_run_directory(tiny_sweep, tmp_path):
    trial = tiny_sweep / "trials" / "trial-0001"
    assert {"config.json", "best.pt", "metrics.json"} <= {p.name for p in trial.iterdir()}
    result = st.run_evaluation(checkpoint=str(trial / "best.pt"), samples=2, image_size=32, output_dir=str(tmp_path / "ev"), device="cpu", null_tests=False, real_pixels=False)
    assert result["n_images"] == 2 and "sextractor" in result


@pytest.mark.slow
def test_a_second_process_joins_the_same_study(tiny_sweep):
    """Two worker processes share the study through its storage: trials are numbered once, counted once."""
    command = [sys.executable, str(HERE / "standalone_training.py"), *_sweep_args(tiny_sweep, 4)]
    workers = [subprocess.Popen(command, cwd=tiny_sweep, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], outputs
    study = _study(tiny_sweep)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    # Each worker checks the count before it starts a trial: while another's trial runs, one more may start.
    assert 4 <= len(finished) <= 5 and sorted(t.number for t in study.trials) == list(range(len(study.trials)))
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert all(f"MLflow parent run: {parent}" in out for out in outputs)  # one parent, whoever came first
    pids = {str(w.pid) for w in workers}
    assert {t.user_attrs["worker"].split(":")[-1] for t in finished[2:]} <= pids
    _, _, children = _children(tiny_sweep)
    # A finished trial's run ended FINISHED, a pruned one's KILLED (tagged "pruned").
    assert sorted(c.info.status for c in children) == sorted("FINISHED" if t.state.name == "COMPLETE" else "KILLED" for t in finished)


@pytest.mark.slow
def test_a_pruned_run_ends_cleanly_and_keeps_its_best_weights(tmp_path):
    def prune(epoch, row):
        raise st.TrainingPruned(f"pruned after epoch {epoch}")

    cfg = st.dataclasses.replace(st.TrainConfig(), samples=12, image_size=32, epochs=2, batch_size=4, test_samples=2, width=4, threads=1,
                                 energy=False, device="cpu", output_dir=str(tmp_path / "run"), tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    trainer = st.StandaloneTrainer(cfg, on_epoch_end=prune)
    with pytest.raises(st.TrainingPruned):
        trainer.fit()
    assert (tmp_path / "run" / "best.pt").is_file()
    import mlflow

    run = mlflow.MlflowClient(cfg.tracking_uri).get_run(trainer.tracker.run_id)
    assert run.info.status == "KILLED" and run.data.tags["pruned"] == "pruned after epoch 1"


def test_a_flag_the_space_sweeps_fixes_that_parameter_and_says_so(tmp_path, capsys, caplog):
    """The user's flag wins: the space drops the parameter with a note; a space left empty is refused."""
    (tmp_path / "space.json").write_text(json.dumps({"samples": {"type": "int", "low": 200, "high": 400, "step": 100}}))
    args = ["sweep", "--samples", "32", "--space", str(tmp_path / "space.json"), "--storage", f"sqlite:///{tmp_path / 's.db'}", "--no-mlflow"]
    assert st.main(args) == 2
    err = capsys.readouterr().err
    assert "--samples 32 was given, so the space no longer sweeps samples" in caplog.text
    assert "every parameter of the sweep space" in err and "nothing is left to search" in err
    assert not (tmp_path / "s.db").exists()  # refused before the study was opened


def test_a_bad_space_is_one_line(tmp_path, capsys):
    (tmp_path / "space.json").write_text(json.dumps({"epochs": {"type": "int", "low": 1, "high": 3}}))
    assert st.main(["sweep", "--space", str(tmp_path / "space.json"), "--storage", f"sqlite:///{tmp_path / 's.db'}", "--no-mlflow"]) == 2
    assert "'epochs' cannot be swept" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Compare
# ----------------------------------------------------------------------------

@pytest.mark.slow
def test_compare_on_two_tiny_runs_writes_both_files(tiny_sweep, tmp_path, capsys):
    trials = tiny_sweep / "trials"
    client, _, children = _children(tiny_sweep)
    # Trial 1's MLflow run: its best.pt artifact is fetched. (Other tests of this module add
    # trials to the same study, so the run is found by its output directory.)
    logged = next(r.info.run_id for r in children if r.data.params.get("output_dir", "").endswith("trial-0001"))
    # A third model for arm a: trial 0's weights, nudged (the same model twice is one seed, and refused).
    payload = st.load_checkpoint(trials / "trial-0000" / "best.pt")
    payload["model"] = {k: v + 1e-3 if v.is_floating_point() else v for k, v in payload["model"].items()}
    (tmp_path / "other").mkdir()
    st.save_checkpoint(tmp_path / "other" / "best.pt", payload)
    common = ["--eval-samples", "2", "--eval-image-size", "32", "--device", "cpu", "--threads", "1", "--tracking-uri", f"sqlite:///{tiny_sweep / 'mlflow.db'}"]
    assert st.main(["compare", "--runs", f"a={trials / 'trial-0001'}", f"b=mlflow:{logged}", *common, "--output-dir", str(tmp_path / "dup")]) == 2
    assert "the same model as --runs a=" in capsys.readouterr().err
    args = ["compare", "--runs", f"a={tmp_path / 'other'}", f"b={trials / 'trial-0000'}", f"b=mlflow:{logged}", *common, "--output-dir", str(tmp_path / "cmp")]
    assert st.main(args) == 0
    report = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert set(report["arms"]) == {"a", "b"} and len(report["runs"]["b"]) == 2  # one label, one arm: its runs are its seeds
    spread = report["arms"]["b"]["synthetic_test"]["network"]["completeness"]
    assert spread["n"] + spread["missing"] == 2
    for arm in report["arms"].values():
        pooled = arm["heldout_real"]["network"]["completeness"]["pooled"]
        assert pooled["interval"] == pytest.approx(list(st.wilson_interval(pooled["count"], pooled["total"])), nan_ok=True)
    text = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| network: a |" in text and "SExtractor" in text and "held-out real" in text
    assert (tmp_path / "cmp" / "comparison.png").is_file()
    # Its MLflow parent run holds the report and each arm's pooled completeness.
    parent = client.get_run(report["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["arms"] == "given runs"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == set(st.COMPARISON_OUTPUTS)
    pooled = report["arms"]["b"]["heldout_real"]["network"]["completeness"]["pooled"]["value"]
    assert pooled is not None and parent.data.metrics.get("b_heldout_real_completeness") == pooled
    capsys.readouterr()
    assert st.main(args) == 2  # the output-directory rule: a comparison is never overwritten unasked
    assert "already holds a comparison" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_nests_the_runs_it_trains_under_one_parent_run(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["compare", *TINY, "--arms", "synthetic", "--seeds", "1", "--seed", "5", "--eval-samples", "2", "--eval-image-size", "32",
            "--tracking-uri", uri, "--experiment", "cmp", "--output-dir", str(tmp_path / "cmp")]
    assert st.main(args) == 0
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("cmp").experiment_id])
    parents = [r for r in runs if "astrid.compare" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name.startswith("compare-cmp-"), [r.info.run_name for r in runs]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert [r.info.run_name for r in children] == ["synthetic-seed5"] and children[0].info.status == "FINISHED"
    assert parents[0].info.status == "FINISHED" and "synthetic_synthetic_test_completeness" in parents[0].data.metrics


@pytest.mark.slow
def test_ctrl_c_ends_the_running_trial_and_a_rerun_continues_the_study(tmp_path):
    import signal

    (tmp_path / "space.json").write_text(json.dumps(SPACE))
    args = _sweep_args(tmp_path, 1)
    args[args.index("--epochs") + 1] = "30"
    command = [sys.executable, str(HERE / "standalone_training.py"), *args, "--patience", "30", "--no-mlflow"]
    worker = subprocess.Popen(command, cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in worker.stderr:
        if "epoch   1/30" in line:
            worker.send_signal(signal.SIGINT)
            break
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 130, err
    study = _study(tmp_path)
    assert [t.state.name for t in study.trials] == ["FAIL"]
    assert (tmp_path / "trials" / "trial-0000" / "last.pt").is_file()
    args[args.index("--epochs") + 1] = "1"
    assert st.main([*args, "--no-mlflow"]) == 0
    assert [t.state.name for t in _study(tmp_path).trials] == ["FAIL", "COMPLETE"]
