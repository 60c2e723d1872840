"""Specification of trust on real skies: where nothing changed, AstrID finds nothing.

pairs with no change (identical, fresh noise, another flux scale) -> zero or almost zero
detections; any image size, NaN footprints -> no detection from borders; one photometric scale
(the fitted flux ratio) -> real changes are still found; the randomised training sky.

The null battery runs the shipped weights through `find_changes`, the very path of `predict`,
on simulated static skies and on the real DSS cutout of M13 that astropy ships (never used in
training). The figures it is held to are the ones STANDALONE_TRAINING.md documents.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import fits
from scipy import ndimage

import standalone_training as st
from conftest import cli_env

HERE = Path(__file__).resolve().parent
CPU = torch.device("cpu")
DOCUMENTED = json.loads((HERE / "docs" / "evaluation" / "evaluation.json").read_text())
MAX_FALSE_PER_MEGAPIXEL = 1.0  # the bar for noise-only and flux-ratio null pairs


@pytest.fixture(scope="module")
def shipped():
    """The shipped model and its operating threshold."""
    payload = st.load_checkpoint(st.DEFAULT_WEIGHTS)
    model = st.model_from_checkpoint(payload)
    model.eval()
    return model, payload["threshold"]


@pytest.fixture(scope="module")
def frames():
    return st.null_frames(synthetic=2)


@pytest.fixture(scope="module")
def battery(shipped, frames):
    model, threshold = shipped
    return st.null_battery(model, frames, threshold=threshold, device=CPU)


def m13() -> np.ndarray:
    return st.read_fits_image(st.M13_FITS)[0]


# ----------------------------------------------------------------------------
# The null battery
# ----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_battery_covers_simulated_and_real_frames(frames, battery):
    names = [f.name for f in frames]
    assert sum(n.startswith("simulated") for n in names) == 2 and any("M13" in n for n in names)
    per_frame = (1 + len(st.NULL_NOISE_LEVELS) * len(st.NULL_NOISE_RATIOS) + len(st.NULL_FLUX_RATIOS) + len(st.NULL_SEEING_RATIOS)
                 + len(st.NULL_GRADIENTS) + len(st.NULL_SHIFTS) + 1)
    assert battery["summary"]["pairs"] == per_frame * len(frames)
    kinds = {c["kind"] for r in battery["frames"] for c in r["cases"]}
    assert kinds == {"identical", *st.NULL_KINDS}


def cases_of(battery: dict, kind: str):
    """(frame name, case) for every null pair of one kind, over every frame of the battery."""
    for report in battery["frames"]:
        for case in report["cases"]:
            if case["kind"] == kind:
                yield report["frame"], case


@pytest.mark.slow
def test_identical_pairs_give_zero_detections(battery):
    for report in battery["frames"]:
        assert report["identical_detections"] == 0, report["frame"]


@pytest.mark.slow
def test_noise_only_pairs_stay_under_one_false_detection_per_megapixel(battery):
    """Every depth ratio from 1/3 to 10 and every noise level from 1/4 to 4x the frame's own."""
    for frame, case in cases_of(battery, "noise"):
        assert "refused" not in case, case
        assert case["per_megapixel"] <= MAX_FALSE_PER_MEGAPIXEL, (frame, case)


@pytest.mark.slow
def test_seeing_mismatch_pairs_give_no_false_detection(battery):
    """The science epoch blurred to 1.25x and 1.5x the frame's seeing: PSF matching, then nothing."""
    for frame, case in cases_of(battery, "seeing"):
        assert case["detections"] == 0, (frame, case)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gradient", "shift", "correlated"])
def test_gradient_shifted_and_correlated_noise_pairs_give_no_false_detection(battery, kind):
    """A 5 or 20 sigma ramp in one epoch, a 0.3 px residual shift, noise correlated over ~2 px: nothing changed, nothing found."""
    cases = list(cases_of(battery, kind))
    assert len(cases) == len(battery["frames"]) * {"gradient": len(st.NULL_GRADIENTS), "shift": len(st.NULL_SHIFTS), "correlated": 1}[kind]
    for frame, case in cases:
        assert "refused" not in case, case
        assert case["detections"] == 0, (frame, case)


