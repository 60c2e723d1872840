"""Specification of standalone_training.py, read top to bottom like the module.

synthetic sky -> normalisation -> datasets -> gallery -> model -> loss -> pixel metrics
-> early stopping -> object-level evaluation -> the runner's modes -> training runs (real
subprocesses, real MLflow) -> the walkthrough.

Expensive work is shared: one quick training run (with MLflow and CodeCarbon) serves the
end-to-end, checkpoint and evaluation tests; the reproducibility runs run side by side in one
fixture. The CLI's refusals of bad input are the table in test_faults.py.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from scipy import stats

import run_standalone_training as runner
import standalone_training as st
from conftest import cli_env, healthy, kill_group, start_mlflow_server
from standalone_training import (
    ANOMALY_TYPES,
    BOGUS_TYPES,
    DEFAULT_SNR_EDGES,
    PSF,
    SkyConfig,
    SyntheticAstronomicalDataset,
    baseline_detections,
    choose_threshold,
    completeness_curve,
    find_components,
    match_objects,
    matched_filter_snr_map,
    plot_completeness,
    plot_object_gallery,
    plot_precision_recall,
    snr_at_completeness,
    summarise_objects,
)

HERE = Path(__file__).resolve().parent
MODULE = HERE / "standalone_training.py"
RUNNER = HERE / "run_standalone_training.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------
# Helpers: subprocesses and photometry
# ----------------------------------------------------------------------------


class Result(NamedTuple):
    rc: int
    stdout: str
    stderr: str
    seconds: float
    cwd: Path


def launch(script: Path, *args: str, cwd: Path) -> tuple[subprocess.Popen, float, Path]:
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, str(script), *args], cwd=cwd, env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return proc, time.perf_counter(), cwd


def finish(started: tuple[subprocess.Popen, float, Path], *, timeout: float = 420) -> Result:
    proc, t0, cwd = started
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{proc.args} did not finish within {timeout} s; stderr tail:\n{err[-2000:]}")
    return Result(proc.returncode, out, err, time.perf_counter() - t0, cwd)


def run_cli(script: Path, *args: str, cwd: Path, timeout: float = 420) -> Result:
    return finish(launch(script, *args, cwd=cwd), timeout=timeout)


def run_many(jobs: dict[str, tuple[Path, list[str], Path]], *, timeout: float = 420) -> dict[str, Result]:
    """Start every job at once, then wait for all: independent runs share the CPUs."""
    started = {name: launch(script, *args, cwd=cwd) for name, (script, args, cwd) in jobs.items()}
    return {name: finish(s, timeout=timeout) for name, s in started.items()}


def sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path}"


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def parse_outputs_line(line: str) -> tuple[str, str]:
    """The runner's last line: 'outputs: DIR  |  MLflow run: ID'."""
    match = re.fullmatch(r"outputs: (.+?)\s+\|\s+MLflow run: (.+)", line.strip())
    assert match, f"last stdout line does not name the outputs and the MLflow run: {line!r}"
    return match.group(1), match.group(2)


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def point_profile(shape, x, y, psf: PSF) -> np.ndarray:
    """Unit-flux PSF image of a point at (x, y)."""
    return st.render_points(shape, [x], [y], [1.0], psf)


def trail_profile(shape, obj: dict, psf: PSF) -> np.ndarray:
    """Unit-flux trailed PSF of an asteroid's segment, from the module's building blocks."""
    tx, ty = st.trail_points(obj["x1"], obj["y1"], obj["x2"], obj["y2"])
    return st.render_points(shape, tx, ty, np.full(len(tx), 1.0 / len(tx)), psf)


def optimal_flux(image: np.ndarray, profile: np.ndarray, variance) -> tuple[float, float]:
    """Inverse-variance weighted matched-filter flux and its standard error."""
    variance = np.broadcast_to(np.asarray(variance, dtype=float), profile.shape)
    weight = np.sum(profile**2 / variance)
    return float(np.sum(profile * image / variance) / weight), float(1.0 / math.sqrt(weight))


def distance_to_object(px: float, py: float, obj: dict) -> float:
    """Distance from a point to an anomaly: its position, or its trail segment."""
    if obj["type"] != "asteroid":
        return math.hypot(px - obj["x"], py - obj["y"])
    a, b, p = np.array([obj["x1"], obj["y1"]]), np.array([obj["x2"], obj["y2"]]), np.array([px, py])
    d = b - a
    t = 0.0 if not d.any() else float(np.clip(np.dot(p - a, d) / np.dot(d, d), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * d)))


def rounded(v: float) -> int:
    return int(math.floor(v + 0.5))


# ----------------------------------------------------------------------------
# Synthetic sky: contract, determinism, masks, SNR, anomaly physics
# ----------------------------------------------------------------------------


def test_sample_contract():
    """ds[i] is (inputs [3,H,W] float32, labels [2,H,W] float32: the mask in {0,1}, then the type 1-4 where it is 1); truth and raw agree."""
    size = 64
    ds = SyntheticAstronomicalDataset(6, image_size=size, seed=5)
    assert len(ds) == 6
    for i in range(len(ds)):
        inputs, labels = ds[i]
        mask, kinds = labels[:1], labels[1]
        assert inputs.dtype == torch.float32 and tuple(inputs.shape) == (3, size, size)
        assert labels.dtype == torch.float32 and tuple(labels.shape) == (2, size, size)
        assert torch.isfinite(inputs).all()
        assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
        assert bool(((kinds > 0) == (mask[0] > 0)).all())  # every changed pixel has a type, and only those
        present = {ANOMALY_TYPES.index(o["type"]) + 1 for o in ds.truth(i) if o["type"] in ANOMALY_TYPES}
        assert set(torch.unique(kinds).tolist()) - {0.0} <= present

        truth = ds.truth(i)
        for obj in truth:
            assert obj["type"] in ANOMALY_TYPES + BOGUS_TYPES
            assert 0 <= obj["x"] < size and 0 <= obj["y"] < size, obj
            assert math.isfinite(obj["snr"]) and obj["snr"] > 0, obj
            if obj["type"] == "asteroid":
                assert {"x1", "y1", "x2", "y2"} <= set(obj)
        has_anomaly = any(o["type"] in ANOMALY_TYPES for o in truth)
        assert bool(mask.sum() > 0) == has_anomaly  # fields without anomalies have empty masks

        raw = ds.raw(i)
        for image in (raw.reference, raw.science):
            assert image.shape == (size, size) and np.issubdtype(image.dtype, np.floating)
            # In electrons: the background is the sky level, 300-3000 e- per pixel.
            assert 250 < np.median(image) < 3500
        assert 0 < raw.fwhm_reference <= raw.fwhm_science  # the reference is sharper
        # One normalisation everywhere: the network input is normalize_pair of the raw pair,
        # on one photometric scale and matched to the simulator's own seeing.
        statistics = st.pair_statistics(raw.reference, raw.science, fwhm_reference=raw.fwhm_reference, fwhm_science=raw.fwhm_science)
        np.testing.assert_array_equal(inputs.numpy(), st.normalize_pair(raw.reference, raw.science, statistics=statistics))


def test_sample_depends_only_on_seed_and_index():
    """Same (seed, i) gives identical tensors and truth; another seed gives another sky."""
    a = SyntheticAstronomicalDataset(5, image_size=64, seed=13)
    b = SyntheticAstronomicalDataset(5, image_size=64, seed=13)
    other = SyntheticAstronomicalDataset(5, image_size=64, seed=14)
    for i in (3, 0, 4):  # out of order: nothing depends on which sample was drawn first
        assert torch.equal(a[i][0], b[i][0]) and torch.equal(a[i][1], b[i][1])
        assert a.truth(i) == b.truth(i)
        assert not torch.equal(a[i][0], other[i][0])
    assert torch.equal(a[-1][0], a[4][0])
    with pytest.raises(IndexError):
        a[5]


def test_test_stream_is_a_different_sky():
    """The test stream never repeats a training sample for the same seed."""
    train = SyntheticAstronomicalDataset(3, image_size=64, seed=13)
    test = SyntheticAstronomicalDataset(3, image_size=64, seed=13, stream="test")
    assert all(not torch.equal(train[i][0], test[i][0]) for i in range(3))


def test_dataloader_workers_and_cache_agree_with_direct_indexing():
    """Two DataLoader workers, and cache=False, give the same tensors as direct indexing."""
    n = 6
    direct = SyntheticAstronomicalDataset(n, image_size=64, seed=21)
    uncached = SyntheticAstronomicalDataset(n, image_size=64, seed=21, cache=False)
    loader = torch.utils.data.DataLoader(SyntheticAstronomicalDataset(n, image_size=64, seed=21), batch_size=2, num_workers=2)
    batches = list(loader)
    inputs = torch.cat([x for x, _ in batches])
    masks = torch.cat([m for _, m in batches])
    for i in range(n):
        assert torch.equal(inputs[i], direct[i][0]) and torch.equal(masks[i], direct[i][1])
        assert torch.equal(uncached[i][0], direct[i][0]) and torch.equal(uncached[i][1], direct[i][1])


def test_mask_covers_every_anomaly_and_no_isolated_bogus():
    """mask == 1 on each anomaly (and along each trail); mask == 0 on bogus far from anomalies.

    Many samples, so that every anomaly type and every bogus type occurs.
    """
    ds = SyntheticAstronomicalDataset(40, image_size=64, seed=3)
    seen, isolated_bogus = set(), 0
    for i in range(len(ds)):
        mask = ds[i][1][0].numpy()
        truth = ds.truth(i)
        fwhm = ds.raw(i).fwhm_science
        anomalies = [o for o in truth if o["type"] in ANOMALY_TYPES]
        for obj in truth:
            seen.add(obj["type"])
            if obj["type"] == "asteroid":
                for px, py in ((obj["x1"], obj["y1"]), ((obj["x1"] + obj["x2"]) / 2, (obj["y1"] + obj["y2"]) / 2), (obj["x2"], obj["y2"])):
                    assert mask[rounded(py), rounded(px)] == 1, (i, obj)
            elif obj["type"] in ANOMALY_TYPES:
                assert mask[rounded(obj["y"]), rounded(obj["x"])] == 1, (i, obj)
            elif all(distance_to_object(obj["x"], obj["y"], a) > fwhm + 2 for a in anomalies):
                isolated_bogus += 1
                assert mask[rounded(obj["y"]), rounded(obj["x"])] == 0, (i, obj)
    assert seen >= set(ANOMALY_TYPES) | set(BOGUS_TYPES), f"types never drawn: {set(ANOMALY_TYPES + BOGUS_TYPES) - seen}"
    assert isolated_bogus >= 20


def test_difference_channel_is_bright_where_the_mask_says():
    """Inputs and mask are registered: bright transients stand out in the difference channel
    at their truth position (x = column, y = row)."""
    ds = SyntheticAstronomicalDataset(30, image_size=64, seed=8, snr_range=(40.0, 100.0))
    checked = 0
    for i in range(len(ds)):
        inputs, mask = ds[i]
        for obj in ds.truth(i):
            if obj["type"] == "transient":
                row, col = rounded(obj["y"]), rounded(obj["x"])
                assert mask[0, row, col] == 1
                assert inputs[2, row, col] > math.asinh(5.0), (i, obj)  # > 5 sigma in the difference
                checked += 1
    assert checked >= 5


