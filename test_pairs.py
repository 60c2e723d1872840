"""Specification of `predict --pairs`: many pairs, one model, resumable, sharded, in astronomers' formats.

A list of five small pairs, one of them bad (its epochs differ in shape) -> four done and
one reported -> a rerun skips the four -> two shards cover the list once -> each pair's
detections are those of single-pair predict -> detections.ecsv and detections.reg read back
with astropy and regions.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from regions import Regions

import standalone_training as st
from conftest import cli_env

HERE = Path(__file__).resolve().parent
SIZE = 64  # px: one network window per pair
GOOD = ("a", "b", "c", "d")
BAD = "bad"
CRVAL = (150.1, 2.2)  # deg, an arbitrary field


def science_wcs() -> WCS:
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = CRVAL
    wcs.wcs.crpix = [SIZE / 2, SIZE / 2]
    wcs.wcs.cdelt = [-1 / 3600, 1 / 3600]
    return wcs


def write_pair(directory: Path, name: str, seed: int) -> None:
    """Sixteen bright, isolated static stars (the flux fit needs ten) and one bright new source, between them, in the science epoch."""
    rng = np.random.default_rng(seed)
    psf = st.PSF(2.5, st.ASSUMED_MOFFAT_BETA)
    grid = np.arange(11, SIZE - 10, 12.0)
    x, y = (a.ravel() + rng.uniform(-1, 1, a.size) for a in np.meshgrid(grid, grid))
    stars = st.render_points((SIZE, SIZE), x, y, 10 ** rng.uniform(3.5, 4.5, x.size), psf)
    new = st.render_points((SIZE, SIZE), np.array([17.3]), np.array([28.8]), np.array([3000.0]), psf)
    reference = stars + 100 + rng.normal(0, 3, (SIZE, SIZE))
    science = 2.0 * (stars + new) + 50 + rng.normal(0, 6, (SIZE, SIZE))
    fits.PrimaryHDU(reference.astype(np.float32)).writeto(directory / f"{name}_ref.fits")
    fits.PrimaryHDU(science.astype(np.float32), header=science_wcs().to_header()).writeto(directory / f"{name}_sci.fits")


@pytest.fixture(scope="module")
def pair_list(tmp_path_factory) -> Path:
    """pairs.csv: four good pairs and one whose epochs differ in shape, third in the list."""
    directory = tmp_path_factory.mktemp("pairs")
    for seed, name in enumerate(GOOD):
        write_pair(directory, name, seed)
    fits.PrimaryHDU(np.zeros((SIZE, SIZE + 16), np.float32)).writeto(directory / f"{BAD}_ref.fits")
    (directory / f"{BAD}_sci.fits").write_bytes((directory / "a_sci.fits").read_bytes())
    names = ["a", "b", BAD, "c", "d"]
    lines = ["name,science,reference"] + [f"{n},{n}_sci.fits,{n}_ref.fits" for n in names]
    (directory / "pairs.csv").write_text("\n".join(lines) + "\n")
    return directory / "pairs.csv"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "standalone_training.py"), *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300)


def combined(path: Path) -> list[dict]:
    return list(csv.DictReader(path.read_text().splitlines()))


@pytest.fixture(scope="module")
def first_run(pair_list, tmp_path_factory):
    """The whole list through the command line, then the same command again."""
    out = tmp_path_factory.mktemp("out") / "run"
    first = run_cli("predict", "--pairs", str(pair_list), "--output-dir", str(out), cwd=pair_list.parent)
    stamps = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}
    stamps["combined"] = (out / "detections.csv").read_text()
    again = run_cli("predict", "--pairs", str(pair_list), "--output-dir", str(out), cwd=pair_list.parent)
    return out, first, again, stamps


@pytest.mark.slow
def test_a_list_with_one_bad_pair_does_four_and_reports_the_bad_one_in_one_line(first_run):
    out, first, _, _ = first_run
    assert first.returncode == 2, first.stderr
    failed = [line for line in first.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith(f"FAILED  {BAD}: ") and "differ in shape" in failed[0]
    assert "Traceback" not in first.stderr
    assert "4 done, 0 skipped (complete already), 1 failed" in first.stdout
    for name in GOOD:
        assert st.prediction_complete(st.path_inside(out, name))
    assert not st.path_inside(out, BAD).exists()
    rows = combined(out / "detections.csv")
    assert {r["pair"] for r in rows} == set(GOOD)  # each good pair has its new source
    assert list(rows[0])[:2] == ["pair", "directory"] and list(rows[0])[2:] == list(st.DETECTION_COLUMNS)


@pytest.mark.slow
def test_a_rerun_skips_the_complete_pairs_and_rewrites_nothing(first_run):
    out, _, again, stamps = first_run
    assert again.returncode == 2
    assert "0 done, 4 skipped (complete already), 1 failed" in again.stdout
    now = {p.relative_to(out): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}
    assert {**now, "combined": (out / "detections.csv").read_text()} == stamps  # the combined list is rebuilt, the same


def test_two_shards_cover_the_list_exactly_once(pair_list, tmp_path, capsys):
    out = tmp_path / "sharded"
    with pytest.raises(st.AstridError, match="1 of 3 pairs failed"):  # shard 0 takes pairs 0, 2, 4: a, bad, d
        st.run_pairs(pairs=str(pair_list), output_dir=str(out), checkpoint=None, threshold=None, device="cpu", max_pixels=st.DEFAULT_MAX_PIXELS, shard="0/2")
    second = st.run_pairs(pairs=str(pair_list), output_dir=str(out), checkpoint=None, threshold=None, device="cpu", max_pixels=st.DEFAULT_MAX_PIXELS, shard="1/2")
    printed = capsys.readouterr()
    assert "pairs 0/2: 2 done, 0 skipped (complete already), 1 failed" in printed.out and f"FAILED  {BAD}: " in printed.err
    assert second == dict(done=["b", "c"], skipped=[], failed=[])
    pairs_by_shard = [[r["pair"] for r in combined(out / f"detections.shard-{i}-of-2.csv")] for i in range(2)]
    assert sorted(pairs_by_shard[0] + pairs_by_shard[1]) == sorted(GOOD)  # one new source per pair, each pair once
    assert not (out / "detections.csv").exists()


@pytest.mark.parametrize("text, expected", [("0/1", (0, 1)), ("3/4", (3, 4)), (" 1 / 2 ", (1, 2))])
def test_a_shard_is_i_of_n_counted_from_zero(text, expected):
    assert st.parse_shard(text) == expected


@pytest.mark.parametrize("text", ["2/2", "1", "-1/2", "a/b", "1/0", "0/2/3"])
def test_a_bad_shard_is_refused_in_one_line(text):
    with pytest.raises(st.ConfigError, match="give I/N with 0 <= I < N"):
        st.parse_shard(text)


def test_under_torchrun_each_rank_takes_its_shard(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert st.parse_shard(None) == (2, 3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert st.parse_shard(None) == (0, 1)


@pytest.mark.slow
def test_the_detections_of_a_listed_pair_are_those_of_single_pair_predict(first_run, pair_list, tmp_path, capsys):
    out = first_run[0]
    for name in ("a", "c"):
        single = tmp_path / name
        st.run_prediction(science=str(pair_list.parent / f"{name}_sci.fits"), reference=str(pair_list.parent / f"{name}_ref.fits"), reference_survey=None,
                          output_dir=str(single), checkpoint=None, threshold=None, device="cpu", max_pixels=st.DEFAULT_MAX_PIXELS)
        listed = st.path_inside(out, name)
        assert (single / "detections.csv").read_text() == (listed / "detections.csv").read_text()
        assert (single / "detections.reg").read_text() == (listed / "detections.reg").read_text()
        # The catalogues are identical; the probability maps agree to float32 rounding (1e-7),
        # which depends on how many torch threads summed each convolution in that process.
        np.testing.assert_allclose(fits.getdata(single / "mask.fits"), fits.getdata(listed / "mask.fits"), rtol=0, atol=1e-6)
    capsys.readouterr()


@pytest.mark.slow
def test_the_ecsv_catalogue_reads_back_with_units_and_its_provenance(first_run, pair_list):
    directory = st.path_inside(first_run[0], "a")
    table = Table.read(directory / "detections.ecsv", format="ascii.ecsv")
    rows = combined(directory / "detections.csv")
    assert len(table) == len(rows) >= 1
    assert str(table["x"].unit) == "pix" and str(table["ra"].unit) == "deg" and str(table["area_px"].unit) == "pix2"
    np.testing.assert_allclose(table["x"], [float(r["x"]) for r in rows], atol=1e-3)
    np.testing.assert_allclose(table["dec"], [float(r["dec"]) for r in rows], atol=1e-7)
    assert table.meta["flux_ratio"] == pytest.approx(2.0, rel=0.1) and table.meta["flux_ratio_source"] == "fitted on the stars"
    assert table.meta["threshold"] == pytest.approx(float(st.load_checkpoint(st.DEFAULT_WEIGHTS).get("threshold") or 0.5))
    assert table.meta["checkpoint"].endswith("astrid_default.pt")
    assert table.meta["science"].endswith("a_sci.fits") and table.meta["reference"].endswith("a_ref.fits")


@pytest.mark.slow
def test_the_ds9_regions_open_on_the_image_where_the_detections_are(first_run):
    directory = st.path_inside(first_run[0], "a")
    regions = Regions.read(directory / "detections.reg", format="ds9")
    rows = combined(directory / "detections.csv")
    assert len(regions) == len(rows) >= 1
    wcs = science_wcs()
    for region, row in zip(regions, rows):
        pixel = region.to_pixel(wcs)
        assert pixel.center.x == pytest.approx(float(row["x"]), abs=0.01) and pixel.center.y == pytest.approx(float(row["y"]), abs=0.01)
        assert pixel.radius >= 5.0


@pytest.mark.slow
def test_a_pair_list_without_its_columns_is_refused_in_one_line(tmp_path):
    (tmp_path / "pairs.csv").write_text("sci,ref\na.fits,b.fits\n")
    result = run_cli("predict", "--pairs", "pairs.csv", "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "needs the columns science, reference" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("args, says", [
    (["--pairs", "pairs.csv", "--science", "a.fits"], "give exactly one of --science FITS (with --reference) or --pairs CSV"),
    (["--science", "a.fits", "--reference", "b.fits", "--shard", "0/2"], "--shard splits a --pairs list"),
])
def test_conflicting_predict_flags_are_refused_in_one_line(tmp_path, args, says):
    result = run_cli("predict", *args, "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and says in result.stderr
    assert not (tmp_path / "out").exists()