@pytest.mark.slow
def test_flux_ratio_pairs_stay_under_one_false_detection_per_megapixel(battery):
    for frame, case in cases_of(battery, "flux"):
        assert "refused" not in case, case
        assert case["fitted_flux_ratio"] == pytest.approx(case["flux_ratio"], rel=0.02), case
        assert case["per_megapixel"] <= MAX_FALSE_PER_MEGAPIXEL, (frame, case)


@pytest.mark.slow
def test_the_documented_null_figures_are_what_the_battery_measures(battery):
    """`evaluate` wrote the documented battery with the same frames, seeds and weights."""
    documented = DOCUMENTED["null"]["summary"]
    assert battery["summary"]["identical_detections"] == documented["identical_detections"] == 0
    assert documented["noise_per_megapixel_max"] <= MAX_FALSE_PER_MEGAPIXEL
    assert documented["flux_per_megapixel_max"] <= MAX_FALSE_PER_MEGAPIXEL
    ours = {r["frame"]: r for r in battery["frames"]}
    for report in DOCUMENTED["null"]["frames"]:
        if report["frame"] in ours:  # evaluate may have had --fits-dir frames too
            assert ours[report["frame"]]["noise_per_megapixel_max"] == pytest.approx(report["noise_per_megapixel_max"])


# ----------------------------------------------------------------------------
# Borders, odd sizes and missing pixels
# ----------------------------------------------------------------------------

BORDER_SIZES = [17, 24, 31, 33, 47, 63, 100, 118, 150, 180, 200, 208, 255, 257, 300]


@pytest.mark.parametrize("size", BORDER_SIZES)
def test_pure_noise_of_any_size_gives_no_detection(shipped, size):
    """Sizes that are not multiples of 16 are padded with mirrored sky, never a flat band."""
    model, threshold = shipped
    rng = np.random.default_rng(size)
    shape = (size, size + 5)  # rectangular too
    reference, science = (1000.0 + rng.normal(0, 30, shape) for _ in range(2))
    found = st.find_changes(model, reference, science, threshold=threshold, device=CPU, flux_ratio=1.0)
    assert found.detections == [], found.detections
    assert found.prob.shape == shape


@pytest.mark.parametrize("hole", ["corner", "strip", "rows", "diagonal"])
@pytest.mark.parametrize("frame_index", [0, 2])  # a simulated sky, and M13
def test_nan_footprints_give_no_detection_and_zero_probability(shipped, frames, hole, frame_index):
    model, threshold = shipped
    frame = frames[frame_index].data
    rng = np.random.default_rng(3)
    sigma = st.robust_background(frame)[1]
    reference = frame + rng.normal(0, sigma, frame.shape)
    science = frame + rng.normal(0, sigma, frame.shape)
    yy, xx = np.mgrid[: frame.shape[0], : frame.shape[1]]
    missing = {"corner": (yy < 90) & (xx < 120), "strip": (xx >= 100) & (xx < 140),
               "rows": (yy >= 200) & (yy < 230), "diagonal": xx + yy < 150}[hole]
    reference[missing] = np.nan
    found = st.find_changes(model, reference, science, threshold=threshold, device=CPU)
    assert found.detections == []
    assert np.all(found.prob[missing] == 0.0)


def test_missing_pixels_normalise_to_blank_sky_the_same_way_every_time():
    rng = np.random.default_rng(0)
    reference, science = rng.normal(100, 5, (2, 64, 64))
    reference[:10] = np.nan
    first, second = st.normalize_pair(reference, science), st.normalize_pair(reference, science)
    np.testing.assert_array_equal(first, second)
    blank = first[:, :10]
    assert np.all(np.isfinite(blank)) and abs(float(blank.mean())) < 0.1
    assert 0.7 < float(np.sinh(blank).std()) < 1.3  # unit noise, before the asinh stretch


# ----------------------------------------------------------------------------
# One photometric scale: the flux ratio
# ----------------------------------------------------------------------------

FLUX_RATIOS = [0.1, 0.3, 1.0, 3.0, 10.0]