@pytest.mark.parametrize("snr", [5.0, 10.0, 30.0])
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["brighter", "fainter"])
def test_injected_snr_is_the_measured_matched_filter_snr(snr, sign):
    """flux_for_snr gives a flux change whose optimal SNR, measured on many noisy differences
    with the true variance (including its own shot noise), averages to the requested SNR."""
    sample = st.simulate_sky(np.random.default_rng(1), image_size=64, sky=SkyConfig())
    base = sample.variance.astype(np.float64)  # true variance of science - reference
    profile = point_profile(base.shape, 31.3, 30.6, sample.psf_science)
    assert profile.sum() == pytest.approx(1.0, abs=1e-9)  # pixel-integrated, unit flux

    flux = st.flux_for_snr(snr, profile, base, sign=sign)
    assert np.sign(flux) == sign
    variance = base + flux * profile
    assert st.matched_filter_snr(flux, profile, variance) == pytest.approx(snr, rel=1e-3)

    rng = np.random.default_rng(int(snr * 10) + (sign > 0))
    draws = flux * profile + rng.normal(size=(300, *base.shape)) * np.sqrt(variance)
    weight = np.sum(profile**2 / variance)
    flux_hat = np.einsum("ij,nij->n", profile / variance, draws) / weight
    snr_hat = sign * flux_hat * math.sqrt(weight)
    assert snr_hat.mean() == pytest.approx(snr, rel=0.10)
    assert 0.85 < snr_hat.std() < 1.15  # the SNR is in units of the estimator's noise


def test_truth_snr_is_the_requested_snr_in_the_simulator():
    """With snr_range pinned at 20, every anomaly's truth SNR is within a few % of 20
    (later injections add shot noise to earlier ones, so it can only drift slightly)."""
    ds = SyntheticAstronomicalDataset(30, image_size=64, seed=3, snr_range=(20.0, 20.0001))
    snrs = {}
    for i in range(len(ds)):
        for obj in ds.truth(i):
            if obj["type"] in ANOMALY_TYPES:
                snrs.setdefault(obj["type"], []).append(obj["snr"])
    assert set(snrs) == set(ANOMALY_TYPES)
    for kind, values in snrs.items():
        assert np.all(np.abs(np.array(values) / 20.0 - 1) < 0.05), (kind, min(values), max(values))


def test_every_truth_row_carries_the_keys_of_its_type():
    """Truth rows hold type, x, y and snr, plus their type's own keys; no placement parameter leaks in."""
    own = {"variable_star": {"reference_flux", "flux"}, "supernova": {"host_x", "host_y", "flux"}, "asteroid": {"x1", "y1", "x2", "y2", "flux"},
           "transient": {"flux"}, "cosmic_ray": {"epoch", "n_pixels"}, "hot_pixel": {"shape"}, "dipole": {"source"}}
    allowed = set(st.Truth.__annotations__)
    seen = set()
    ds = SyntheticAstronomicalDataset(40, image_size=64, seed=5)
    for i in range(len(ds)):
        for row in ds.truth(i):
            assert {"type", "x", "y", "snr"} | own[row["type"]] <= set(row) <= allowed, row
            seen.add(row["type"])
    assert seen == set(own)


def test_placing_an_unknown_anomaly_type_is_refused():
    """A misspelt kind raises, rather than silently becoming an asteroid."""
    with pytest.raises(ValueError, match="unknown anomaly type 'comet'"):
        st._place_anomaly(np.random.default_rng(0), "comet", size=64, shift=(0.0, 0.0), stars=(np.zeros(0), np.zeros(0), np.zeros(0)),
                          galaxies=[], variable_candidates=[], hosts_left=[], sky=st.SkyConfig())


# A sky with nothing that leaves a residual of its own: perfect registration, identical seeing
# and no detector bogus, so the difference image is the anomalies plus noise.
CLEAN_SKY = dict(registration_error=0.0, seeing_ratio=(1.0, 1.0), moffat_beta=(3.5, 3.5), cosmic_rays_per_field=0.0, hot_pixels_per_field=0.0)


def test_simulated_noise_matches_the_declared_variance():
    """On real simulated pairs, transients injected at SNR 20 are measured at SNR 20 +- 1:
    the Poisson + read noise of both epochs (the reference a coadd) is what SkySample.variance says."""
    sky = SkyConfig(anomaly_mix=(1.0, 0.0, 0.0, 0.0), empty_fraction=0.0, snr_range=(20.0, 20.0001), **CLEAN_SKY)
    measured = []
    for i in range(25):
        s = st.simulate_sky(np.random.default_rng([99, i]), image_size=64, sky=sky)
        difference = s.science.astype(np.float64) - s.reference
        for obj in s.truth:
            flux_hat, err = optimal_flux(difference, point_profile(difference.shape, obj["x"], obj["y"], s.psf_science), s.variance)
            measured.append(flux_hat / err)
    measured = np.array(measured)
    assert len(measured) >= 30
    assert measured.mean() == pytest.approx(20.0, rel=0.10)
    assert 0.7 < measured.std() < 1.4


def test_variable_stars_are_stars_whose_flux_changed():
    """A variable star is present in the reference, and science - reference at it is a
    significant change of the sign of truth['flux']."""
    sky = SkyConfig(anomaly_mix=(0.0, 1.0, 0.0, 0.0), empty_fraction=0.0, star_density=(0.002, 0.004), star_flux=(1e4, 3e4), snr_range=(20.0, 30.0), **CLEAN_SKY)
    checked = 0
    for i in range(12):
        s = st.simulate_sky(np.random.default_rng([31, i]), image_size=64, sky=sky)
        shape = s.reference.shape
        bg_ref, sigma_ref = st.robust_background(s.reference)
        difference = s.science.astype(np.float64) - s.reference
        for obj in s.truth:
            if obj["type"] != "variable_star":
                continue
            ref_profile = point_profile(shape, obj["x"], obj["y"], s.psf_reference)
            ref_flux, _ = optimal_flux(s.reference - bg_ref, ref_profile, 1.0)
            ref_err = sigma_ref / math.sqrt(np.sum(ref_profile**2))
            assert ref_flux > 0.5 * obj["reference_flux"] and ref_flux > 10 * ref_err, obj

            change, err = optimal_flux(difference, point_profile(shape, obj["x"], obj["y"], s.psf_science), s.variance)
            assert np.sign(change) == np.sign(obj["flux"]), obj
            assert abs(change) > 10 * err
            assert abs(change - obj["flux"]) < 5 * err, (change, obj)
            checked += 1
    assert checked >= 10


def test_asteroid_trails_appear_only_in_the_science_image():
    """Along a trail the reference is background within its noise; the science is far above."""
    sky = SkyConfig(anomaly_mix=(0.0, 0.0, 0.0, 1.0), empty_fraction=0.0, anomalies_per_field=1.0, star_density=(1e-5, 2e-5), galaxy_density=(0.0, 0.0), snr_range=(20.0, 30.0), cosmic_rays_per_field=0.0, hot_pixels_per_field=0.0)
    checked = 0
    for i in range(15):
        s = st.simulate_sky(np.random.default_rng([47, i]), image_size=64, sky=sky)
        (bg_ref, sigma_ref), (bg_sci, sigma_sci) = st.robust_background(s.reference), st.robust_background(s.science)
        trails = [o for o in s.truth if o["type"] == "asteroid"]
        for obj in trails:
            profile = trail_profile(s.science.shape, obj, s.psf_science)
            norm = math.sqrt(np.sum(profile**2))
            ref_flux, _ = optimal_flux(s.reference - bg_ref, profile, 1.0)
            sci_flux, _ = optimal_flux(s.science - bg_sci, profile, 1.0)
            assert abs(ref_flux) < 4 * sigma_ref / norm, obj
            assert sci_flux > 10 * sigma_sci / norm, obj
            if len(trails) == 1:
                change, err = optimal_flux(s.science.astype(np.float64) - s.reference, profile, s.variance)
                assert abs(change - obj["flux"]) < 5 * err
            checked += 1
    assert checked >= 12


def minor_second_moment(image: np.ndarray) -> float:
    """Smallest eigenvalue (px^2) of the intensity-weighted second-moment tensor."""
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    w = image / image.sum()
    cx, cy = np.sum(w * xx), np.sum(w * yy)
    ixx, iyy, ixy = np.sum(w * (xx - cx) ** 2), np.sum(w * (yy - cy) ** 2), np.sum(w * (xx - cx) * (yy - cy))
    return float(np.linalg.eigvalsh([[ixx, ixy], [ixy, iyy]])[0])


def test_cosmic_rays_are_sharper_than_the_psf():
    """Cosmic rays hit 1-3 pixels and, in the difference image, are narrower than the science
    PSF measured the same way. Width is the minor-axis second moment: a 3-pixel diagonal hit
    is long but has no width across, unlike any PSF (its total moment can match a sharp PSF's)."""
    sky = SkyConfig(star_density=(1e-5, 2e-5), galaxy_density=(0.0, 0.0), empty_fraction=1.0, cosmic_rays_per_field=3.0, hot_pixels_per_field=0.0, bogus_snr_range=(100.0, 300.0))
    half, checked = 2, 0
    for i in range(10):
        s = st.simulate_sky(np.random.default_rng([5, i]), image_size=64, sky=sky)
        difference = s.science.astype(np.float64) - s.reference
        sigma = st.robust_background(difference)[1]
        stamp = s.psf_science.stamp
        r = s.psf_science.radius
        psf_width = minor_second_moment(stamp[r - half : r + half + 1, r - half : r + half + 1])
        for obj in s.truth:
            assert obj["type"] == "cosmic_ray"
            assert 1 <= obj["n_pixels"] <= 3
            if any(o is not obj and math.hypot(o["x"] - obj["x"], o["y"] - obj["y"]) < 6 for o in s.truth):
                continue  # overlapping hits: not one object
            row, col = rounded(obj["y"]), rounded(obj["x"])
            if not (half <= row < 64 - half and half <= col < 64 - half):
                continue
            sign = 1.0 if obj["epoch"] == "science" else -1.0
            cut = sign * difference[row - half : row + half + 1, col - half : col + half + 1]
            cut = np.where(cut > 5 * sigma, cut, 0.0)
            assert np.count_nonzero(cut) <= obj["n_pixels"]
            assert minor_second_moment(cut) < psf_width, (obj, psf_width)
            checked += 1
    assert checked >= 15


# --- The simulator's fast paths against plain reference implementations


