"""Hostile inputs, second round: nothing silently wrong.

Each case is the CLI run on the exact input, in a real process: the many short ones forked
side by side from a server that imported the module once (test_faults.run_forked), the ones
that need a signal or a sequence as true subprocesses. Five kinds of case:

- inputs that once gave a wrong answer with exit 0 now give the right one: both transients of
  a small static sky found beside a 1e30 pixel, beside a reference that is mostly zeros
  outside its footprint, through a gzipped FITS, a Galactic WCS or a broken one;
- inputs that once raised a traceback are refused in one line;
- resumes compare what they resume (checkpoint, threshold, input files, shard layout);
- writes never destroy (export onto a run's checkpoint, compare --overwrite);
- signals end a `--pairs` run and a training run's final evaluation with a message.

The sky: 128x128 px, 40 static stars (FWHM 3 px) and independent noise per epoch; the science
epoch adds two point sources of matched-filter SNR about 60 and 40 in the difference.
"""

from __future__ import annotations

import gzip
import json
import math
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

import standalone_training as st
from conftest import cli_env
from test_faults import describe, nonblank_lines, run_forked

HERE = Path(__file__).resolve().parent
MODULE = HERE / "standalone_training.py"
SIZE = 128
TRANSIENTS = ((80.3, 90.7, 3000.0), (100.2, 30.4, 2000.0))  # x, y, flux (e-)
BAD_PIXEL = (20, 20)  # row, column: far from both transients
FOOTPRINT_EDGE = 60  # columns left of this are exact zeros in the footprint case's reference
TINY = "--samples 12 --epochs 1 --batch-size 4 --test-samples 2 --image-size 32 --width 4 --seed 7 --device cpu --threads 1"


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

def gaussian_sources(sources, *, size: int = SIZE, fwhm: float = 3.0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    s = fwhm / 2.3548
    image = np.zeros((size, size))
    for x, y, flux in sources:
        image += flux / (2 * np.pi * s**2) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s**2))
    return image