@pytest.mark.parametrize("ratio", FLUX_RATIOS)
def test_the_flux_ratio_is_fitted_on_a_simulated_sky(frames, ratio):
    frame = frames[0].data
    rng = np.random.default_rng(1)
    sigma = st.robust_background(frame)[1]
    reference = frame + rng.normal(0, sigma, frame.shape)
    science = ratio * (frame + rng.normal(0, sigma, frame.shape)) + 250.0  # another zero point too
    fit = st.fit_flux_scale(reference, science)
    assert fit.ratio == pytest.approx(ratio, rel=0.01)
    assert fit.n_stars >= st.FLUX_FIT_MIN_STARS and fit.agreeing >= 0.5


@pytest.mark.parametrize("ratio", FLUX_RATIOS)
def test_the_flux_ratio_is_fitted_on_m13_despite_its_saturated_cores(ratio):
    frame = m13()
    fit = st.fit_flux_scale(frame, ratio * frame)
    assert fit.ratio == pytest.approx(ratio, rel=1e-6)


def test_variable_stars_do_not_move_the_fitted_ratio(frames):
    """A minority of stars that changed is voted out by the Theil-Sen slope."""
    frame = frames[0].data
    rng = np.random.default_rng(2)
    sigma = st.robust_background(frame)[1]
    reference = frame + rng.normal(0, sigma, frame.shape)
    science = 2.0 * (frame + rng.normal(0, sigma, frame.shape))
    peaks = np.argwhere((frame == ndimage.maximum_filter(frame, 11)) & (frame > np.median(frame) + 30 * sigma))
    varied = peaks[::5]  # one bright star in five brightens by about its own flux
    height = frame[varied[:, 0], varied[:, 1]] - np.median(frame)
    fwhm = st.measure_psf_fwhm(frame).fwhm
    science += st.render_points(frame.shape, varied[:, 1], varied[:, 0], height * 2 * np.pi * (fwhm / 2.3548) ** 2, st.PSF(fwhm, st.ASSUMED_MOFFAT_BETA))
    assert len(varied) >= 5
    assert st.fit_flux_scale(reference, science).ratio == pytest.approx(2.0, rel=0.01)


def test_a_pair_with_no_stars_cannot_be_fitted_and_says_what_to_do():
    rng = np.random.default_rng(4)
    reference, science = rng.normal(100, 5, (2, 128, 128))
    with pytest.raises(st.DataError, match=r"cannot fit the flux ratio.*--flux-ratio"):
        st.fit_flux_scale(reference, science)


def test_the_difference_channel_does_not_depend_on_the_flux_scale(frames):
    frame = frames[1].data
    rng = np.random.default_rng(5)
    sigma = st.robust_background(frame)[1]
    reference = frame + rng.normal(0, sigma, frame.shape)
    science = frame + rng.normal(0, sigma, frame.shape)
    same = st.normalize_pair(reference, science)
    scaled = st.normalize_pair(reference, 7.0 * science + 3.0, statistics=st.pair_statistics(reference, 7.0 * science + 3.0, flux_ratio=7.0))
    np.testing.assert_allclose(scaled, same, atol=2e-3)


def test_a_change_is_still_found_at_another_flux_scale(shipped):
    """A bright transient injected into M13, science at 3x the reference's scale: found, and alone."""
    model, threshold = shipped
    frame = m13()
    rng = np.random.default_rng(6)
    sigma = st.robust_background(frame)[1]
    reference = frame + rng.normal(0, sigma, frame.shape)
    science = frame + rng.normal(0, sigma, frame.shape)
    x, y = 60.3, 230.6  # off the cluster's core
    fwhm = st.measure_psf_fwhm(frame).fwhm
    science += st.render_points(frame.shape, [x], [y], [40 * sigma * 2 * np.pi * (fwhm / 2.3548) ** 2 * 2], st.PSF(fwhm, st.ASSUMED_MOFFAT_BETA))
    found = st.find_changes(model, reference, 3.0 * science, threshold=threshold, device=CPU)
    assert found.pair.scale["flux_ratio"] == pytest.approx(3.0, rel=0.02)
    assert len(found.detections) == 1
    assert np.hypot(found.detections[0]["x"] - x, found.detections[0]["y"] - y) <= 2.0