@pytest.mark.parametrize("shape, factor", [((12, 12), 3), ((2, 8, 8), 4), ((3, 2, 10, 10), 2)])
def test_bin_subpixels_sums_each_block(shape, factor):
    image = np.random.default_rng(0).random(shape)
    expected = np.zeros(shape[:-2] + (shape[-2] // factor, shape[-1] // factor))
    for i in range(expected.shape[-2]):
        for j in range(expected.shape[-1]):
            expected[..., i, j] = image[..., i * factor : (i + 1) * factor, j * factor : (j + 1) * factor].sum(axis=(-2, -1))
    np.testing.assert_allclose(st.bin_subpixels(image, factor), expected, rtol=1e-14)


def test_render_points_places_every_stamp_like_a_padded_canvas():
    """Sources inside, on the edge of and just off a 40x30 frame, against the plain method:
    each stamp added to a canvas padded by a stamp on every side, then the frame cut out."""
    psf = PSF(2.2, 3.0)
    r, shape = psf.radius, (30, 40)
    x = np.array([15.3, 0.2, 39.6, -3.4, 44.0, 20.0, -30.0])
    y = np.array([12.8, 29.4, 0.1, 15.0, 12.5, -2.6, 10.0])  # the last one lies far off the frame
    flux = np.array([100.0, 50.0, 70.0, 30.0, 20.0, 40.0, 1e6])
    pad = 3 * r
    canvas = np.zeros((shape[0] + 2 * pad, shape[1] + 2 * pad))
    for xi, yi, fi in zip(x, y, flux):
        ix, iy = int(np.rint(xi)), int(np.rint(yi))
        if -pad + r <= ix < shape[1] + pad - r and -pad + r <= iy < shape[0] + pad - r:
            stamp = st.moffat_stamps(np.array([xi - ix]), np.array([yi - iy]), fwhm=psf.fwhm, beta=psf.beta, radius=r)[0]
            canvas[iy + pad - r : iy + pad + r + 1, ix + pad - r : ix + pad + r + 1] += fi * stamp
    expected = canvas[pad:-pad, pad:-pad]
    np.testing.assert_allclose(st.render_points(shape, x, y, flux, psf), expected, rtol=1e-12, atol=1e-12)
    box, (rows, cols) = st.render_points_box(shape, x[:1], y[:1], flux[:1], psf)
    assert box.shape == (2 * r + 1, 2 * r + 1) and (rows.start, cols.start) == (13 - r, 15 - r)
    np.testing.assert_allclose(box, expected[rows, cols] - st.render_points(shape, x[1:], y[1:], flux[1:], psf)[rows, cols], atol=1e-9)
    off_box, _ = st.render_points_box(shape, x[-1:], y[-1:], flux[-1:], psf)
    assert off_box.size == 0 and not st.render_points(shape, x[-1:], y[-1:], flux[-1:], psf).any()


def test_psf_stamp_is_computed_once_and_cannot_be_changed():
    psf = PSF(1.8, 2.9)
    assert psf.stamp is psf.stamp
    assert psf.stamp.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.unravel_index(psf.stamp.argmax(), psf.stamp.shape) == (psf.radius, psf.radius)
    with pytest.raises(ValueError, match="read-only"):
        psf.stamp[0, 0] = 1.0


def test_sersic_image_matches_the_textbook_profile():
    """One elliptical de Vaucouleurs-like galaxy against exp(-b_n ((r / r_e)^(1/n) - 1)) with
    r from hypot, evaluated on the same 3x3 sub-pixel grid and binned by reshaping."""
    g = dict(x=20.3, y=18.6, flux=5e4, half_light_radius=2.5, n=3.2, axis_ratio=0.6, angle=0.7)
    shape, os_ = (40, 40), 3
    half = int(math.ceil(5.0 * g["half_light_radius"]))
    ix, iy = round(g["x"]), round(g["y"])
    sub = (np.arange((2 * half + 1) * os_) + 0.5) / os_ - half - 0.5
    u, v = sub[None, :] - (g["x"] - ix), sub[:, None] - (g["y"] - iy)
    c, s = math.cos(g["angle"]), math.sin(g["angle"])
    r = np.hypot(u * c + v * s, (-u * s + v * c) / g["axis_ratio"]) / g["half_light_radius"]
    b_n = 2.0 * g["n"] - 1.0 / 3.0 + 4.0 / (405.0 * g["n"])
    size = 2 * half + 1
    stamp = np.exp(-b_n * (r ** (1.0 / g["n"]) - 1.0)).reshape(size, os_, size, os_).sum(axis=(1, 3))
    expected = np.zeros(shape)
    expected[iy - half : iy + half + 1, ix - half : ix + half + 1] = stamp * g["flux"] / stamp.sum()
    np.testing.assert_allclose(st.sersic_image(shape, [g]), expected, rtol=1e-10, atol=1e-12)


BAD_DATASET_ARGS = {
    "no samples": (dict(num_samples=0), "num_samples"),
    "negative samples": (dict(num_samples=-3), "num_samples"),
    "size not a multiple of 16": (dict(num_samples=4, image_size=50), "multiple of 16"),
    "size below 32": (dict(num_samples=4, image_size=16), ">= 32"),
    "inverted SNR range": (dict(num_samples=4, snr_range=(10.0, 5.0)), "snr_range"),
    "zero SNR": (dict(num_samples=4, snr_range=(0.0, 5.0)), "snr_range"),
    "unknown stream": (dict(num_samples=4, stream="validation"), "stream"),
}


@pytest.mark.parametrize("kwargs, words", BAD_DATASET_ARGS.values(), ids=BAD_DATASET_ARGS.keys())
def test_dataset_refuses_bad_arguments(kwargs, words):
    """Bad arguments raise ValueError naming the offending parameter."""
    with pytest.raises(ValueError, match=re.escape(words)):
        SyntheticAstronomicalDataset(**kwargs)


def test_sky_config_validates_snr_range():
    with pytest.raises(ValueError, match="snr_range"):
        SkyConfig(snr_range=(10.0, 5.0)).validate()


# ----------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------


def sky_pair(seed: int = 2):
    s = st.simulate_sky(np.random.default_rng(seed), image_size=64, sky=SkyConfig())
    return s.reference.astype(np.float64), s.science.astype(np.float64)


def test_normalize_pair_shape_and_dtype():
    ref, sci = sky_pair()
    out = st.normalize_pair(ref, sci)
    assert out.shape == (3, 64, 64) and out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize("a, b", [(1.0, 0.0), (0.01, 5.0), (3.7, -1200.0), (250.0, 1e4)])
def test_normalize_pair_is_invariant_to_pixel_units(a, b):
    """a * image + b (a > 0) for both epochs, e.g. electrons to ADU, gives the same input."""
    ref, sci = sky_pair()
    np.testing.assert_allclose(st.normalize_pair(a * ref + b, a * sci + b), st.normalize_pair(ref, sci), atol=1e-4)


def test_normalize_pair_makes_nan_pixels_blank_sky():
    """A pixel missing in either epoch is blank sky (background plus noise) in every channel; all else stays."""
    ref, sci = sky_pair()
    sci[10, 20] = np.nan
    ref[40, 5] = np.nan
    out = st.normalize_pair(ref, sci)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, st.normalize_pair(ref, sci))  # the same blank sky every time
    assert np.all(np.abs(out[:, [10, 40], [20, 5]]) < 4.0)  # noise-like values, not a source
    clean = st.normalize_pair(*sky_pair())
    elsewhere = np.ones(out.shape[1:], dtype=bool)
    elsewhere[10, 20] = elsewhere[40, 5] = False
    np.testing.assert_allclose(out[:, elsewhere], clean[:, elsewhere], atol=0.01)  # the rest barely moves


def test_normalize_pair_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        st.normalize_pair(np.ones((64, 64)), np.ones((64, 32)))


# ----------------------------------------------------------------------------
# Gallery
# ----------------------------------------------------------------------------


def test_dataset_gallery_writes_a_png(tmp_path):
    ds = SyntheticAstronomicalDataset(3, image_size=64, seed=1)
    path = st.dataset_gallery(ds, tmp_path / "sub" / "gallery.png", count=3)
    assert Path(path) == tmp_path / "sub" / "gallery.png"
    assert is_png(Path(path))


# ----------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------


def test_unet_parameter_count():
    """The default U-Net has 2.0-2.2 million trainable parameters (2.16M documented)."""
    assert 2.0e6 <= st.count_parameters(st.StandaloneUNet()) <= 2.2e6


@pytest.mark.parametrize("size, batch", [(64, 2), (96, 1), (128, 1)])
def test_unet_output_shape(size, batch):
    model = st.StandaloneUNet().eval()
    with torch.no_grad():
        out = model(torch.randn(batch, 3, size, size))
    assert tuple(out.shape) == (batch, 1 + len(ANOMALY_TYPES), size, size)  # the change logit, then one per type
    assert torch.isfinite(out).all()
    with torch.no_grad():
        alone = st.StandaloneUNet(types=0).eval()(torch.randn(batch, 3, size, size))
    assert tuple(alone.shape) == (batch, 1, size, size)  # a checkpoint from before the type head


@pytest.mark.parametrize("size", [40, 50])
def test_unet_fails_on_sizes_not_a_multiple_of_16(size):
    """Four 2x poolings: other sizes cannot be put back together (and are refused upstream)."""
    with pytest.raises(ValueError):
        st.check_image_size(size)
    with pytest.raises((RuntimeError, ValueError)), torch.no_grad():
        st.StandaloneUNet().eval()(torch.randn(1, 3, size, size))


# ----------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------

CONFIDENT = 20.0  # |logit|: sigmoid(20) = 1 - 2e-9


def disc_mask(n: int = 32, radius: float = 4.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    return (((xx - 15) ** 2 + (yy - 12) ** 2) <= radius**2).float()[None, None]


def test_perfect_confident_prediction_has_zero_dice_loss():
    target = disc_mask()
    logits = (2 * target - 1) * CONFIDENT
    loss = st.CombinedLoss()
    assert float(loss.dice_loss(logits, target)) < 1e-6
    assert float(loss(logits, target)) < 1e-6


def test_empty_mask_with_silent_prediction_scores_zero():
    """An empty mask scores 0 (BCE and Dice) when the prediction is empty too: Dice is
    sum p / (sum p + eps), here 2048 x 2e-9."""
    target = torch.zeros(2, 1, 32, 32)
    logits = torch.full_like(target, -CONFIDENT)
    loss = st.CombinedLoss()
    total_p = target.numel() / (1 + math.exp(CONFIDENT))
    assert float(loss.dice_loss(logits, target)) == pytest.approx(total_p / (total_p + 1.0), rel=0.05)  # float32 sums
    assert float(loss(logits, target)) < 1e-5


@pytest.mark.parametrize("blob", [1, 4, 16, 64])
def test_bce_keeps_penalising_false_positives_on_empty_fields(blob):
    """On an empty mask a confident false-positive blob of k pixels costs BCE = k * 20 / N,
    growing with k, while Dice saturates at k / (k + eps)."""
    n = 32 * 32
    target = torch.zeros(1, 1, 32, 32)
    logits = torch.full_like(target, -CONFIDENT)
    logits.view(-1)[:blob] = CONFIDENT
    bce_only = st.CombinedLoss(bce_weight=1.0, dice_weight=0.0)
    expected_bce = (blob * math.log1p(math.exp(CONFIDENT)) + (n - blob) * math.log1p(math.exp(-CONFIDENT))) / n
    assert float(bce_only(logits, target)) == pytest.approx(expected_bce, rel=1e-4)
    assert float(st.CombinedLoss().dice_loss(logits, target)) == pytest.approx(blob / (blob + 1.0), rel=1e-4)


def test_bce_false_positive_penalty_grows_with_blob_size():
    target = torch.zeros(1, 1, 32, 32)
    bce_only = st.CombinedLoss(bce_weight=1.0, dice_weight=0.0)
    losses = []
    for blob in (0, 1, 4, 16, 64, 256):
        logits = torch.full_like(target, -CONFIDENT)
        logits.view(-1)[:blob] = CONFIDENT
        losses.append(float(bce_only(logits, target)))
    assert all(b > a for a, b in zip(losses, losses[1:]))


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p)).float()


DICE_CASES = {
    # name: (probabilities, target, eps, expected = 1 - (2 sum(p t) + eps) / (sum p + sum t + eps))
    "uniform half, one positive": ([[[[0.5, 0.5], [0.5, 0.5]]]], [[[[1, 0], [0, 0]]]], 1.0, 1 - 2.0 / 4.0),
    "good guess": ([[[[0.8, 0.2]]]], [[[[1, 0]]]], 1.0, 1 - 2.6 / 3.0),
    "good guess, eps 0.5": ([[[[0.8, 0.2]]]], [[[[1, 0]]]], 0.5, 1 - 2.1 / 2.5),
    "empty mask, faint false positives": ([[[[0.25, 0.25]]]], [[[[0, 0]]]], 1.0, 1 - 1.0 / 1.5),
    # Pooled over the batch (0.125), not averaged per sample (0.1167).
    "pooled over the batch": ([[[[0.9, 0.1]]], [[[0.1, 0.1]]]], [[[[1, 0]]], [[[0, 0]]]], 1.0, 1 - 2.8 / 3.2),
}