def static_sky(seed: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    stars = []
    while len(stars) < 40:
        x, y = rng.uniform(6, SIZE - 6, 2)
        if all(np.hypot(x - tx, y - ty) > 12 for tx, ty, _ in TRANSIENTS):
            stars.append((x, y, float(rng.uniform(3e3, 6e4))))
    return 200.0 + gaussian_sources(stars)


def header(*, frame: str = "icrs", crval1: float = 150.0) -> fits.Header:
    ctype = ("GLON-TAN", "GLAT-TAN") if frame == "galactic" else ("RA---TAN", "DEC--TAN")
    cards = [("CTYPE1", ctype[0]), ("CTYPE2", ctype[1]), ("CRPIX1", SIZE / 2), ("CRPIX2", SIZE / 2),
             ("CRVAL1", crval1), ("CRVAL2", 2.0), ("CDELT1", -1 / 3600), ("CDELT2", 1 / 3600), ("CUNIT1", "deg"), ("CUNIT2", "deg")]
    return fits.Header(cards)


def write(path: Path, data: np.ndarray, hdr: fits.Header | None = None) -> str:
    fits.PrimaryHDU(data, header=hdr).writeto(path, overwrite=True)
    return str(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def paths(root) -> Iterator[dict[str, str]]:
    """Every input file, made once."""
    p: dict[str, str] = {"root": str(root)}
    sky = static_sky()
    rng = np.random.default_rng(11)
    reference = sky + rng.normal(0, 5.0, sky.shape)
    science = sky + gaussian_sources(TRANSIENTS) + rng.normal(0, 5.0, sky.shape)
    p["ref"], p["sci"] = write(root / "ref.fits", reference, header()), write(root / "sci.fits", science, header())
    for value, name in ((1e30, "sci_1e30"), (1e20, "sci_1e20")):
        bad = science.copy()
        bad[BAD_PIXEL] = value
        p[name] = write(root / f"{name}.fits", bad, header())
    zeroed = reference.copy()
    zeroed[:, :FOOTPRINT_EDGE] = 0.0  # what resampling tools write outside a frame's footprint
    p["ref_zero"] = write(root / "ref_zero.fits", zeroed, header())
    with gzip.open(root / "sci.fits.gz", "wb") as f:
        f.write(Path(p["sci"]).read_bytes())
    p["sci_gz"] = str(root / "sci.fits.gz")
    p["ref_gal"], p["sci_gal"] = write(root / "ref_gal.fits", reference, header(frame="galactic")), write(root / "sci_gal.fits", science, header(frame="galactic"))
    p["ref_wild"], p["sci_wild"] = write(root / "ref_wild.fits", reference, header(crval1=1e300)), write(root / "sci_wild.fits", science, header(crval1=1e300))
    sip = header()
    sip["CTYPE1"], sip["CTYPE2"] = "RA---TAN-SIP", "DEC--TAN-SIP"
    sip["A_ORDER"], sip["B_ORDER"], sip["A_2_0"], sip["B_0_2"] = 2, 2, 1e10, 0.0  # a distortion that maps no pixel back onto itself
    p["ref_sip"], p["sci_sip"] = write(root / "ref_sip.fits", reference, sip), write(root / "sci_sip.fits", science, sip)
    p["ref_huge"], p["sci_huge"] = write(root / "ref_huge.fits", reference * 1e300), write(root / "sci_huge.fits", science * 1e300)
    # References whose WCS does not describe their pixels: 20 px off (the stars fix it), rotated 30 deg or at 2x scale (they cannot).
    off = header()
    off["CRVAL1"] += 20 / 3600 / np.cos(np.radians(2.0))
    p["ref_off20"] = write(root / "ref_off20.fits", reference, off)
    turned = header()
    c, s_ = np.cos(np.radians(30)), np.sin(np.radians(30))
    turned["PC1_1"], turned["PC1_2"], turned["PC2_1"], turned["PC2_2"] = c, -s_, s_, c
    p["ref_rot30"] = write(root / "ref_rot30.fits", reference, turned)
    doubled = header()
    doubled["CDELT1"], doubled["CDELT2"] = 2 * doubled["CDELT1"], 2 * doubled["CDELT2"]
    p["ref_scale2"] = write(root / "ref_scale2.fits", reference, doubled)
    p["ref_1deg"] = write(root / "ref_1deg.fits", reference, header(crval1=151.0))  # another field: a degree east
    # A RICE-compressed frame whose tiles are overwritten with garbage after the header.
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(science.astype(np.float32), compression_type="RICE_1")]).writeto(root / "rice.fits.fz")
    raw = bytearray((root / "rice.fits.fz").read_bytes())
    raw[2 * 2880 + 6000:2 * 2880 + 9000] = np.random.default_rng(2).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    (root / "rice_corrupt.fits.fz").write_bytes(bytes(raw))
    p["rice_corrupt"] = str(root / "rice_corrupt.fits.fz")
    # Checkpoints: finite weights x 1e30, and a 1 GiB tensor deflated into a few MB.
    model = st.StandaloneUNet(width=4)
    scaled = {k: v * 1e30 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    p["ckpt_1e30"] = str(st.save_checkpoint(root / "scaled.pt", dict(model=scaled, model_config=model.config, threshold=0.5)))
    good = st.save_checkpoint(root / "good.pt", dict(model=model.state_dict(), model_config=model.config, threshold=0.5))
    p["ckpt"] = str(good)
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(root / "bomb.pt", "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info.filename))
        prefix = src.namelist()[0].split("/")[0]
        with dst.open(zipfile.ZipInfo(f"{prefix}/data/bomb"), "w", force_zip64=True) as f:
            chunk = bytes(2**24)
            for _ in range(64):  # 1 GiB of zeros
                f.write(chunk)
    p["ckpt_bomb"] = str(root / "bomb.pt")
    # A training run's directory, whose last.pt must survive `export --output` onto it.
    run = root / "a_run"
    run.mkdir()
    (run / "config.json").write_text("{}\n")
    (run / "last.pt").write_bytes(good.read_bytes())
    p["run_last"] = str(run / "last.pt")
    # Sweep spaces, each wrong in one way.
    spaces = {
        "low_above_high": {"lr": {"type": "float", "low": 0.01, "high": 0.001}},
        "empty_choices": {"width": {"type": "categorical", "choices": []}},
        "weight_decay_negative": {"weight_decay": {"type": "float", "low": -0.1, "high": 0.1}},
        "default_outside": {"width": {"type": "categorical", "choices": [4, 8], "default": 16}},
        "log_from_zero": {"lr": {"type": "float", "low": 0.0, "high": 0.01, "log": True}},
        "string_bounds": {"lr": {"type": "float", "low": "0.001", "high": "0.01"}},
        "negative_loss_weight": {"bce_weight": {"type": "float", "low": -1.0, "high": 1.0}},
        "good": {"lr": {"type": "float", "low": 0.001, "high": 0.01, "log": True}},
    }
    for name, space in spaces.items():
        (root / f"space_{name}.json").write_text(json.dumps(space))
        p[f"space_{name}"] = str(root / f"space_{name}.json")
    import optuna

    study = optuna.create_study(study_name="changed", storage=f"sqlite:///{root / 'study.db'}")
    study.set_user_attr("space", {"lr": {"type": "float", "low": 0.002, "high": 0.02, "log": True}})
    p["study_db"] = f"sqlite:///{root / 'study.db'}"
    # Storage that cannot be written: a study opened read-only (root writes through chmod, SQLite's
    # read-only mode does not), and a database another process holds an exclusive lock on for
    # as long as this module's tests run.
    optuna.create_study(study_name="ro", storage=f"sqlite:///{root / 'ro.db'}")
    p["study_db_read_only"] = f"sqlite:///file:{root / 'ro.db'}?mode=ro&uri=true"
    locker = sqlite3.connect(root / "locked.db", isolation_level=None)
    locker.execute("CREATE TABLE held (x)")
    locker.execute("BEGIN EXCLUSIVE")
    p["study_db_locked"] = f"sqlite:///{root / 'locked.db'}"
    # A pair list with a 200 KB field, and a comparison that must survive a refused --overwrite.
    (root / "pairs_big.csv").write_text("science,reference,name\n" + f"sci.fits,ref.fits,{'x' * 200_000}\n")
    p["pairs_big"] = str(root / "pairs_big.csv")
    # Forced photometry at both transients (by RA/Dec through the WCS) and at a blank place (by pixel).
    wcs = WCS(header())
    sky_positions = [st.pixel_to_icrs(wcs, x, y) for x, y, _ in TRANSIENTS]
    (root / "positions_sky.csv").write_text("ra,dec\n" + "".join(f"{ra:.8f},{dec:.8f}\n" for ra, dec in sky_positions))
    p["positions_sky"] = str(root / "positions_sky.csv")
    (root / "cmp").mkdir()
    (root / "cmp" / "comparison.json").write_text('{"kept": true}\n')
    p["cmp"] = str(root / "cmp")
    yield p
    locker.close()  # the lock is held until every test of the module has run


# ----------------------------------------------------------------------------
# Forked side by side: right answers and one-line refusals
# ----------------------------------------------------------------------------

PREDICT = "predict --device cpu --output-dir {out}"
ANSWERS = {  # exit 0, both transients found, and nothing else where nothing changed
    "pixel-1e30": PREDICT + " --science {sci_1e30} --reference {ref}",
    "pixel-1e20": PREDICT + " --science {sci_1e20} --reference {ref}",
    "zero-footprint": PREDICT + " --science {sci} --reference {ref_zero} --flux-ratio 1",
    "gzip": PREDICT + " --science {sci_gz} --reference {ref}",
    "galactic-wcs": PREDICT + " --science {sci_gal} --reference {ref_gal}",
    "wild-crval": PREDICT + " --science {sci_wild} --reference {ref_wild}",
    "wild-sip": PREDICT + " --science {sci_sip} --reference {ref_sip}",
    "forced-positions": PREDICT + " --science {sci} --reference {ref} --positions {positions_sky}",
    "wcs-off-by-20-px": PREDICT + " --science {sci} --reference {ref_off20}",
}
REFUSALS = {  # id: (command, fragments of the one line)
    "rice-corrupt-tiles": (PREDICT + " --science {rice_corrupt} --reference {ref}", ("rice_corrupt.fits.fz", "not a readable FITS file")),
    "wcs-rotated-30-deg": (PREDICT + " --science {sci} --reference {ref_rot30}", ("the epochs cannot be registered", "stars coincide")),
    "wcs-one-degree-away": (PREDICT + " --science {sci} --reference {ref_1deg}", ("does not overlap the science frame on the sky",)),
    "wcs-at-2x-scale": (PREDICT + " --science {sci} --reference {ref_scale2}", ("the epochs cannot be registered",)),
    "float64-at-1e300": (PREDICT + " --science {sci_huge} --reference {ref_huge}", ("no usable pixel", "1e+20")),
    "weights-times-1e30": (PREDICT + " --science {sci} --reference {ref} --checkpoint {ckpt_1e30}", ("finite but broken",)),
    "checkpoint-deflated-1gib": (PREDICT + " --science {sci} --reference {ref} --checkpoint {ckpt_bomb}", ("unpacks to 1.0 GiB",)),
    "train-lr-nan": (f"train {TINY} --no-mlflow --no-energy --lr nan --output-dir {{out}}", ("lr must be a finite number", "nan")),
    "train-seed-negative": (f"train {TINY} --no-mlflow --no-energy --seed -1 --output-dir {{out}}", ("seed must be an integer in [0, 4294967295]", "-1")),
    "train-seed-above-2-32": (f"train {TINY} --no-mlflow --no-energy --seed 8589934592 --output-dir {{out}}", ("seed must be an integer",)),
    "evaluate-seed-negative": ("evaluate --samples 2 --image-size 32 --device cpu --seed -5 --output-dir {out}", ("seed must be an integer", "-5")),
    **{f"space-{name.replace('_', '-')}": (f"sweep {TINY} --no-mlflow --space {{space_{name}}} --storage sqlite:///{{out}}.db", says) for name, says in {
        "low_above_high": ("lr: low 0.01 is above high 0.001",),
        "empty_choices": ("width: choices must be a non-empty list",),
        "weight_decay_negative": ("weight_decay = -0.1 would make an invalid run", "weight-decay must be >= 0"),
        "default_outside": ("width: default 16 is not one of the choices",),
        "log_from_zero": ("lr: a log range needs low > 0",),
        "string_bounds": ("lr: low and high must be finite numbers", "'0.001'"),
        "negative_loss_weight": ("bce_weight = -1.0 would make an invalid run", "bce-weight must be >= 0"),
    }.items()},
    "space-changed-on-a-study": (f"sweep {TINY} --no-mlflow --space {{space_good}} --study-name changed --storage {{study_db}}", ("searched over another space", "lr")),
    "storage-garbage-url": (f"sweep {TINY} --no-mlflow --space {{space_good}} --storage garbage://", ("cannot open the Optuna study",)),
    "storage-read-only": (f"sweep {TINY} --no-mlflow --space {{space_good}} --study-name ro --storage {{study_db_read_only}}",
                          ("cannot open the Optuna study 'ro'", "attempt to write a readonly database")),
    "storage-locked": (f"sweep {TINY} --no-mlflow --space {{space_good}} --storage {{study_db_locked}}", ("cannot open the Optuna study", "database is locked")),
    "storage-missing-directory": (f"sweep {TINY} --no-mlflow --space {{space_good}} --storage sqlite:///{{root}}/no/such/dir/s.db", ("cannot open the Optuna study",)),
    "pairs-200kb-field": ("predict --device cpu --pairs {pairs_big} --output-dir {out}", ("not a readable CSV pair list",)),
    "compare-one-run-three-times": ("compare --device cpu --no-mlflow --no-energy --runs a={ckpt} a={ckpt} a={ckpt} --output-dir {out}", ("the same model as --runs a=",)),
    "export-onto-a-runs-last-pt": ("export --checkpoint {ckpt_1e30} --output {run_last}", ("refusing to write onto a run's checkpoint",)),
    "export-types-seed-negative": ("export --checkpoint {ckpt_1e30} --fit-types 40 --types-seed -3 --output {out}.pt", ("--types-seed must be an integer", "-3")),
    "compare-overwrite-checks-first": ("compare --device cpu --no-mlflow --no-energy --overwrite --runs a={root}/missing --output-dir {cmp}", ("no best.pt",)),
}


@pytest.fixture(scope="module")
def forked(root, paths) -> dict:
    commands = {name: command for name, command in ANSWERS.items()} | {name: command for name, (command, _) in REFUSALS.items()}
    argv = {name: shlex.split(command.format(**paths, out=root / f"out-{name}")) for name, command in commands.items()}
    return run_forked(argv, logs=root / "logs", timeout=600)


def found_transients(directory: Path) -> list[dict]:
    rows = list(Table.read(directory / "detections.ecsv"))
    return [r for r in rows if min(np.hypot(r["x"] - x, r["y"] - y) for x, y, _ in TRANSIENTS) <= 2.0]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(ANSWERS))
def test_a_hostile_input_still_gives_the_right_answer(forked, root, case):
    job = forked[case]
    assert job.rc == 0, describe(job)
    out = root / f"out-{case}"
    rows = list(Table.read(out / "detections.ecsv"))
    hits = found_transients(out)
    assert len(hits) == 2, f"{case}: {len(hits)} of 2 transients among {len(rows)} detections"
    assert len(rows) == 2, f"{case}: {len(rows) - 2} detections where nothing changed"


@pytest.mark.slow
def test_a_wcs_the_stars_correct_is_registered_by_them_with_a_warning(forked, root):
    record = json.loads((root / "out-wcs-off-by-20-px" / "detections.json").read_text())
    assert record["registration"]["wcs_disagreement_px"] == pytest.approx(20, abs=0.5)
    assert any("the WCSs and the stars disagree" in w for w in record["warnings"])


@pytest.mark.slow
def test_predict_positions_writes_forced_photometry_at_each_place(forked, root):
    rows = list(Table.read(root / "out-forced-positions" / "forced.csv", format="ascii.csv"))
    assert len(rows) == len(TRANSIENTS)
    for row, (x, y, flux) in zip(rows, TRANSIENTS):
        assert math.hypot(row["x"] - x, row["y"] - y) < 0.05  # RA/Dec went through the science WCS
        assert row["significance"] > 30 and row["flux"] == pytest.approx(flux, rel=0.2) and row["score"] > 0.5


@pytest.mark.slow
def test_bad_pixels_and_zero_footprints_become_masked_data(forked, root):
    masked = {case: json.loads((root / f"out-{case}" / "detections.json").read_text())["masked_fraction"] for case in ("pixel-1e30", "zero-footprint", "gzip")}
    assert 0 < masked["pixel-1e30"] < 0.001  # one pixel of 16384
    assert masked["zero-footprint"] == pytest.approx(FOOTPRINT_EDGE / SIZE, abs=0.01)
    assert masked["gzip"] == 0


@pytest.mark.slow
def test_any_celestial_frame_gives_icrs_coordinates_and_a_broken_wcs_gives_pixels(forked, root):
    galactic = root / "out-galactic-wcs"
    record = json.loads((galactic / "detections.json").read_text())
    assert record["celestial_frame"] == "galactic" and "ICRS" in record["coordinates"]
    table = Table.read(galactic / "detections.ecsv")
    centre = st.pixel_to_icrs(WCS(header(frame="galactic")), float(table["x"][0]), float(table["y"][0]))
    assert float(table["ra"][0]) == pytest.approx(centre[0], abs=1e-6) and float(table["dec"][0]) == pytest.approx(centre[1], abs=1e-6)
    assert "\nicrs\n" in (galactic / "detections.reg").read_text()
    for case in ("wild-crval", "wild-sip"):
        wild = root / f"out-{case}"
        assert Table.read(wild / "detections.ecsv")["ra"].mask.all(), case
        assert "\nimage\n" in (wild / "detections.reg").read_text(), case
        assert "its celestial WCS is unusable" in forked[case].stderr, case


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_hostile_input_is_refused_in_one_line(forked, case):
    job = forked[case]
    assert job.rc not in (0, None), describe(job)
    assert "Traceback" not in job.stderr, describe(job)
    lines = [line for line in nonblank_lines(job.stderr) if line.startswith("astrid: error: ")]
    assert len(lines) == 1, describe(job)
    for fragment in REFUSALS[case][1]:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_refused_writes_destroy_nothing(forked, paths):
    assert Path(paths["run_last"]).read_bytes() == Path(paths["ckpt"]).read_bytes()  # export refused before writing
    assert json.loads((Path(paths["cmp"]) / "comparison.json").read_text()) == {"kept": True}  # the old report stays


# ----------------------------------------------------------------------------
# Resumes that compare what they resume
# ----------------------------------------------------------------------------

def one(root: Path, name: str, command: str, paths: dict) -> object:
    """One CLI command in a forked process, waited for."""
    return run_forked({name: shlex.split(command.format(**paths))}, logs=root / "seq", timeout=300)[name]


@pytest.mark.slow
def test_a_pairs_rerun_redoes_only_what_changed(root, paths):
    listing = root / "pairs.csv"
    listing.write_text("science,reference,name\nsci.fits,ref.fits,a\nsci_gal.fits,ref_gal.fits,b\n")
    base = "predict --device cpu --pairs {root}/pairs.csv --output-dir {root}/night"
    first = one(root, "first", base, paths)
    assert first.rc == 0, describe(first)
    again = one(root, "again", base, paths)
    assert again.rc == 0 and "0 done, 2 skipped" in again.stdout, describe(again)
    other = one(root, "other-threshold", base + " --threshold 0.6", paths)
    assert other.rc != 0 and other.stderr.count("another threshold") == 2, describe(other)
    Path(paths["sci"]).touch()  # the same name, another file
    time.sleep(0.01)
    changed = one(root, "changed-science", base, paths)
    assert changed.rc != 0 and "a science file that has changed since" in changed.stderr and "1 skipped" in changed.stdout, describe(changed)
    redo = one(root, "overwrite", base + " --overwrite", paths)
    assert redo.rc == 0 and "2 done" in redo.stdout, describe(redo)
    # Re-split into another shard layout in the same directory: refused, so no two layouts mix.
    split = base.replace("/night", "/split")
    halves = [one(root, f"shard-{i}-of-2", split + f" --shard {i}/2", paths) for i in (0, 1)]
    assert all(h.rc == 0 for h in halves), [describe(h) for h in halves]
    thirds = one(root, "shard-0-of-3", split + " --shard 0/3", paths)
    assert thirds.rc != 0 and "another layout" in thirds.stderr, describe(thirds)
    unsharded = one(root, "unsharded-into-night", base, paths)  # and the whole list's catalogue beside shards: refused too
    assert unsharded.rc == 0, describe(unsharded)
    assert one(root, "shard-into-whole", base + " --shard 1/2", paths).rc != 0
    # A single-pair prediction's directory is not a pair list's.
    single = one(root, "single", "predict --device cpu --science {sci} --reference {ref} --output-dir {root}/single", paths)
    assert single.rc == 0, describe(single)
    mixed = one(root, "pairs-into-single", "predict --device cpu --pairs {root}/pairs.csv --output-dir {root}/single", paths)
    assert mixed.rc != 0 and "single-pair prediction" in mixed.stderr, describe(mixed)
    assert json.loads((root / "single" / "detections.json").read_text())["n_detections"] == 2


# ----------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------

def wait_for(condition, *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_ends_a_pairs_run_with_its_catalogue_and_no_temporaries(root, paths):
    listing = root / "many.csv"
    listing.write_text("science,reference,name\n" + "".join(f"sci.fits,ref.fits,p{k}\n" for k in range(20)))
    out = root / "many"
    proc = subprocess.Popen([sys.executable, str(MODULE), "predict", "--device", "cpu", "--pairs", str(listing), "--output-dir", str(out)],
                            cwd=root, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (st.path_inside(out, "p0") / "detections.csv").is_file() or proc.poll() is not None, timeout=240, what="the first pair")
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "interrupted with" in stderr and "a rerun of the same command does the rest" in stderr
    rows = (out / "detections.csv").read_text().splitlines()
    done = [d for d in out.iterdir() if d.is_dir() and st.prediction_complete(d)]
    assert len(rows) - 1 == 2 * len(done) and 1 <= len(done) < 20
    assert not list(out.rglob("*.tmp"))


def test_a_signal_just_after_a_pair_is_written_still_counts_that_pair(root, paths, monkeypatch):
    """A signal that lands between a pair's last file and its count (what the SIGTERM test above can
    hit by chance) leaves a whole set on disk: the pair is finished, and the combined catalogue holds it."""
    listing = root / "window.csv"
    listing.write_text("science,reference,name\n" + "".join(f"sci.fits,ref.fits,w{k}\n" for k in range(3)))
    predict_pair = st.predict_pair

    def then_a_signal(*args, **kwargs):
        predict_pair(*args, **kwargs)
        raise KeyboardInterrupt  # what run_pairs' SIGTERM handler raises, here just after the set is written

    monkeypatch.setattr(st, "predict_pair", then_a_signal)
    out = root / "window"
    with pytest.raises(st.TrainingInterrupted, match="holds the 1 finished"):
        st.run_pairs(pairs=str(listing), output_dir=str(out), checkpoint=None, threshold=None, device="cpu",
                     max_pixels=st.DEFAULT_MAX_PIXELS)
    done = [d for d in out.iterdir() if d.is_dir() and st.prediction_complete(d)]
    own = (done[0] / "detections.csv").read_text().splitlines()[1:] if len(done) == 1 else []
    combined = (out / "detections.csv").read_text().splitlines()[1:]
    assert len(done) == 1 and own and [row.split(",", 2)[2] for row in combined] == own
    assert all(row.startswith(f"w0,{done[0].name},") for row in combined)


@pytest.mark.slow
def test_sigterm_during_the_final_evaluation_stops_the_run_as_killed(root):
    import mlflow

    uri = f"sqlite:///{root / 'mlflow-sigterm.db'}"
    out = root / "sigterm-run"
    proc = subprocess.Popen([sys.executable, str(MODULE), "train", *TINY.split(), "--no-energy", "--tracking-uri", uri, "--output-dir", str(out)],
                            cwd=root, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if "end of training:" in line:
                proc.send_signal(signal.SIGTERM)
                break
        _, rest = proc.communicate(timeout=180)
    finally:
        proc.kill()
    stderr = "".join(seen) + rest
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted by SIGTERM before" in stderr and "best.pt and last.pt are saved" in stderr
    assert (out / "best.pt").is_file() and not (out / "metrics.json").exists()
    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("astrid").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"]