def test_identical_frames_have_a_silent_difference():
    frame = m13()
    statistics = st.pair_statistics(frame, frame)
    assert statistics.sigma_difference == pytest.approx(st.DIFFERENCE_NOISE_FLOOR * np.hypot(statistics.sigma_science, statistics.sigma_reference))
    assert np.all(st.normalize_pair(frame, frame)[2] == 0.0)
    # S_corr of a frame minus a copy of itself is round-off held to the noise floor: far below any gate.
    pair = st.subtract_pair(frame, frame, flux_ratio=1.0, seeing=(3.0, 3.0))
    assert np.max(np.abs(pair.subtraction.significance)) < 1e-6


# ----------------------------------------------------------------------------
# The significance of a difference, and the gate
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("correlation", [0.0, 0.8])
def test_significance_is_in_units_of_its_own_noise_even_when_pixels_are_correlated(correlation):
    """S_corr is calibrated on its own pixels, so it includes the correlation a per-pixel sigma misses."""
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 1, (2, 256, 256))
    if correlation:
        noise = ndimage.gaussian_filter(noise, (0, correlation, correlation))
    reference, science = 50.0 + noise
    significance = st.subtract_pair(reference, science, flux_ratio=1.0, seeing=(2.5, 2.5)).subtraction.significance
    assert st.robust_sigma(significance[16:-16, 16:-16]) == pytest.approx(1.0, rel=0.05)


def test_candidates_come_from_the_difference_and_the_network_vetoes():
    prob = np.zeros((32, 32))
    prob[5:8, 5:8] = 0.95  # the network fires here and there
    prob[20:23, 20:23] = 0.95
    significance = np.zeros((32, 32))
    significance[21, 22] = -7.0  # a fading source on the second component's edge
    significance[12, 28] = 9.0  # significant, but the network sees nothing there
    kept = st.detect_changes(prob, significance, threshold=0.5)
    assert [(round(d["x"]), round(d["y"])) for d in kept] == [(22, 21)]  # the position is the difference's
    assert kept[0]["significance"] == 7.0 and kept[0]["sign"] == -1
    assert kept[0]["area_px"] == 9  # the footprint is the network's component
    assert st.detect_changes(prob, significance, threshold=0.5, gate=7.5) == []
    # The network must fire on the candidate's own central pixels: one pixel beside its footprint is a veto.
    beside = np.zeros((32, 32))
    beside[21, 23] = -7.0
    assert st.detect_changes(prob, beside, threshold=0.5) == []


def test_opposite_lobes_under_one_footprint_are_one_change():
    prob = np.zeros((32, 32))
    prob[10:20, 10:20] = 0.99
    significance = np.zeros((32, 32))
    significance[14, 12], significance[14, 17] = 30.0, -8.0  # a dipole's strong and weak lobes
    significance[25, 25] = 6.0  # elsewhere, unseen by the network
    kept = st.detect_changes(prob, significance, threshold=0.5)
    assert [(round(d["x"]), round(d["y"]), d["sign"]) for d in kept] == [(12, 14, 1)]