@pytest.mark.parametrize("probs, target, eps, expected", DICE_CASES.values(), ids=DICE_CASES.keys())
def test_dice_loss_hand_computed(probs, target, eps, expected):
    loss = st.CombinedLoss(eps=eps).dice_loss(logit(probs), torch.tensor(target, dtype=torch.float32))
    assert float(loss) == pytest.approx(expected, abs=1e-6)


def test_combined_loss_is_the_weighted_sum():
    rng = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 16, 16, generator=rng)
    target = (torch.rand(2, 1, 16, 16, generator=rng) > 0.9).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    dice = st.CombinedLoss().dice_loss(logits, target)
    got = st.CombinedLoss(bce_weight=2.0, dice_weight=3.0)(logits, target)
    assert float(got) == pytest.approx(float(2 * bce + 3 * dice), rel=1e-6)


# ----------------------------------------------------------------------------
# Pixel metrics
# ----------------------------------------------------------------------------

PIXEL_CASES = {
    # name: (tp, fp, fn, tn), then accuracy, precision, recall, F1 and
    # MCC = (tp tn - fp fn) / sqrt((tp + fp)(tp + fn)(tn + fp)(tn + fn)), all counted by hand
    "mostly right": ((3, 1, 2, 10), 13 / 16, 3 / 4, 3 / 5, 6 / 9, (30 - 2) / math.sqrt(4 * 5 * 11 * 12)),
    "perfect": ((2, 0, 0, 14), 1.0, 1.0, 1.0, 1.0, 1.0),
    "every decision wrong": ((0, 2, 2, 0), 0.0, 0.0, 0.0, 0.0, -1.0),
    "worse than chance": ((1, 3, 3, 1), 2 / 8, 1 / 4, 1 / 4, 2 / 8, (1 - 9) / math.sqrt(4 * 4 * 4 * 4)),
    # Nothing predicted: precision and MCC are 0/0, reported as 0.
    "silent model": ((0, 0, 4, 12), 12 / 16, 0.0, 0.0, 0.0, 0.0),
}


@pytest.mark.parametrize("counts, accuracy, precision, recall, f1, mcc", PIXEL_CASES.values(), ids=PIXEL_CASES.keys())
def test_pixel_metrics_of_a_hand_counted_confusion_matrix(counts, accuracy, precision, recall, f1, mcc):
    tp, fp, fn, tn = counts
    target = np.array([1] * tp + [0] * fp + [1] * fn + [0] * tn, dtype=np.float32)
    probs = np.array([0.9] * tp + [0.7] * fp + [0.2] * fn + [0.1] * tn)
    got = st.pixel_metrics(probs.reshape(1, 1, -1), target.reshape(1, 1, -1), threshold=0.5)
    assert set(got) == set(st.PIXEL_METRICS)
    expected = dict(accuracy=accuracy, precision=precision, recall=recall, f1=f1, mcc=mcc)
    assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-12)


def test_pixel_metrics_threshold_moves_the_decisions_not_the_ranking():
    target = np.array([1, 1, 0, 0], dtype=np.float32)
    probs = np.array([0.9, 0.4, 0.6, 0.1])
    at_half, at_third = st.pixel_metrics(probs, target, threshold=0.5), st.pixel_metrics(probs, target, threshold=0.3)
    assert (at_half["mcc"], at_third["mcc"]) == pytest.approx((0.0, 1 / math.sqrt(3)), abs=1e-12)  # (1 - 1) / 4 and (2 - 0) / sqrt(3 * 2 * 2 * 1)
    assert at_half["average_precision"] == at_third["average_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert at_half["roc_auc"] == at_third["roc_auc"] == pytest.approx(3 / 4)
    assert st.pixel_metrics(probs, np.zeros(4), threshold=0.5)["roc_auc"] is None  # one class: undefined, not an error


# ----------------------------------------------------------------------------
# Early stopping
# ----------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
STOPPING_CASES = {
    # name: (values, kwargs, epoch it stops at (1-based) or None, best, best_epoch)
    "keeps improving": ([3.0, 2.0, 1.0], dict(patience=2), None, 1.0, 3),
    "patience 2 after the best": ([1.0, 0.5, 0.75, 0.875], dict(patience=2), 4, 0.5, 2),
    "improvement resets patience": ([1.0, 1.5, 0.5, 0.75, 0.75], dict(patience=2), 5, 0.5, 3),
    "patience 1": ([1.0, 1.0], dict(patience=1), 2, 1.0, 1),
    "an equal value is no improvement": ([1.0, 1.0, 1.0], dict(patience=2), 3, 1.0, 1),
    "improvement must exceed min_delta": ([1.0, 0.75, 0.8], dict(patience=2, min_delta=0.25), 3, 1.0, 1),
    "beyond min_delta counts": ([1.0, 0.5, 0.6, 0.6], dict(patience=2, min_delta=0.25), 4, 0.5, 2),
    "mode max": ([0.1, 0.25, 0.25, 0.2], dict(patience=2, mode="max"), 4, 0.25, 2),
    "mode max, rising": ([0.1, 0.2, 0.3], dict(patience=1, mode="max"), None, 0.3, 3),
    "NaN stops at once": ([1.0, NAN, 0.5], dict(patience=5), 2, 1.0, 1),
    "NaN first is never best": ([NAN], dict(patience=5), 1, INF, -1),
    "infinity stops too": ([1.0, INF], dict(patience=5), 2, 1.0, 1),
    "NaN in mode max": ([0.5, NAN], dict(patience=5, mode="max"), 2, 0.5, 1),
}


def run_stopper(values, **kwargs):
    stopper = st.EarlyStopping(**kwargs)
    for epoch, value in enumerate(values, start=1):
        improved = stopper.step(value, epoch)
        if not math.isfinite(value):
            assert not improved
        if stopper.should_stop:
            return stopper, epoch
    return stopper, None


@pytest.mark.parametrize("values, kwargs, stop_epoch, best, best_epoch", STOPPING_CASES.values(), ids=STOPPING_CASES.keys())
def test_early_stopping_on_loss_sequences(values, kwargs, stop_epoch, best, best_epoch):
    stopper, stopped = run_stopper(values, **kwargs)
    assert stopped == stop_epoch
    assert stopper.best == best and stopper.best_epoch == best_epoch
    assert bool(stopper.stop_reason) == (stop_epoch is not None)


@pytest.mark.parametrize("kwargs", [dict(patience=2, mode="minimum"), dict(patience=2, mode="MAX"), dict(patience=0), dict(patience=2, min_delta=-0.1)])
def test_early_stopping_refuses_bad_settings(kwargs):
    with pytest.raises(ValueError):
        st.EarlyStopping(**kwargs)


def test_early_stopping_state_survives_a_resume():
    """Stopping after a state_dict round trip happens exactly where it would have anyway."""
    values = [1.0, 0.8, 0.9, 0.95, 0.7, 0.75, 0.76, 0.77]
    straight, stop_straight = run_stopper(values, patience=3, min_delta=0.01)

    first = st.EarlyStopping(patience=3, min_delta=0.01)
    for epoch, value in enumerate(values[:4], start=1):
        first.step(value, epoch)
    state = json.loads(json.dumps(first.state_dict()))  # plain data, as in a checkpoint
    resumed = st.EarlyStopping(patience=3, min_delta=0.01)
    resumed.load_state_dict(state)
    stop_resumed = None
    for epoch, value in enumerate(values[4:], start=5):
        resumed.step(value, epoch)
        if resumed.should_stop:
            stop_resumed = epoch
            break
    assert stop_straight == 8
    assert stop_resumed == stop_straight
    assert resumed.state_dict() == straight.state_dict()


# ----------------------------------------------------------------------------
# Overfitting one batch
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_unet_overfits_one_small_batch():
    """Four 32x32 samples, AdamW at 3e-3: the combined loss falls at least 5x in 200 steps.

    The U-Net at width 8 (the same architecture at half the channels, a quarter of the cost
    here) on the smallest images it takes (a 64 px batch costs 4x as much and teaches nothing
    more): most of the fall is the Dice term memorising faint anomalies, and 200 steps give
    about 20x (120 steps give 4x).
    """
    ds = SyntheticAstronomicalDataset(24, image_size=32, seed=0)
    chosen = [i for i in range(len(ds)) if ds[i][1][0].sum() > 0][:4]
    inputs = torch.stack([ds[i][0] for i in chosen])
    masks = torch.stack([ds[i][1] for i in chosen])
    torch.manual_seed(0)
    model = st.StandaloneUNet(width=8)
    criterion = st.CombinedLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = float(criterion(model(inputs), masks))
    for _ in range(200):
        loss = criterion(model(inputs), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = float(criterion(model(inputs), masks))
    assert after < before / 5, (before, after)


# ----------------------------------------------------------------------------
# Object-level evaluation
# ----------------------------------------------------------------------------


def gaussian_psf(sigma=1.5, half=7):
    """Unit-flux Gaussian stamp of side 2 half + 1."""
    r = np.arange(-half, half + 1)
    psf = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return psf / psf.sum()


def det(x, y):
    return {"x": x, "y": y}


def point(kind, x, y, snr=10.0):
    return {"type": kind, "x": x, "y": y, "snr": snr}


def trail(x1, y1, x2, y2, snr=10.0):
    return {"type": "asteroid", "x": (x1 + x2) / 2, "y": (y1 + y2) / 2, "snr": snr,
            "x1": x1, "y1": y1, "x2": x2, "y2": y2}


MATCH_CASES = {
    # name: (detections, truth, recovered, real, bogus_passed)
    "hit within radius": ([det(12.9, 10)], [point("transient", 10, 10)], [True], [True], []),
    "hit exactly at radius": ([det(10, 13)], [point("supernova", 10, 10)], [True], [True], []),
    "miss just outside": ([det(13.01, 10)], [point("transient", 10, 10)], [False], [False], []),
    "diagonal miss": ([det(12.2, 12.2)], [point("variable_star", 10, 10)], [False], [False], []),
    "shared by two truths": (
        [det(12, 10)], [point("transient", 10, 10), point("supernova", 14, 10)],
        [True, True], [True], []),
    "trail middle, far from ends": (
        [det(20, 12.5)], [trail(0, 10, 40, 10)], [True], [True], []),
    "trail middle, just outside": (
        [det(20, 13.2)], [trail(0, 10, 40, 10)], [False], [False], []),
    "beyond trail end": ([det(43.5, 10)], [trail(0, 10, 40, 10)], [False], [False], []),
    "diagonal trail": ([det(21, 19)], [trail(0, 0, 40, 40)], [True], [True], []),
    "detection near cosmic ray passes": (
        [det(51, 50)], [point("cosmic_ray", 50, 50), point("transient", 5, 5)],
        [False], [False], [True]),
    "detection near cosmic ray and anomaly": (
        [det(51, 50)], [point("cosmic_ray", 50, 50), point("transient", 53, 50)],
        [True], [True], [False]),
    "bogus far from every detection": (
        [det(10, 10)], [point("hot_pixel", 20, 20)], [], [False], [False]),
    "no detections": ([], [point("transient", 1, 1), point("dipole", 5, 5)], [False], [], [False]),
    "no truth": ([det(1, 1), det(9, 9)], [], [], [False, False], []),
}


@pytest.mark.parametrize("case", MATCH_CASES.values(), ids=MATCH_CASES.keys())
def test_match_objects(case):
    detections, truth, recovered, real, bogus_passed = case
    result = match_objects(detections, truth, radius=3.0)
    assert result.recovered.tolist() == recovered
    assert result.real.tolist() == real
    assert result.bogus_passed.tolist() == bogus_passed
    assert result.n_false == real.count(False)


def test_match_objects_indices_point_into_truth_table():
    truth = [point("cosmic_ray", 0, 0), point("transient", 9, 9), point("dipole", 3, 3)]
    result = match_objects([], truth)
    assert result.anomaly_index.tolist() == [1]
    assert result.bogus_index.tolist() == [0, 2]


@pytest.mark.parametrize("truth", [
    [{"type": "galaxy", "x": 1, "y": 1, "snr": 5}],
    [{"type": "asteroid", "x": 1, "y": 1, "snr": 5}],  # a trail without end points
])
def test_match_objects_rejects_bad_truth(truth):
    with pytest.raises(ValueError):
        match_objects([det(1, 1)], truth)


def test_match_objects_rejects_non_positive_radius():
    with pytest.raises(ValueError, match="radius"):
        match_objects([det(1, 1)], [point("transient", 1, 1)], radius=0.0)


def test_match_objects_accepts_the_simulators_truth_tables():
    """Every truth table the simulator writes can be matched (types and trail end points)."""
    ds = SyntheticAstronomicalDataset(10, image_size=64, seed=4)
    for i in range(len(ds)):
        truth = ds.truth(i)
        result = match_objects([det(o["x"], o["y"]) for o in truth], truth)
        assert result.recovered.all()  # a detection on every object recovers every anomaly


def hand_made_map():
    score = np.zeros((10, 12))
    score[2, 3] = 0.9                  # A: single pixel
    score[6, 7], score[6, 8] = 0.6, 0.9  # B: two pixels, centroid pulled towards the brighter
    score[0, 10] = score[1, 11] = 0.7  # C: diagonal neighbours, one object under 8-connectivity
    score[8, 1] = 0.5                  # D: exactly at threshold, kept
    score[8, 5] = 0.49                 # below threshold
    return score


def test_find_components_counts_centroids_areas():
    comps = find_components(hand_made_map(), threshold=0.5)
    got = sorted((c["x"], c["y"], c["peak"], c["area_px"]) for c in comps)
    expected = sorted([(3.0, 2.0, 0.9, 1), ((7 * 0.6 + 8 * 0.9) / 1.5, 6.0, 0.9, 2),
                       (10.5, 0.5, 0.7, 2), (1.0, 8.0, 0.5, 1)])
    assert len(comps) == 4
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_find_components_respects_valid_mask_and_empty_map():
    valid = np.ones((10, 12), dtype=bool)
    valid[:4, :5] = False  # hides component A
    comps = find_components(hand_made_map(), threshold=0.5, valid=valid)
    assert len(comps) == 3
    assert all(c["x"] != 3.0 for c in comps)
    assert find_components(np.zeros((5, 5)), threshold=0.5) == []


def test_find_components_never_passes_nan():
    score = hand_made_map()
    score[4, 4] = np.nan
    assert len(find_components(score, threshold=0.5)) == 4


@pytest.mark.parametrize("kwargs", [dict(threshold=0.0), dict(threshold=-1.0), dict(threshold=0.5, valid=np.ones((3, 3), bool))])
def test_find_components_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        find_components(hand_made_map(), **kwargs)


@pytest.mark.parametrize("sign", [+1, -1], ids=["brightening", "fading"])
def test_baseline_finds_snr20_point_source(sign):
    rng = np.random.default_rng(3)
    psf, sigma = gaussian_psf(), 2.0
    image = rng.normal(0.0, sigma, size=(128, 128))
    # Flux giving SNR 20 = F sqrt(sum P^2) / sigma (docs/science.md section 3, white noise).
    flux = 20 * sigma / np.sqrt(np.sum(psf**2))
    x0, y0 = 40, 70
    image[y0 - 7:y0 + 8, x0 - 7:x0 + 8] += sign * flux * psf
    snr = matched_filter_snr_map(image, psf=psf)
    assert sign * snr[y0, x0] == pytest.approx(20, abs=3)
    detections = baseline_detections(image, psf=psf)
    assert len(detections) == 1
    assert abs(detections[0]["x"] - x0) < 0.5 and abs(detections[0]["y"] - y0) < 0.5
    assert match_objects(detections, [point("transient", x0, y0, 20.0)]).recovered.all()


def test_baseline_snr_map_has_unit_noise():
    rng = np.random.default_rng(4)
    image = rng.normal(0.0, 7.0, size=(256, 256))
    snr = matched_filter_snr_map(image, psf=gaussian_psf())
    # Away from the zero-padded border the map is N(0, 1) if the normalisation is right.
    assert np.std(snr[8:-8, 8:-8]) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("psf", [np.ones((4, 5)), np.zeros((5, 5)), np.full((5, 5), np.nan)], ids=["even side", "zero sum", "NaN"])
def test_baseline_rejects_bad_psf(psf):
    with pytest.raises(ValueError):
        matched_filter_snr_map(np.zeros((32, 32)), psf=psf, sigma=1.0)


def test_baseline_false_detections_on_white_noise():
    """False detections per pure-noise image against the Gaussian expectation.

    Expectation as asked for: N_res x P(|z| >= u), with N_res = N_pix sum(P^2) the number of
    independent PSF-sized resolution elements (1 / sum(P^2) is the PSF's noise-equivalent
    area, 4 pi sigma_psf^2 for a Gaussian) and P(|z| >= u) = erfc(u / sqrt 2), two-sided.
    That count of independent cells underestimates the false alarms of a *smooth* field: a
    cell is correlated with its neighbours, yet an excursion can start between cells. The
    expected number of excursion regions above u of a smooth Gaussian field (its Euler
    characteristic, Adler 1981) is N_pix lambda u exp(-u^2/2) / (2 pi)^(3/2) per sign, with
    lambda = 1 / (2 sigma_psf^2) for the matched-filtered field; for large u this is the
    resolution-element count times u^2, i.e. 25 times more at 5 sigma. We check both the
    required bound (< 0.1 per image at 5 sigma) and the agreement with the Euler-characteristic
    expectation at 3.5 sigma, where 50 images give enough counts to compare (~140).
    """
    sigma_psf, n_images, shape = 1.5, 50, (128, 128)
    psf = gaussian_psf(sigma_psf)
    rng = np.random.default_rng(2024)
    images = rng.normal(0.0, 1.0, size=(n_images, *shape))
    # Only the interior counts: within half a stamp of the border the zero padding lowers the
    # noise, which would bias the rate low.
    valid = np.zeros(shape, dtype=bool)
    valid[8:-8, 8:-8] = True
    n_pix = int(valid.sum())

    def expectations(u):
        resolution = n_pix * np.sum(psf**2) * math.erfc(u / math.sqrt(2))
        euler = 2 * n_pix / (2 * sigma_psf**2) * u * math.exp(-u**2 / 2) / (2 * math.pi) ** 1.5
        return resolution, euler

    counts = {u: sum(len(baseline_detections(im, psf=psf, threshold=u, valid=valid))
                     for im in images) for u in (3.5, 5.0)}

    resolution5, euler5 = expectations(5.0)
    assert counts[5.0] / n_images < 0.1
    assert resolution5 < euler5 < 0.1  # even the larger expectation is far below 0.1
    assert counts[5.0] <= stats.poisson.ppf(0.999, n_images * euler5)

    resolution35, euler35 = expectations(3.5)
    per_image = counts[3.5] / n_images
    # Loose factor: on a pixel grid an excursion smaller than a pixel can go unseen, so the
    # continuous-field formula runs ~10-20% high.
    assert euler35 / 1.5 < per_image < euler35 * 1.5
    assert per_image > 3 * resolution35  # the resolution-element count is an underestimate


def test_completeness_curve_counts_and_empty_bins():
    centres, completeness, counts = completeness_curve(
        [3.5, 3.6, 12.0, 60.0, 200.0], [True, False, True, True, True], bins=[3, 4, 10, 100])
    np.testing.assert_allclose(centres, np.sqrt([12, 40, 1000]))
    np.testing.assert_array_equal(counts, [2, 0, 2])  # 200 lies outside the edges
    assert completeness[0] == 0.5 and math.isnan(completeness[1]) and completeness[2] == 1.0


@pytest.mark.parametrize("bins", [[3], [3, 3, 4], [0, 1, 2], [5, 4]])
def test_completeness_curve_rejects_bad_edges(bins):
    with pytest.raises(ValueError):
        completeness_curve([4.0], [True], bins=bins)


LOGISTIC_MIDPOINT, LOGISTIC_WIDTH = 5.8, 0.15  # in ln SNR


@pytest.mark.parametrize(("edges", "level", "rel"), [
    pytest.param(np.geomspace(3, 100, 41), 0.5, 0.02, id="fine edges, SNR50"),
    pytest.param(np.geomspace(3, 100, 41), 0.9, 0.02, id="fine edges, SNR90"),
    pytest.param(DEFAULT_SNR_EDGES, 0.5, 0.02, id="default edges, SNR50"),
    # On the curve's shoulder a chord across a bin ~25% wide lies below the curve: the
    # default bins overestimate SNR90 by ~2% for this steep curve.
    pytest.param(DEFAULT_SNR_EDGES, 0.9, 0.04, id="default edges, SNR90"),
])
def test_snr_at_completeness_on_logistic_curve(edges, level, rel):
    edges = np.asarray(edges, dtype=float)
    centres = np.sqrt(edges[:-1] * edges[1:])
    completeness = 1 / (1 + np.exp(-(np.log(centres / LOGISTIC_MIDPOINT)) / LOGISTIC_WIDTH))
    expected = LOGISTIC_MIDPOINT * np.exp(LOGISTIC_WIDTH * np.log(level / (1 - level)))
    assert snr_at_completeness(centres, completeness, level) == pytest.approx(expected, rel=rel)


SNR_AT_CASES = {
    # name: (completeness at centres 4, 8, 16, 32; level; expected)
    "never reached": ([0.1, 0.2, 0.3, 0.4], 0.5, math.nan),
    "reached in faintest bin": ([0.6, 0.8, 1.0, 1.0], 0.5, 4.0),
    "midway in log SNR": ([0.0, 0.25, 0.75, 1.0], 0.5, math.sqrt(8 * 16)),
    "empty bin skipped": ([0.0, math.nan, 1.0, 1.0], 0.5, math.sqrt(4 * 16)),
    "first crossing wins over a later dip": ([0.0, 1.0, 0.2, 1.0], 0.5, math.sqrt(4 * 8)),
}


@pytest.mark.parametrize("case", SNR_AT_CASES.values(), ids=SNR_AT_CASES.keys())
def test_snr_at_completeness_rule(case):
    completeness, level, expected = case
    got = snr_at_completeness([4, 8, 16, 32], completeness, level)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected)


def test_the_snr_at_50_percent_is_printed_with_its_bins_or_as_not_measured():
    """The console names the counts behind the SNR at 50%, and will not print one that rests on a handful of objects."""
    def summary(counts, value=6.5, interval=(5.9, 7.1)):
        return {"snr50": {"overall": value}, "snr50_interval": {"overall": list(interval)},
                "completeness_by_snr": {"centres": [4.5, 5.5, 7.0, 9.0], "overall": {"counts": counts}}}

    dense = summary([40, 30, 25, 60])
    assert st._fmt_snr50(dense) == "6.500 [5.900, 7.100]" and st._fmt_snr50_bins(dense) == "30 + 25"  # between 5.5 and 7.0
    assert st._fmt_snr50(summary([40, 30, 4, 60])) == "not measured" and st._fmt_snr50_bins(summary([40, 30, 4, 60])) == "30 + 4"
    assert st._fmt_snr50_bins(summary([40, 0, 25, 60])) == "40 + 25"  # an empty bin is skipped, as the interpolation skips it
    assert st._fmt_snr50(summary([40, 30, 25, 60], value=None)) == "not reached"


@pytest.mark.parametrize("level", [0.0, -0.5, 1.5])
def test_snr_at_completeness_rejects_bad_level(level):
    with pytest.raises(ValueError):
        snr_at_completeness([4, 8], [0.2, 0.8], level)


def hand_made_survey():
    """Two images whose outcome is known by construction (see the expected values below)."""
    truth1 = [
        point("transient", 10, 10, snr=4.0),      # missed
        point("transient", 40, 40, snr=12.0),     # recovered
        trail(60, 10, 100, 10, snr=20.0),         # recovered in its middle
        point("cosmic_ray", 100, 100),            # passed by a false detection
        point("hot_pixel", 5, 100),               # no detection near it
    ]
    detections1 = [det(41, 40), det(80, 11), det(101, 100), det(120, 60)]
    truth2 = [
        point("supernova", 20, 20, snr=6.0),      # recovered
        point("variable_star", 50, 50, snr=50.0),  # recovered
        trail(0, 120, 30, 120, snr=15.0),         # missed
        point("dipole", 90, 90),                  # no detection near it
    ]
    detections2 = [det(20, 21), det(50, 50)]
    truths = [truth1, truth2]
    results = [match_objects(d, t) for d, t in zip([detections1, detections2], truths)]
    return results, truths


def ratio(count, total):
    return {"value": count / total, "count": count, "total": total, "interval": list(st.wilson_interval(count, total))}


def test_summarise_objects_values():
    s = summarise_objects(*hand_made_survey())
    assert s["n_images"] == 2
    assert s["completeness"]["overall"] == ratio(4, 6)
    assert s["completeness"]["by_type"] == {
        "transient": ratio(1, 2), "variable_star": ratio(1, 1),
        "supernova": ratio(1, 1), "asteroid": ratio(1, 2)}
    assert s["purity"] == ratio(4, 6)
    assert s["false_detections_per_image"] == {"value": 1.0, "n_false": 2, "n_images": 2}
    assert s["bogus_pass_rate"]["overall"] == ratio(1, 3)
    assert s["bogus_pass_rate"]["by_type"] == {
        "cosmic_ray": ratio(1, 1), "hot_pixel": ratio(0, 1), "dipole": ratio(0, 1)}
    assert s["completeness_snr_ge_10"] == {"point": ratio(2, 2), "trail": ratio(1, 2)}

    curves = s["completeness_by_snr"]
    assert curves["edges"] == [float(e) for e in DEFAULT_SNR_EDGES]
    # Bins [4,5) 4.0 missed, [6,7) 6.0 hit, [10,13) 12 hit, [13,16) 15 missed, [20,30) 20 hit,
    # [50,100] 50 hit.
    assert curves["overall"]["counts"] == [0, 1, 0, 1, 0, 0, 1, 1, 0, 1, 0, 1]
    assert curves["overall"]["completeness"] == [
        None, 0.0, None, 1.0, None, None, 1.0, 0.0, None, 1.0, None, 1.0]
    c45, c67, c1013 = math.sqrt(20), math.sqrt(42), math.sqrt(130)
    assert s["snr50"]["overall"] == pytest.approx(math.sqrt(c45 * c67))
    assert s["snr90"]["overall"] == pytest.approx(c45**0.1 * c67**0.9)
    assert s["snr50"]["by_type"]["transient"] == pytest.approx(math.sqrt(c45 * c1013))
    assert s["snr50"]["by_type"]["supernova"] == pytest.approx(c67)  # faintest bin already 100%
    assert s["snr50"]["by_type"]["asteroid"] == pytest.approx((13 * 16 * 20 * 30) ** 0.25)


SUMMARY_KEYS = {
    "n_images", "completeness", "completeness_by_snr", "snr50", "snr50_interval", "snr90", "purity",
    "false_detections_per_image", "bogus_pass_rate", "completeness_snr_ge_10"}


def assert_summary_schema(s):
    assert SUMMARY_KEYS <= set(s)
    for key in ("completeness", "snr50", "snr90"):
        assert "overall" in s[key] and set(s[key]["by_type"]) == set(ANOMALY_TYPES)
    assert "overall" in s["completeness_by_snr"] and set(s["completeness_by_snr"]["by_type"]) == set(ANOMALY_TYPES)
    assert "overall" in s["bogus_pass_rate"] and set(s["bogus_pass_rate"]["by_type"]) == set(BOGUS_TYPES)
    assert set(s["completeness_snr_ge_10"]) == {"point", "trail"}
    assert {"value", "count", "total"} <= set(s["purity"])
    assert {"value", "n_false", "n_images"} <= set(s["false_detections_per_image"])


def test_summarise_objects_schema_is_complete_and_json_safe():
    results, truths = hand_made_survey()
    # An image set with no detection at all leaves purity and several SNR points undefined.
    empty = summarise_objects([match_objects([], t) for t in truths], truths)
    for s in (summarise_objects(results, truths), empty):
        assert set(s) == SUMMARY_KEYS
        assert_summary_schema(s)
        json.dumps(s, allow_nan=False)  # raises on NaN or numpy scalars
    assert empty["purity"]["value"] is None
    assert empty["snr50"]["overall"] is None
    assert empty["false_detections_per_image"]["value"] == 0.0


def test_summarise_objects_rejects_mismatched_lengths():
    results, truths = hand_made_survey()
    with pytest.raises(ValueError):
        summarise_objects(results, truths[:1])


def test_choose_threshold_prefers_best_f1_then_higher_threshold():
    prob = np.zeros((32, 32))
    prob[10, 10] = 0.82   # the transient
    prob[25, 25] = 0.30   # a false blob
    truth = [point("transient", 10, 10)]
    best, table = choose_threshold([prob], [truth])
    # F1 = 2/3 up to 0.30, 1 from 0.35 to 0.80, 0 above: the highest of the F1 = 1 plateau.
    assert best == pytest.approx(0.80)
    by_t = {round(r["threshold"], 2): r for r in table}
    assert by_t[0.3]["f1"] == pytest.approx(2 / 3)
    assert by_t[0.5]["f1"] == 1.0
    assert by_t[0.9]["f1"] == 0.0 and by_t[0.9]["purity"] is None


@pytest.mark.parametrize("thresholds", [[0.0, 0.5], [0.5, 1.5], []])
def test_choose_threshold_rejects_thresholds_outside_unit_interval(thresholds):
    with pytest.raises(ValueError):
        choose_threshold([np.zeros((8, 8))], [[]], thresholds=thresholds)


def test_plots_are_written(tmp_path):
    results, truths = hand_made_survey()
    summary = summarise_objects(results, truths)
    paths = [plot_completeness(summary, summary, tmp_path / "completeness.png")]

    rng = np.random.default_rng(0)
    y_true = rng.random((4, 16, 16)) < 0.05
    y_score = np.clip(y_true * 0.6 + rng.random((4, 16, 16)) * 0.5, 0, 1)
    paths.append(plot_precision_recall(y_true, y_score, tmp_path / "pr.png"))

    inputs = rng.normal(size=(3, 64, 64))
    examples = [
        {"inputs": inputs, "probability": rng.random((64, 64)), "x": 5, "y": 60,
         "label": "missed transient SNR 7.2"},
        {"inputs": inputs, "probability": rng.random((64, 64)), "x": 30, "y": 30,
         "label": "false detection p=0.81"},
    ]
    paths.append(plot_object_gallery(examples, tmp_path / "sub" / "gallery.png"))
    for path in paths:
        assert is_png(Path(path))


def test_plots_refuse_what_cannot_be_drawn(tmp_path):
    with pytest.raises(ValueError):
        plot_precision_recall(np.zeros(10, bool), np.zeros(10), tmp_path / "pr.png")  # no positives
    with pytest.raises(ValueError):
        plot_object_gallery([], tmp_path / "g.png")


# ----------------------------------------------------------------------------
# The runner: modes are presets, typed flags override them
# ----------------------------------------------------------------------------


@pytest.fixture
def runner_config(monkeypatch):
    """What `run_standalone_training.py ARGS` would train: the runner's own main, with
    run_training recording its configuration (and the flags counted as typed) instead of training."""
    calls = []
    monkeypatch.setattr(st, "run_training", lambda config, *, given: calls.append((config, set(given))))

    def configure(*argv: str) -> tuple[st.TrainConfig, set[str]]:
        assert runner.main(list(argv)) == 0
        (call,) = calls
        calls.clear()
        return call

    return configure


RUNNER_CASES = {
    # name: (runner arguments, expected (samples, epochs, batch_size), the fields the user typed)
    "no mode is quick": ([], (20, 3, 4), set()),
    "quick": (["--mode", "quick"], (20, 3, 4), set()),
    "quick + --epochs 1": (["--mode", "quick", "--epochs", "1"], (20, 1, 4), {"epochs"}),
    "quick + --batch-size 2": (["--mode", "quick", "--batch-size", "2"], (20, 3, 2), {"batch_size"}),
    "full": (["--mode", "full"], (100, 20, 8), set()),
    "full + --epochs 1": (["--mode", "full", "--epochs", "1"], (100, 1, 8), {"epochs"}),
    "full + --samples 24 --epochs 1": (["--mode", "full", "--samples", "24", "--epochs", "1"], (24, 1, 8), {"samples", "epochs"}),
    "custom": (["--mode", "custom", "--samples", "5", "--epochs", "2", "--batch-size", "1"], (5, 2, 1), {"samples", "epochs", "batch_size"}),
}


@pytest.mark.parametrize("argv, expected, typed", RUNNER_CASES.values(), ids=RUNNER_CASES.keys())
def test_runner_modes_are_presets_that_typed_flags_override(runner_config, argv, expected, typed):
    """A mode sets samples, epochs and batch size; any flag the user gives beats it; the rest stay defaults."""
    config, given = runner_config(*argv)
    assert (config.samples, config.epochs, config.batch_size) == expected
    assert config.mlflow is True and config.energy is True and config.lr == st.TrainConfig().lr  # unset flags do not override
    assert given == typed  # a resume warns about these alone


def test_runner_switch_flags_override_the_defaults(runner_config):
    config, given = runner_config("--no-mlflow", "--no-energy", "--mlflow-optional")
    assert (config.mlflow, config.energy, config.mlflow_optional) == (False, False, True)
    assert (config.samples, config.epochs, config.batch_size) == (20, 3, 4)
    assert given == {"mlflow", "energy", "mlflow_optional"}


@pytest.mark.usefixtures("runner_config")  # were it accepted, nothing would train
def test_runner_custom_mode_without_its_sizes_is_refused_in_one_line(capsys):
    assert runner.main(["--mode", "custom", "--epochs", "2", "--batch-size", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == ["run_standalone_training.py: error: --mode custom needs --samples"]
    assert runner.main(["--mode", "custom"]) == 2
    assert capsys.readouterr().err.splitlines() == ["run_standalone_training.py: error: --mode custom needs --samples, --epochs, --batch-size"]


def test_runner_refuses_a_bad_value_in_one_line_before_writing_anything(tmp_path, capsys):
    out = tmp_path / "run"
    assert runner.main(["--mode", "quick", "--samples", "0", "--no-mlflow", "--no-energy", "--output-dir", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("astrid: error: samples must be >= 1"), lines
    assert not out.exists()


# ----------------------------------------------------------------------------
# The quick run, end to end (shared by the checkpoint and evaluation tests)
# ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory):
    """`run_standalone_training.py --mode quick` with MLflow (sqlite) and CodeCarbon."""
    root = tmp_path_factory.mktemp("quick")
    uri = sqlite_uri(root / "mlflow.db")
    result = run_cli(RUNNER, "--mode", "quick", "--output-dir", str(root / "run"), "--tracking-uri", uri, cwd=root)
    assert result.rc == 0, result.stderr[-3000:]
    return dict(result=result, root=root, run_dir=root / "run", uri=uri)


QUICK_OUTPUTS = ["config.json", "history.json", "metrics.json", "best.pt", "last.pt", "loss_curves.png", "learning_rate.png", "val_metrics.png", "predictions.png", "evaluation/evaluation.json", "evaluation/completeness.png"]


@pytest.mark.slow
def test_quick_run_writes_every_output(quick_run):
    missing = [name for name in QUICK_OUTPUTS if not (quick_run["run_dir"] / name).is_file()]
    assert not missing
    for name in QUICK_OUTPUTS:
        if name.endswith(".png"):
            assert is_png(quick_run["run_dir"] / name), name
    history = json.loads((quick_run["run_dir"] / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    config = json.loads((quick_run["run_dir"] / "config.json").read_text())
    assert (config["samples"], config["epochs"], config["batch_size"]) == (20, 3, 4)


@pytest.mark.slow
def test_quick_run_last_line_names_outputs_and_mlflow_run(quick_run):
    out_dir, run_id = parse_outputs_line(last_line(quick_run["result"].stdout))
    assert Path(out_dir).resolve() == quick_run["run_dir"].resolve()
    assert re.fullmatch(r"[0-9a-f]{32}", run_id)


@pytest.mark.slow
def test_quick_run_metrics(quick_run):
    metrics = json.loads((quick_run["run_dir"] / "metrics.json").read_text())
    energy = metrics["energy"]
    assert energy["status"] in ("measured", "failed"), energy
    if energy["status"] == "measured":
        assert energy["energy_kwh"] > 0
        # Each epoch's row carries the running total, which only grows, and energy.png draws it.
        history = json.loads((quick_run["run_dir"] / "history.json").read_text())
        so_far = [row["energy_kwh_so_far"] for row in history]
        assert 0 < so_far[0] <= so_far[1] <= so_far[2] <= energy["energy_kwh"], (so_far, energy)
        assert all(row["emissions_kg_so_far"] > 0 for row in history)
        assert is_png(quick_run["run_dir"] / "energy.png")
    else:
        assert energy["reason"]  # a failure says why
        assert not (quick_run["run_dir"] / "energy.png").exists()
    assert metrics["data"]["real_fraction"] == 0.0
    assert 0 < metrics["threshold"] < 1
    assert metrics["epochs_run"] == 3 and 1 <= metrics["best_epoch"] <= 3
    assert metrics["parameters"] == st.count_parameters(st.StandaloneUNet())


@pytest.fixture(scope="session")
def quick_mlflow(quick_run):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=quick_run["uri"])
    _, run_id = parse_outputs_line(last_line(quick_run["result"].stdout))
    return client, client.get_run(run_id)


@pytest.mark.slow
def test_quick_run_is_recorded_in_mlflow(quick_run, quick_mlflow):
    client, run = quick_mlflow
    assert run.info.status == "FINISHED"
    assert run.data.params["samples"] == "20" and run.data.params["epochs"] == "3"
    # A model-training experiment: MLflow 3's UI opens it on its runs, not on GenAI traces.
    assert client.get_experiment(run.info.experiment_id).tags[st.EXPERIMENT_KIND_TAG] == "custom_model_development"
    val_loss = client.get_metric_history(run.info.run_id, "val_loss")
    assert sorted(m.step for m in val_loss) == [1, 2, 3]
    history = json.loads((quick_run["run_dir"] / "history.json").read_text())
    logged = {m.step: m.value for m in val_loss}
    assert [logged[row["epoch"]] for row in history] == pytest.approx([row["val_loss"] for row in history])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "config.json", "best.pt", "loss_curves.png"} <= artifacts
    assert ("energy.png" in artifacts) == (run.data.metrics.get("energy_kwh", 0) > 0)
    assert "evaluation" in artifacts


@pytest.mark.slow
def test_quick_run_logs_a_model(quick_mlflow):
    """log_model leaves a READY logged model whose source is this run (MLflow 3 logged models)."""
    client, run = quick_mlflow
    models = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    mine = [m for m in models if m.source_run_id == run.info.run_id]
    assert [m.name for m in mine] == ["model"]
    assert str(mine[0].status).endswith("READY")


CHECKPOINT_KEYS = {"model", "optimizer", "scheduler", "early_stopping", "config", "epoch", "rng", "threshold"}


@pytest.mark.slow
def test_best_checkpoint_loads_and_holds_the_run(quick_run):
    payload = st.load_checkpoint(quick_run["run_dir"] / "best.pt")
    assert CHECKPOINT_KEYS <= set(payload)
    metrics = json.loads((quick_run["run_dir"] / "metrics.json").read_text())
    assert payload["threshold"] == pytest.approx(metrics["threshold"])
    assert payload["epoch"] == metrics["best_epoch"]
    assert payload["config"]["samples"] == 20
    model = st.model_from_checkpoint(payload).eval()
    with torch.no_grad():
        assert tuple(model(torch.zeros(1, 3, 64, 64)).shape) == (1, 1 + len(ANOMALY_TYPES), 64, 64)


# ----------------------------------------------------------------------------
# The evaluate command on the quick run's checkpoint
# ----------------------------------------------------------------------------


def mcc_implied_by(n: int, *, accuracy: float, precision: float, recall: float, f1: float) -> float:
    """MCC of the confusion matrix of n decisions with these rates (at least one true positive, one error)."""
    errors = n * (1 - accuracy)  # fp + fn
    tp = f1 * errors / (2 * (1 - f1))  # F1 = 2 tp / (2 tp + fp + fn)
    fp, fn = tp * (1 - precision) / precision, tp * (1 - recall) / recall
    tn = n - tp - fp - fn
    return (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))


@pytest.fixture(scope="session")
def evaluations(quick_run, tmp_path_factory):
    """`evaluate` with the checkpoint's threshold, and with --threshold overriding it."""
    root = tmp_path_factory.mktemp("evaluate")
    checkpoint = quick_run["run_dir"] / "best.pt"
    stored = st.load_checkpoint(checkpoint)["threshold"]
    override = 0.3 if abs(stored - 0.3) > 0.01 else 0.4
    common = ["evaluate", "--checkpoint", str(checkpoint), "--samples", "8", "--image-size", "64", "--no-real-pixels"]  # test_predict holds real pixels to the documented figures
    results = run_many({
        "default": (MODULE, [*common, "--output-dir", str(root / "ev")], root),
        "override": (MODULE, [*common, "--output-dir", str(root / "ev_override"), "--threshold", str(override), "--no-null-tests"], root),
    })
    for result in results.values():
        assert result.rc == 0, result.stderr[-3000:]
    return dict(results=results, root=root, stored=stored, override=override)


@pytest.mark.slow
def test_evaluation_json_has_every_field(evaluations):
    out = evaluations["root"] / "ev"
    report = json.loads((out / "evaluation.json").read_text())
    assert report["n_images"] == 8 and report["image_size"] == 64
    pixel = report["pixel"]
    assert set(st.PIXEL_METRICS) <= set(pixel)
    for key in ("accuracy", "precision", "recall", "f1"):
        assert 0 <= pixel[key] <= 1, key
    # MCC is no rate: it must be the MCC of the very decisions the rates above count.
    n = report["n_images"] * report["image_size"] ** 2
    if pixel["f1"] == 0:  # no true positive: tp tn - fp fn = -fp fn
        assert -1 <= pixel["mcc"] <= 0
    elif pixel["f1"] == 1:  # no error at all
        assert pixel["mcc"] == 1
    else:
        assert pixel["mcc"] == pytest.approx(mcc_implied_by(n, **{k: pixel[k] for k in ("accuracy", "precision", "recall", "f1")}), abs=1e-9)
    for who in ("network", "baseline"):
        assert_summary_schema(report[who])
        assert report[who]["n_images"] == 8
    assert 0 < report["threshold"] < 1
    assert is_png(out / "completeness.png")
    assert is_png(out / "precision_recall.png")
    assert last_line(evaluations["results"]["default"].stdout) == f"evaluation: {out / 'evaluation.json'}"


@pytest.mark.slow
def test_evaluate_uses_the_checkpoint_threshold_unless_told(evaluations):
    default = json.loads((evaluations["root"] / "ev" / "evaluation.json").read_text())
    override = json.loads((evaluations["root"] / "ev_override" / "evaluation.json").read_text())
    assert default["threshold"] == pytest.approx(evaluations["stored"])
    assert override["threshold"] == pytest.approx(evaluations["override"])
    # Same images, another threshold: the pixel decisions change, the pixel scores do not.
    assert override["pixel"]["average_precision"] == pytest.approx(default["pixel"]["average_precision"])


# ----------------------------------------------------------------------------
# Reproducibility: offline runs side by side
# ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def offline_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("offline")
    offline = ["--no-energy", "--no-mlflow"]

    def quick(name, seed):
        return (RUNNER, ["--mode", "quick", "--test-samples", "8", "--seed", str(seed), *offline, "--output-dir", str(root / name / "run")], root / name)

    return run_many({
        "seed7_a": quick("seed7_a", 7),
        "seed7_b": quick("seed7_b", 7),
        "seed8": quick("seed8", 8),
    })


@pytest.mark.slow
def test_same_seed_gives_byte_identical_metrics(offline_runs):
    a, b, c = (offline_runs[k] for k in ("seed7_a", "seed7_b", "seed8"))
    for r in (a, b, c):
        assert r.rc == 0, r.stderr[-3000:]
    metrics = [(r.cwd / "run" / "metrics.json").read_bytes() for r in (a, b, c)]
    assert metrics[0] == metrics[1]
    assert metrics[0] != metrics[2]


# ----------------------------------------------------------------------------
# A real MLflow tracking server
# ----------------------------------------------------------------------------


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1 with a sqlite backend and proxied artifacts in tmp."""
    directory = tmp_path / "server"
    proc, url = start_mlflow_server(directory)
    try:
        deadline = time.monotonic() + 120
        while not healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not become healthy; log tail:\n{(directory / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield dict(url=url, artifacts=directory / "artifacts")
    finally:
        kill_group(proc)


@pytest.mark.slow
def test_training_against_a_real_mlflow_server(mlflow_server, tmp_path):
    url = mlflow_server["url"]
    r = run_cli(RUNNER, "--mode", "quick", "--samples", "12", "--test-samples", "4", "--no-energy", "--tracking-uri", url, "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert r.rc == 0, r.stderr[-3000:]
    _, run_id = parse_outputs_line(last_line(r.stdout))

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["samples"] == "12" and run.data.params["epochs"] == "3"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"metrics.json", "config.json", "best.pt", "evaluation"} <= artifacts
    # The artifacts went through the server's proxy into its destination, not into cwd.
    assert list(mlflow_server["artifacts"].rglob("metrics.json"))
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    # The run's best model is a version of "astrid"; the shipped weights, registered as the
    # champion, are what another program loads by name, and they find a change in two arrays.
    versions = client.search_model_versions(f"name='{st.REGISTERED_MODEL}'")
    assert [v.run_id for v in versions] == [run_id]
    registered = run_cli(MODULE, "register", "--alias", "champion", "--tracking-uri", url, cwd=tmp_path)
    assert registered.rc == 0, registered.stderr[-3000:]
    champion = client.get_model_version_by_alias(st.REGISTERED_MODEL, "champion")
    assert int(champion.version) == 2 and client.get_run(champion.run_id).data.tags["astrid.checkpoint_sha256"] == st._sha256(st.DEFAULT_WEIGHTS)
    import mlflow.pyfunc

    mlflow.set_tracking_uri(url)
    model = mlflow.pyfunc.load_model(f"models:/{st.REGISTERED_MODEL}@champion")
    rng = np.random.default_rng(4)
    psf = st.PSF(3.0, 3.5)
    static = 100.0 + st.render_points((96, 96), rng.uniform(8, 88, 25), rng.uniform(8, 88, 25), rng.uniform(3e3, 3e4, 25), psf)
    science = static + st.render_points((96, 96), np.array([48.2]), np.array([47.6]), np.array([4000.0]), psf) + rng.normal(0, 5, (96, 96))
    found = model.predict({"science": science, "reference": static + rng.normal(0, 5, (96, 96))})
    near = found[np.hypot(found["x"] - 48.2, found["y"] - 47.6) < 3]
    assert list(found.columns) == ["pair", *st.DETECTION_COLUMNS] and len(near) == 1 and near["significance"].iloc[0] > 5


# ----------------------------------------------------------------------------
# The walkthrough
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_walks_through_every_step_and_writes_only_under_its_output_dir(tmp_path):
    """demo_standalone_training.py --fast runs its five steps; the working directory stays clean."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, str(HERE / "demo_standalone_training.py"), "--fast", "--output-dir", str(out)],
        cwd=cwd, capture_output=True, text=True, timeout=600, env=cli_env(),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    headers = [line for line in result.stdout.splitlines() if re.match(r"\[\d/5\] ", line)]
    assert [h[:5] for h in headers] == [f"[{k}/5]" for k in range(1, 6)]
    assert (out / "gallery.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "run" / "metrics.json").read_text())["epochs_run"] >= 1
    assert (out / "evaluation" / "evaluation.json").is_file()
    assert (out / "mlflow.db").is_file() and (out / "mlartifacts").is_dir()
    assert list(cwd.iterdir()) == [], "the demo must not litter the working directory"


# ----------------------------------------------------------------------------
# The module and its documents read on their own
# ----------------------------------------------------------------------------


def _top_level_names(node: ast.stmt) -> set[str]:
    """The module-level names a top-level statement binds."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def test_outputs_follow_the_umask_of_the_moment_they_are_written(tmp_path):
    """Importing AstrID leaves the umask alone; the first output reads it, and files are as shareable as it allows."""
    before = os.umask(0o027)
    st._umask.cache_clear()
    try:
        path = st.atomic_write(tmp_path / "out.txt", lambda f: f.write(b"x"))
        assert os.stat(path).st_mode & 0o777 == 0o640 and os.umask(0o027) == 0o027  # and the umask is still the user's
    finally:
        os.umask(before)
        st._umask.cache_clear()


def test_no_module_constant_is_glued_to_the_function_above_it():
    """A constant after a function or class stands apart (a blank line), so that it reads as the module's, not the function's."""
    body = ast.parse(MODULE.read_text()).body
    glued = [node.lineno for prev, node in zip(body, body[1:])
             if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(prev, (ast.FunctionDef, ast.ClassDef))
             and node.lineno == prev.end_lineno + 1]
    assert glued == []


@pytest.mark.parametrize("script", ["standalone_training.py", "run_standalone_training.py", "demo_standalone_training.py"])
def test_no_line_of_the_program_is_longer_than_120_characters(script):
    long = [f"line {n}: {len(line)}" for n, line in enumerate((HERE / script).read_text().splitlines(), 1) if len(line) > 120]
    assert long == []


def test_every_import_below_the_top_says_why_it_is_there():
    """Imports belong at the top; one inside a function is deliberately lazy (start-up time, an
    optional library, one platform) and its line says so."""
    source = MODULE.read_text()
    lines, tree = source.splitlines(), ast.parse(source)
    top = {id(node) for node in tree.body}
    silent = [f"line {node.lineno}: {lines[node.lineno - 1].strip()}" for node in ast.walk(tree)
              if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top and "#" not in lines[node.lineno - 1]]
    assert silent == []


def test_the_module_uses_no_name_above_the_line_that_defines_it():
    """Scrolling down standalone_training.py never meets a module-level name defined further down."""
    body = ast.parse(MODULE.read_text()).body
    defined_at = {}
    for index, node in enumerate(body):
        for name in _top_level_names(node):
            defined_at.setdefault(name, index)
    forward = sorted(
        f"line {use.lineno}: {use.id} (defined at line {body[defined_at[use.id]].lineno})"
        for index, node in enumerate(body)
        for use in ast.walk(node)
        if isinstance(use, ast.Name) and isinstance(use.ctx, ast.Load)
        and defined_at.get(use.id, -1) > index and use.id not in _top_level_names(node)
    )
    assert forward == []


def _sections(text: str) -> list[tuple[int, str]]:
    """The module's `# ----` sections: (line of the title, the title's name before its colon)."""
    return [(text[:m.start()].count("\n") + 2, m.group(1).split(":")[0])
            for m in re.finditer(r"^# -{70,}\n# ([^\n]+)\n# -{70,}$", text, flags=re.M)]


def test_the_module_docstring_lists_every_section():
    """Each `# ----` section of the module, core or wing, is named in the module docstring's map."""
    text = MODULE.read_text()
    names = [name for _, name in _sections(text)]
    assert len(names) >= 20 and sum(name.endswith(" wing") for name in names) == 7
    listed = ast.get_docstring(ast.parse(text)).lower()
    for name in names:
        assert name.lower() in listed, name


def test_no_helper_sits_more_than_one_wing_above_the_one_wing_that_uses_it():
    """A definition that one workflow alone uses lives in that workflow's wing, or one wing above it.

    The measure is the wing, not the line: a line count changes with every edit above it,
    while the wing is what a reader follows (a checkpoint through predict, a configuration
    through training). The shared core counts as wing 0 and the wings as 1, 2, ... in file
    order, so one wing of slack lets the core keep what belongs to the model (its loss)
    though only training uses it, and nothing sits further from its workflow. The entry
    point (`Command line`) reaches every wing by design: its uses are not counted.
    """
    text = MODULE.read_text()
    sections = _sections(text)
    wings = [name for _, name in sections if name.endswith(" wing")]
    assert wings[:1] == ["Training wing"] and sections[-1][1] == "Command line"

    def wing_at(line: int) -> int | None:
        name = [name for start, name in sections if start <= line][-1] if line > sections[0][0] else ""
        return None if name == "Command line" else wings.index(name) + 1 if name in wings else 0

    body = [node for node in ast.parse(text).body if not isinstance(node, (ast.Import, ast.ImportFrom))]
    home = {name: wing_at(node.lineno) for node in body for name in _top_level_names(node)}
    users: dict[str, set[int]] = {}
    for node in body:
        at = wing_at(node.lineno)
        for use in ast.walk(node):
            if at is not None and isinstance(use, ast.Name) and use.id in home and use.id not in _top_level_names(node):
                users.setdefault(use.id, set()).add(at)
    far = sorted(f"{name} (wing {home[name]}, used only in wing {next(iter(used))})" for name, used in users.items()
                 if home[name] is not None and len(used) == 1 and next(iter(used)) - home[name] > 1)
    assert far == []
    assert users["CombinedLoss"] == {1} and home["CombinedLoss"] == 0  # the rule can see a helper one wing above its user


def _heading_anchors(markdown: str) -> set[str]:
    """The anchors a Markdown renderer gives the headings (GitHub's rule: lower case, punctuation dropped, spaces to hyphens)."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in markdown.splitlines() if re.match(r"#{1,6} ", line)}


@pytest.mark.parametrize("document", ["README.md", "STANDALONE_TRAINING.md", "docs/notebook.md", "docs/science.md", "docs/benchmarks/README.md"])
def test_every_link_of_a_document_is_a_file_of_the_repository(document):
    """Relative links resolve inside the repository: nothing is cited that a clone lacks, and a
    link to a heading of a Markdown file names one that is there."""
    path = HERE / document
    targets = re.findall(r"\]\(([^)\s]+)\)", path.read_text())
    local = [t for t in targets if not re.match(r"[a-z]+://|#|mailto:", t)]
    assert local, f"{document} links to no file"
    for target in local:
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve()
        assert resolved.exists() and resolved.is_relative_to(HERE), f"{document} links to {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in _heading_anchors(resolved.read_text()), f"{document} links to {target}: no such heading"


# ----------------------------------------------------------------------------
# Help that answers
# ----------------------------------------------------------------------------

COMMANDS = ("train", "evaluate", "predict", "sweep", "compare", "export", "register", "fetch")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_has_a_description_an_example_help_and_defaults(command, capsys):
    sub = st.build_parser()._subparsers._group_actions[0].choices[command]
    with pytest.raises(SystemExit) as stop:
        st.main([command, "--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0 and sub.description and len(sub.description) > 40
    assert f"example:\n  python standalone_training.py {command} " in text
    for action in sub._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings[0]} has no help text"
            if action.default not in (None, False, "", [], argparse.SUPPRESS):
                assert "%(default)s" in sub.formatter_class(command)._get_help_string(action), action.option_strings[0]
    if command in ("train", "sweep", "compare"):  # training flags name the TrainConfig default they stand for
        assert f"(default: {st.TrainConfig().samples})" in " ".join(text.split())
        assert f"(default: {st.TrainConfig().seed})" in " ".join(text.split())


@pytest.mark.parametrize("command", COMMANDS)
def test_every_flag_of_a_command_reaches_what_runs_it(command):
    """No flag is parsed and then dropped: each names a parameter of the command's run function
    (main passes the flags by name) or a TrainConfig field (config_from_args)."""
    import dataclasses
    import inspect

    sub = st.build_parser()._subparsers._group_actions[0].choices[command]
    takers = {"train": [st.run_training], "evaluate": [st.run_evaluation], "predict": [st.run_prediction, st.run_pairs],
              "sweep": [st.run_sweep], "compare": [st.run_compare], "export": [st.export_weights], "register": [st.register_model],
              "fetch": [st.run_fetch]}[command]
    names = set().union(*(inspect.signature(f).parameters for f in takers))
    if command in ("train", "sweep", "compare"):
        names |= {f.name for f in dataclasses.fields(st.TrainConfig)}
    if command == "sweep":
        names.add("space")  # handed to run_sweep as space_path
    flags = {a.dest for a in sub._actions if a.option_strings} - {"help", "debug"}
    assert flags <= names, sorted(flags - names)
    assert sub.get_default("run").__name__ == f"_{command}_command"


@pytest.mark.parametrize("argv", [["--debug", "evaluate", "--samples", "0"], ["evaluate", "--debug", "--samples", "0"], ["evaluate", "--samples", "0", "--debug"]])
def test_debug_is_accepted_before_or_after_the_command(argv, capsys):
    with pytest.raises(st.ConfigError, match="samples must be >= 1"):  # --debug: the traceback's exception, not the one line
        st.main(argv)
    assert st.main([a for a in argv if a != "--debug"]) == 2
    assert capsys.readouterr().err.strip() == "astrid: error: samples must be >= 1, got 0"