# ----------------------------------------------------------------------------
# predict on null pairs, through the CLI
# ----------------------------------------------------------------------------


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "standalone_training.py"), *args], cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_predict_on_m13_against_itself_and_at_three_times_its_flux_finds_nothing(tmp_path):
    frame = m13()
    fits.PrimaryHDU(frame).writeto(tmp_path / "m13.fits")
    fits.PrimaryHDU(3.0 * frame + 40.0).writeto(tmp_path / "m13x3.fits")
    for name, science in (("same", "m13.fits"), ("x3", "m13x3.fits")):
        result = run_cli("predict", "--science", science, "--reference", "m13.fits", "--output-dir", name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("0 detections"), result.stdout
        record = json.loads((tmp_path / name / "detections.json").read_text())
        assert record["flux_ratio_source"] == "fitted on the stars"
        assert record["flux_ratio"] == pytest.approx(1.0 if name == "same" else 3.0, rel=1e-6)
        assert (tmp_path / name / "detections.csv").read_text().splitlines() == [",".join(st.DETECTION_COLUMNS)]


@pytest.mark.slow
def test_predict_refuses_a_pair_it_cannot_put_on_one_scale_in_one_line(tmp_path):
    rng = np.random.default_rng(8)
    for name in ("ref", "sci"):
        fits.PrimaryHDU(rng.normal(100, 5, (96, 96))).writeto(tmp_path / f"{name}.fits")
    result = run_cli("predict", "--science", "sci.fits", "--reference", "ref.fits", "--output-dir", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cannot find the flux ratio" in result.stderr and "Traceback" not in result.stderr
    given = run_cli("predict", "--science", "sci.fits", "--reference", "ref.fits", "--output-dir", "out", "--flux-ratio", "1", cwd=tmp_path)
    assert given.returncode == 0, given.stderr
    assert json.loads((tmp_path / "out" / "detections.json").read_text())["flux_ratio_source"] == "given"


# ----------------------------------------------------------------------------
# The training sky: randomised, with null pairs, and the default sky untouched
# ----------------------------------------------------------------------------


def test_the_default_sky_draws_nothing_for_randomisation():
    rng = np.random.default_rng(9)
    before = rng.bit_generator.state
    style = st._draw_style(rng, st.SkyConfig())
    assert rng.bit_generator.state == before
    assert set(style.values()) == {None}


def test_the_training_sky_holds_null_pairs_and_plate_scans():
    sky = st.dataclasses.replace(st.TRAINING_SKY, identical_fraction=0.5, quiet_fraction=0.0, plate_fraction=0.5)
    ds = st.SyntheticAstronomicalDataset(24, image_size=64, sky=sky, seed=3)
    identical = plates = 0
    for i in range(len(ds)):
        sample = ds.simulate(i)
        if np.array_equal(sample.reference, sample.science):
            identical += 1
            assert not sample.mask.any() and all(o["type"] not in st.ANOMALY_TYPES for o in sample.truth)
        plates += bool(np.all(sample.reference == np.round(sample.reference)))
    assert 4 <= identical <= 20 and 4 <= plates <= 20


def test_the_widened_sky_ramps_one_epoch_and_puts_bright_hosts_under_a_dark_sky():
    """gradient_fraction: a linear ramp in one epoch only; bright_host_fraction: a dark sky with a bright galaxy that hosts the supernovae."""
    ramp = st.sky_ramp((40, 64), rise=7.0, angle=np.radians(30))
    assert np.ptp(ramp) == pytest.approx(7.0) and abs(ramp.mean()) < 1e-9
    assert ramp[20, 63] > ramp[20, 0] and ramp[39, 32] > ramp[0, 32]  # rising along x and y at 30 degrees
    styles = [st._draw_style(np.random.default_rng(k), st.SkyConfig(gradient_fraction=1.0)) for k in range(40)]
    assert all(0.5 <= s_["gradient"]["sigma"] <= 20.0 for s_ in styles) and {s_["gradient"]["epoch"] for s_ in styles} == {"reference", "science"}
    # In a sample, the ramp is in one epoch: the smoothed difference of the epochs is a plane.
    sample = st.simulate_sky(np.random.default_rng(5), image_size=64, sky=st.SkyConfig(gradient_fraction=1.0, empty_fraction=1.0))
    smooth = ndimage.median_filter(sample.science.astype(np.float64) - sample.reference, size=9)
    plain = st.simulate_sky(np.random.default_rng(5), image_size=64, sky=st.SkyConfig(empty_fraction=1.0))
    flat = ndimage.median_filter(plain.science.astype(np.float64) - plain.reference, size=9)
    assert np.ptp(smooth[8:-8, 8:-8]) > 2 * np.ptp(flat[8:-8, 8:-8])
    hosted = st.SkyConfig(bright_host_fraction=1.0)
    ds = st.SyntheticAstronomicalDataset(12, image_size=64, sky=hosted, seed=8)
    for i in range(len(ds)):
        sample = ds.simulate(i)
        assert np.median(sample.reference) < 400 and sample.reference.max() > 20 * np.median(sample.reference)
    assert any(o["type"] == "supernova" for i in range(len(ds)) for o in ds.truth(i))


def test_mixed_data_takes_the_asked_share_of_real_tiles(tmp_path):
    (tmp_path / "m13.fits").write_bytes(st.M13_FITS.read_bytes())
    real = st.MASTRealDataset(200, image_size=64, source="fits", fits_dir=tmp_path)
    synthetic = st.SyntheticAstronomicalDataset(200, image_size=64)
    mixed = st.MixedDataset(synthetic, real, real_fraction=0.3, seed=1)
    again = st.MixedDataset(synthetic, real, real_fraction=0.3, seed=1)
    np.testing.assert_array_equal(mixed.is_real, again.is_real)
    provenance = mixed.provenance()
    assert 0.2 <= provenance["real_fraction"] <= 0.4
    assert provenance["real_samples"] + provenance["synthetic_samples"] == 200
    i = int(np.flatnonzero(mixed.is_real)[0])
    np.testing.assert_array_equal(mixed[i][0].numpy(), real[i][0].numpy())
    j = int(np.flatnonzero(~mixed.is_real)[0])
    np.testing.assert_array_equal(mixed[j][0].numpy(), synthetic[j][0].numpy())


def test_plain_fields_of_the_training_sky_follow_the_plain_sky():
    plain = st.SyntheticAstronomicalDataset(40, image_size=32, sky=st.dataclasses.replace(st.TRAINING_SKY, plain_fraction=1.0), seed=4)
    wide = st.SyntheticAstronomicalDataset(40, image_size=32, sky=st.dataclasses.replace(st.TRAINING_SKY, plain_fraction=0.0), seed=4)
    lo, hi = st.SkyConfig().fwhm_reference
    assert all(lo <= plain.simulate(i).psf_reference.fwhm <= hi for i in range(40))
    assert any(not lo <= wide.simulate(i).psf_reference.fwhm <= hi for i in range(40))


# ----------------------------------------------------------------------------
# Seeing: measured on the same stars, matched before differencing
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("noise", [1.0, 2.5, 3.0])
def test_the_seeing_of_one_frame_under_different_noise_is_one_seeing(frames, noise):
    """Paired per-star ratios: a noisier copy of a frame has its seeing, and needs no blur."""
    frame = frames[1].data
    rng = np.random.default_rng(10)
    sigma = st.robust_background(frame)[1]
    reference = frame + rng.normal(0, 0.25 * sigma, frame.shape)
    science = frame + rng.normal(0, noise * sigma, frame.shape)
    psf_reference, psf_science = st.measure_seeing(reference, science)
    assert psf_reference.measured and psf_science.measured
    assert psf_science.fwhm / psf_reference.fwhm == pytest.approx(1.0, abs=0.05)
    assert st.matching_blur(psf_reference.fwhm, psf_science.fwhm) == (0.0, 0.0)


def test_a_blurred_science_epoch_is_measured_and_matched(frames):
    frame = frames[0].data
    fwhm = st.measure_psf_fwhm(frame).fwhm
    blur = np.sqrt(1.5**2 - 1.0) * fwhm / 2.3548
    science = ndimage.gaussian_filter(frame, blur)
    psf_reference, psf_science = st.measure_seeing(frame, science)
    assert psf_science.fwhm / psf_reference.fwhm == pytest.approx(1.5, rel=0.1)
    blur_reference, blur_science = st.matching_blur(psf_reference.fwhm, psf_science.fwhm)
    assert blur_science == 0.0 and blur_reference == pytest.approx(blur, rel=0.15)
    statistics = st.pair_statistics(frame, science, fwhm_reference=psf_reference.fwhm, fwhm_science=psf_science.fwhm)
    unmatched = st.pair_statistics(frame, science)
    # Matched, the bright stars' rings shrink: the difference's largest residual falls.
    assert np.abs(st.scaled_difference(frame, science, statistics)).max() < 0.5 * np.abs(st.scaled_difference(frame, science, unmatched)).max()


@pytest.mark.slow
def test_init_weights_of_another_width_is_refused_in_one_line(tmp_path):
    narrow = st.StandaloneUNet(width=8)
    st.save_checkpoint(tmp_path / "narrow.pt", {"model": narrow.state_dict(), "model_config": narrow.config})
    result = subprocess.run(
        [sys.executable, str(HERE / "standalone_training.py"), "train", "--samples", "8", "--epochs", "1", "--batch-size", "4", "--image-size", "32",
         "--test-samples", "2", "--no-mlflow", "--no-energy", "--device", "cpu", "--init-weights", str(tmp_path / "narrow.pt"), "--output-dir", str(tmp_path / "run")],
        env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "init-weights" in result.stderr and "width" in result.stderr and "Traceback" not in result.stderr
