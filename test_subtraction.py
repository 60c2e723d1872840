"""Specification of the subtraction: pixels -> registration -> local backgrounds -> flux ratio -> ZOGY -> candidates.

Each test builds a small scene with known truth (shifts, ramps, ratios, SNRs) from the
module's own PSF renderer, so that what is asserted is the property the docs promise:
registration to a few hundredths of a pixel, backgrounds that follow gradients, noise that
survives quantisation, ZOGY's calibrated statistics, deblending, and a flux ratio from the
best source there is. Scenes are 96-128 px and shared where they can be.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage

import standalone_training as st

SIGMA = 5.0  # background noise of every scene, in its units
SKY = 100.0
FWHM = 3.0


def star_field(n: int, *, stars: int, seed: int, fwhm: float = FWHM, flux: tuple[float, float] = (2e3, 4e4),
               shift: tuple[float, float] = (0.0, 0.0), margin: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free stars on an n x n grid (their image and their (x, y, flux) table), the whole scene moved by `shift`."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(margin, n - margin, stars)
    y = rng.uniform(margin, n - margin, stars)
    f = np.exp(rng.uniform(*np.log(flux), stars))
    image = st.render_points((n, n), x + shift[0], y + shift[1], f, st.PSF(fwhm, 3.5))
    return image, np.column_stack([x, y, f])


def noisy(image: np.ndarray, seed: int, sigma: float = SIGMA) -> np.ndarray:
    return SKY + image + np.random.default_rng(seed).normal(0.0, sigma, image.shape)


def interior(a: np.ndarray, margin: int = 16) -> np.ndarray:
    return a[margin:-margin, margin:-margin]


# ----------------------------------------------------------------------------
# Pixels that are data; noise and backgrounds
# ----------------------------------------------------------------------------


def test_sentinels_overflows_and_zero_footprints_become_missing():
    image = np.random.default_rng(0).normal(10.0, 1.0, (64, 64))
    image[5, 5] = 1e30
    image[6, 6] = -np.inf
    image[:, 40:] = 0.0  # outside a resampled frame's footprint
    image[20, 20] = 0.0  # a lone exact zero is a measurement
    data = st.as_data(image)
    assert np.isnan(data[5, 5]) and np.isnan(data[6, 6])
    assert np.isnan(data[:, 40:]).all()
    assert data[20, 20] == 0.0
    assert np.isfinite(data[:, :40]).sum() == 64 * 40 - 2


@pytest.mark.parametrize("step", [0.0, 1.0, 3.0])
def test_noise_survives_quantisation(step):
    values = np.random.default_rng(1).normal(0.0, 1.0, 200_000)
    if step:
        values = np.round(values / step) * step
    # The noise of the quantised pixels is their own scatter (at a step of 3 sigma the MAD is 0).
    assert st.robust_sigma(values) == pytest.approx(np.std(values), rel=0.1)
    assert st.robust_sigma(values) >= 0.9


def test_the_shortcuts_of_large_frames_give_what_the_whole_frame_filters_give():
    """find_stars' maxima tested pixel by pixel equal whole-frame max/min filters (ties and holes included), the mesh's
    separable spline equals map_coordinates, and whole-frame statistics read a prime-strided subsample past their limit."""
    rng = np.random.default_rng(7)
    for trial in range(12):
        image = ndimage.uniform_filter(rng.normal(0, 1, (60 + trial, 75)), 1 + trial % 3) * 10
        image = np.round(image) if trial % 3 == 0 else image  # plateaus: equal neighbours
        usable = rng.random(image.shape) > 0.02
        ys, xs = np.nonzero(image >= trial / 4)
        clean = ndimage.minimum_filter(usable, size=9, mode="constant", cval=0)
        expected = (image == ndimage.maximum_filter(image, size=7)) & (image >= trial / 4) & clean
        assert list(zip(*st._clean_maxima(image, usable, ys, xs))) == list(zip(*np.nonzero(expected)))
    for shape, side in [((300, 280), 64), ((100, 150), 50), ((64, 64), 16)]:  # every mesh holds >= 50 values
        values, use = rng.normal(0, 1, shape), rng.random(shape) > 0.1
        grid_shape = (math.ceil(shape[0] / side), math.ceil(shape[1] / side))
        rows = np.clip((np.arange(shape[0]) + 0.5) / side - 0.5, 0, grid_shape[0] - 1)
        cols = np.clip((np.arange(shape[1]) + 0.5) / side - 0.5, 0, grid_shape[1] - 1)
        grid = np.array([[st.robust_sigma(values[i * side:(i + 1) * side, j * side:(j + 1) * side][
            use[i * side:(i + 1) * side, j * side:(j + 1) * side]]) for j in range(grid_shape[1])]
            for i in range(grid_shape[0])])
        grid = ndimage.median_filter(grid, size=3, mode="nearest")
        order = 3 if min(grid_shape) >= 4 else 1
        expected = ndimage.map_coordinates(grid, np.meshgrid(rows, cols, indexing="ij"), order=order, mode="nearest")
        np.testing.assert_allclose(st._mesh_noise(values, use, side=side, filter_size=3), expected, rtol=1e-12)
    small = np.arange(st.STATISTICS_SAMPLE, dtype=np.float32)
    assert st.statistics_sample(small).size == small.size  # read whole up to the limit
    large = np.zeros(4 * st.STATISTICS_SAMPLE + 1, dtype=np.float32)
    sample = st.statistics_sample(large)
    stride = large.size // (sample.size - 1)
    assert stride == 5 and sample.size == math.ceil(large.size / 5)  # 5, the first prime past 4.0000002


@pytest.mark.parametrize("kind", ["ramp", "glow"])
def test_local_background_follows_ramps_and_glows(kind):
    n = 256
    yy, xx = np.mgrid[:n, :n]
    if kind == "ramp":
        sky = 20.0 * SIGMA * (xx + yy) / (2 * n)  # 20 sigma corner to corner
    else:
        sky = 15.0 * SIGMA * np.exp(-((xx - 90) ** 2 + (yy - 170) ** 2) / (2 * 100.0**2))  # scattered light of a bright star
    stars, _ = star_field(n, stars=60, seed=2)
    background, rms = st.background_map(noisy(sky + stars, 3))
    residual = np.abs(interior(background - SKY - sky, 32))
    # A 64 px mesh follows a ramp and a glow a few meshes wide to within a fraction of the noise.
    assert np.median(residual) < 0.2 * SIGMA
    assert np.max(residual) < 0.75 * SIGMA
    # The noise comes from neighbouring pixels, in which the sky's slope cancels.
    assert np.median(rms) == pytest.approx(SIGMA, rel=0.1)


def test_the_memory_savers_read_the_same_pixels_as_the_plain_expressions():
    """Large frames are sampled, planed and calibrated a block at a time, without full-frame copies: the values are
    those of the plain whole-frame expressions."""
    rng = np.random.default_rng(4)
    values = rng.normal(size=(2300, 2300)).astype(np.float32)  # 5.3 Mpx: beyond STATISTICS_SAMPLE
    mask = rng.random(values.shape) < 0.9
    assert mask.sum() > st.STATISTICS_SAMPLE
    assert np.array_equal(st.masked_sample(values, mask), st.statistics_sample(values[mask]))
    small = np.zeros((300, 300), dtype=np.float32) + np.arange(300, dtype=np.float32)
    holes = rng.random(small.shape) < 0.95  # 85 000 valid pixels: every fourth fits the plane
    flat = np.flatnonzero(holes)[:: int(holes.sum()) // 20000]
    rows, cols = np.divmod(flat, 300)
    design = np.stack([np.ones(rows.size), cols, rows], axis=1)
    (c, gx, gy), *_ = np.linalg.lstsq(design, small[rows, cols].astype(np.float64), rcond=None)
    expected = (c + gx * np.arange(300)[None, :] + gy * np.arange(300)[:, None]).astype(np.float32)
    assert np.array_equal(st._background_plane(small, holes), expected)
    # A filtered map, finite everywhere, masked by `valid` rather than by NaN: the same maps.
    ramp = (values[:256, :256] + np.linspace(0.0, 5.0, 256, dtype=np.float32)[None, :]).copy()
    inner = np.zeros(ramp.shape, dtype=bool)
    inner[20:-20, 20:-20] = True
    given = st.background_map(ramp, correlated=True, valid=inner)
    nan = st.background_map(np.where(inner, ramp, np.nan), correlated=True)
    assert all(np.array_equal(a, b) for a, b in zip(given, nan))
    assert np.array_equal(ramp, values[:256, :256] + np.linspace(0.0, 5.0, 256, dtype=np.float32)[None, :])  # read only
    assert st.background_map(ramp, correlated=True, noise=False)[1] is None


def test_zogy_reusing_its_callers_variance_maps_gives_the_same_subtraction():
    rng = np.random.default_rng(21)
    source = st.render_points((128, 128), [60.0], [70.0], [800.0], st.PSF(3.0, 3.5))
    reference, science = rng.normal(0.0, SIGMA, (2, 128, 128)) + np.stack([np.zeros((128, 128)), source])
    kw = dict(psf_reference=st.PSF(2.5, 3.5).stamp, psf_science=st.PSF(3.0, 3.5).stamp, sigma_reference=SIGMA,
              sigma_science=SIGMA, flux_ratio=1.0, astrometric_sigma=(0.05, 0.05), flux_systematic=0.01)
    variances = [np.full((128, 128), SIGMA**2, dtype=st.PIXEL_DTYPE) for _ in range(2)]
    plain = st.zogy_subtraction(reference, science, variance_reference=variances[0].copy(),
                                variance_science=variances[1].copy(), **kw)
    reused = st.zogy_subtraction(reference, science, variance_reference=variances[0], variance_science=variances[1],
                                 reuse_variances=True, **kw)
    assert plain.significance.max() > 10
    for name in ("difference", "score", "score_noise", "significance", "local_calibration", "valid"):
        assert np.array_equal(getattr(plain, name), getattr(reused, name)), name
    # their memory now holds S and its noise, and the plain call left its inputs as they were
    assert reused.score is variances[0] and reused.score_noise is variances[1]
    assert plain.score is not variances[0]


def test_a_20_sigma_ramp_in_one_epoch_leaves_the_significance_of_a_change_as_it_was():
    """The ramp is taken out as a plane before the meshes, and S_corr's noise is measured after its own offset:
    a ramp costs no depth (it divided S by 2.5 before)."""
    n, fwhm = 192, FWHM
    stars, _ = star_field(n, stars=120, seed=7)
    psf = st.PSF(fwhm, 3.5)
    unit = st.render_points((n, n), [101.3], [88.6], [1.0], psf)
    flux = 10.0 / st.matched_filter_snr(1.0, unit, np.full((n, n), 2 * SIGMA**2))
    yy, xx = np.mgrid[:n, :n]
    ramp = 20.0 * SIGMA * (xx + yy) / (2 * (n - 1))
    science = noisy(stars + flux * unit, 11)
    peaks = []
    for slope in (0.0, 1.0):
        pair = st.subtract_pair(noisy(stars, 12) + slope * ramp, science, flux_ratio=1.0, seeing=(fwhm, fwhm))
        peaks.append(float(pair.subtraction.significance[86:92, 99:105].max()))
    assert peaks[0] > 7.0 and peaks[1] == pytest.approx(peaks[0], rel=0.1)


# ----------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [(0.1, -0.05), (0.5, 0.3), (-2.0, 1.4)])
def test_stars_alone_register_a_shifted_pair(shift):
    n = 128
    reference, _ = star_field(n, stars=40, seed=4)
    science, _ = star_field(n, stars=40, seed=4, shift=shift)
    registered, reg = st.register_pair(noisy(reference, 5), noisy(science, 6))[:2]
    assert reg.method == "stars"
    assert (reg.dx, reg.dy) == pytest.approx(shift, abs=0.03)
    assert reg.n_stars >= 20 and reg.residual_px < 0.1
    # Resampled onto the science grid, the reference's stars sit where the science's do.
    assert np.isnan(registered).any()  # the strip the shift uncovered has no data


def test_an_aligned_pair_is_not_resampled():
    reference, _ = star_field(96, stars=30, seed=7)
    frame = noisy(reference, 8)
    registered, reg = st.register_pair(frame, noisy(reference, 9))[:2]
    assert np.array_equal(registered, frame)
    assert math.hypot(reg.dx, reg.dy) < st.REGISTRATION_TOLERANCE


def tan_wcs(n: int, *, rotation_deg: float = 0.0, scale: float = 1.0) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = (150.1, 2.2)
    w.wcs.crpix = ((n + 1) / 2, (n + 1) / 2)
    c, s = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    pixel = scale / 3600.0
    w.wcs.cd = np.array([[-c, s], [s, c]]) * pixel
    return w


@pytest.mark.parametrize("rotation_deg, scale", [(0.5, 1.0), (0.0, 1.02), (0.25, 0.99)])
def test_wcs_registers_rotated_and_rescaled_epochs_without_false_changes(rotation_deg, scale):
    """The reference is rendered on a rotated or rescaled grid with a WCS that says so: nothing changed.

    The same stars, with the same total counts and the same seeing in arcsec (FWHM / scale
    px on the reference's larger pixels); the seeing and the flux ratio are measured, as
    predict measures them.
    """
    n = 128
    _, table = star_field(n, stars=50, seed=10, margin=16)
    w_sci, w_ref = tan_wcs(n), tan_wcs(n, rotation_deg=rotation_deg, scale=scale)
    world = w_sci.pixel_to_world(table[:, 0], table[:, 1])
    xr, yr = w_ref.world_to_pixel(world)
    science = noisy(st.render_points((n, n), table[:, 0], table[:, 1], table[:, 2], st.PSF(FWHM, 3.5)), 11)
    reference = noisy(st.render_points((n, n), xr, yr, table[:, 2], st.PSF(FWHM / scale, 3.5)), 12, sigma=SIGMA / 2)
    pair = st.subtract_pair(reference, science, wcs_reference=w_ref, wcs_science=w_sci)
    # Interpolation keeps surface brightness: on the science grid's smaller pixels each star holds scale^2 more counts.
    assert pair.scale["flux_ratio"] == pytest.approx(1 / scale**2, rel=0.01)
    assert pair.registration.method.startswith("wcs")
    assert pair.registration.warning is None
    candidates, _ = st.significance_candidates(pair.subtraction.significance, gate=st.SIGNIFICANCE_GATE, valid=pair.subtraction.valid)
    assert candidates == []


def test_stars_win_over_a_wrong_wcs_with_a_warning():
    n = 128
    reference, _ = star_field(n, stars=40, seed=13)
    science, _ = star_field(n, stars=40, seed=13, shift=(1.5, -1.2))
    w = tan_wcs(n)
    _, reg, _ = st.register_pair(noisy(reference, 14), noisy(science, 15), wcs_reference=w, wcs_science=w)
    assert (reg.dx, reg.dy) == pytest.approx((1.5, -1.2), abs=0.05)
    assert reg.wcs_disagreement_px == pytest.approx(math.hypot(1.5, 1.2), abs=0.05)
    assert "stars' registration is used" in reg.warning


# ----------------------------------------------------------------------------
# ZOGY
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noise_pair():
    """Pure noise epochs of unequal depth and seeing, subtracted."""
    rng = np.random.default_rng(20)
    reference, science = rng.normal(SKY, SIGMA / 2, (192, 192)), rng.normal(SKY, SIGMA, (192, 192))
    return st.subtract_pair(reference, science, flux_ratio=1.0, seeing=(2.0, 3.2))


def test_proper_difference_is_white_with_unit_variance(noise_pair):
    d = interior(noise_pair.subtraction.difference)
    assert np.std(d) == pytest.approx(1.0, rel=0.05)
    lag = np.corrcoef(d[:, :-1].ravel(), d[:, 1:].ravel())[0, 1]
    assert abs(lag) < 0.05


def test_s_corr_has_unit_variance_on_noise(noise_pair):
    assert np.std(interior(noise_pair.subtraction.significance)) == pytest.approx(1.0, rel=0.08)
    assert noise_pair.subtraction.calibration == pytest.approx(1.0, rel=0.1)  # the noise model was right


def test_s_corr_has_unit_variance_on_correlated_noise():
    """Resampled frames: the per-pixel noise understates the noise at PSF scale; the calibration finds it."""
    rng = np.random.default_rng(21)
    epochs = [ndimage.gaussian_filter(rng.normal(0.0, 1.0, (192, 192)), 0.8) + SKY for _ in range(2)]
    pair = st.subtract_pair(*epochs, flux_ratio=1.0, seeing=(2.5, 2.5))
    assert np.std(interior(pair.subtraction.significance)) == pytest.approx(1.0, rel=0.1)
    assert pair.subtraction.calibration > 1.2  # the per-pixel model alone would have overstated every peak


def test_s_corr_stays_calibrated_on_correlated_noise_among_stars():
    """Correlated noise over a field of stars: its peaks are no sources, so the calibration keeps 5 sigma at 5 sigma (it read 1.6 sigma per sigma before)."""
    frame = st.null_frames(synthetic=1, image_size=128, real=False)[0].data
    sigma = st.robust_background(frame)[1]
    rng = np.random.default_rng(5)

    def smooth_noise():
        noise = ndimage.gaussian_filter(rng.normal(0.0, 1.0, frame.shape), 1.0)
        return noise * sigma / noise.std()

    pair = st.subtract_pair(frame + smooth_noise(), frame + smooth_noise(), flux_ratio=1.0)
    assert np.std(interior(pair.subtraction.significance)) == pytest.approx(1.0, rel=0.1)
    assert np.count_nonzero(np.abs(interior(pair.subtraction.significance)) >= st.SIGNIFICANCE_GATE) <= 2


@pytest.mark.parametrize("snr", [7.0, 20.0])
def test_a_point_source_s_corr_peak_is_its_snr(snr):
    n, x, y = 96, 47.3, 50.6
    psf_r, psf_s = st.PSF(2.2, 3.5), st.PSF(3.0, 3.5)
    unit = st.render_points((n, n), [x], [y], [1.0], psf_s)
    variance = np.full((n, n), SIGMA**2 + (SIGMA / 2) ** 2)
    flux = snr / st.matched_filter_snr(1.0, unit, variance)
    peaks = []
    for seed in range(12):
        rng = np.random.default_rng([22, seed])
        reference = rng.normal(SKY, SIGMA / 2, (n, n))
        science = rng.normal(SKY, SIGMA, (n, n)) + flux * unit
        pair = st.subtract_pair(reference, science, flux_ratio=1.0, seeing=(2.2, 3.0))
        peaks.append(pair.subtraction.significance[int(round(y)) - 1:int(round(y)) + 2, int(round(x)) - 1:int(round(x)) + 2].max())
    assert np.median(peaks) == pytest.approx(snr, rel=0.1)


def test_two_transients_two_fwhm_apart_are_two_candidates():
    n = 96
    unit = st.render_points((n, n), [40.0, 40.0 + 2.3 * FWHM], [48.0, 48.0], [1.0, 1.0], st.PSF(FWHM, 3.5))
    rng = np.random.default_rng(23)
    reference, science = rng.normal(SKY, SIGMA, (n, n)), rng.normal(SKY, SIGMA, (n, n)) + 4000.0 * unit
    z = st.subtract_pair(reference, science, flux_ratio=1.0, seeing=(FWHM, FWHM)).subtraction
    candidates, _ = st.significance_candidates(z.significance, gate=5.0, score=z.score, score_noise=z.score_noise)
    xs = sorted(c["x"] for c in candidates)
    assert len(xs) == 2
    assert xs == pytest.approx([40.0, 40.0 + 2.3 * FWHM], abs=0.5)


def test_label_maxima_agrees_with_scipy_and_says_where_a_label_is_missing():
    from scipy import ndimage

    rng = np.random.default_rng(24)
    values = rng.normal(size=(60, 70))  # continuous: no ties, whose pick scipy leaves to an unstable sort
    labels, n = ndimage.label(rng.random((60, 70)) > 0.7)
    index = rng.permutation(np.arange(1, n + 1))[: n // 2]
    maxima, where = st.label_maxima(values, labels, index)
    assert np.array_equal(maxima, ndimage.maximum(values, labels, index))
    assert where == [tuple(int(v) for v in p) for p in ndimage.maximum_position(values, labels, index)]
    tied = np.zeros((4, 4))
    tied[1, 2] = tied[3, 0] = 1.0
    assert st.label_maxima(tied, np.ones((4, 4), dtype=int), [1])[1] == [(1, 2)]  # ties: the first in raster order
    maxima, where = st.label_maxima(values, labels, [n + 1])
    assert maxima[0] == -np.inf and where == [(0, 0)]  # no pixel: no gate passes it


# ----------------------------------------------------------------------------
# The flux ratio: given, headers, stars, pixels, or a refusal that names them
# ----------------------------------------------------------------------------


def ratio_pair(n: int, stars: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    image, _ = star_field(n, stars=stars, seed=seed, flux=(5e3, 5e4))
    rng = np.random.default_rng([seed, 1])
    reference = image + rng.normal(0.0, SIGMA / 2, (n, n))
    science = ratio * image + rng.normal(0.0, SIGMA, (n, n))
    return reference, science


def flux_record(reference, science, **kw):
    psf = np.array(st.PSF(FWHM, 3.5).stamp)
    return st.pair_flux_ratio(reference, science, psf_reference=psf, psf_science=psf, aperture=10, **kw)


@pytest.mark.parametrize("stars, n, ratio", [(3, 63, 0.1), (3, 128, 10.0), (10, 63, 2.0), (100, 128, 0.5)])
def test_the_flux_ratio_is_fitted_on_few_or_many_stars(stars, n, ratio):
    record = flux_record(*ratio_pair(n, stars, ratio, seed=30 + stars))
    assert record["flux_ratio"] == pytest.approx(ratio, rel=0.03)
    assert record["flux_ratio_error"] > 0
    expected = "fitted on the stars" if stars >= st.FLUX_FIT_MIN_STARS and n >= 128 else "fitted on the PSF-matched pixels"
    assert record["flux_ratio_source"] == expected


def test_header_zero_points_give_the_ratio_before_any_fit():
    reference, science = ratio_pair(64, 0, 1.0, seed=40)
    hr, hs = fits.Header({"MAGZP": 25.0}), fits.Header({"MAGZP": 26.0})
    record = flux_record(reference, science, header_reference=hr, header_science=hs)
    assert record["flux_ratio"] == pytest.approx(10 ** 0.4)
    assert record["flux_ratio_source"] == "headers (MAGZP)"
    record = flux_record(reference, science, header_reference=fits.Header({"FLUXMAG0": 2e10}), header_science=fits.Header({"FLUXMAG0": 5e10}))
    assert record["flux_ratio"] == pytest.approx(2.5)


def test_a_given_ratio_wins_and_an_empty_field_is_refused_naming_what_was_tried():
    reference, science = ratio_pair(64, 0, 1.0, seed=41)
    assert flux_record(reference, science, given=1.7)["flux_ratio_source"] == "given"
    with pytest.raises(st.DataError) as refused:
        flux_record(reference, science, given=None)
    message = str(refused.value)
    assert "\n" not in message
    for tried in ("zero points", "star fit", "pixel fit", "--flux-ratio"):
        assert tried in message


# ----------------------------------------------------------------------------
# Bad pixels do not blind the frame
# ----------------------------------------------------------------------------


def test_one_enormous_pixel_leaves_the_changes_significant():
    n = 128
    image, _ = star_field(n, stars=30, seed=50)
    unit = st.render_points((n, n), [30.0, 90.0], [40.0, 100.0], [1.0, 1.0], st.PSF(FWHM, 3.5))
    reference, science = noisy(image, 51), noisy(image, 52) + 3000.0 * unit
    science[64, 64] = 1e30
    pair = st.subtract_pair(reference, science, flux_ratio=1.0, seeing=(FWHM, FWHM))
    candidates, _ = st.significance_candidates(pair.subtraction.significance, gate=5.0, valid=pair.subtraction.valid)
    found = sorted((round(c["x"]), round(c["y"])) for c in candidates)
    assert found == [(30, 40), (90, 100)]
    assert not pair.subtraction.valid[64, 64]


# ----------------------------------------------------------------------------
# predict on a survey-like pair: other grid, gradient, sparse field, zero points, noise maps
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def survey_pair(tmp_path_factory):
    """A sparse 128 px field: the reference on a grid rotated by 0.3 deg, 1% coarser and shifted, with a ramp
    and another zero point; the science with two new point sources; both with WCS, MAGZP and GAIN."""
    n, scale = 128, 1.01
    root = tmp_path_factory.mktemp("survey")
    _, table = star_field(n, stars=4, seed=60, margin=20, flux=(2e4, 5e4))
    w_sci = tan_wcs(n)
    w_ref = tan_wcs(n, rotation_deg=0.3, scale=scale)
    w_ref.wcs.crpix = [w_ref.wcs.crpix[0] + 0.37, w_ref.wcs.crpix[1] - 0.21]
    xr, yr = w_ref.world_to_pixel(w_sci.pixel_to_world(table[:, 0], table[:, 1]))
    news = [(40.3, 90.7), (95.6, 30.2)]
    unit = st.render_points((n, n), [x for x, _ in news], [y for _, y in news], [1.0, 1.0], st.PSF(FWHM, 3.5))
    rng = np.random.default_rng(61)
    yy, xx = np.mgrid[:n, :n]
    reference = 2.0 * st.render_points((n, n), xr, yr, table[:, 2], st.PSF(FWHM / scale, 3.5)) + SKY + 10 * SIGMA * xx / n
    reference = reference + rng.normal(0.0, SIGMA / 2, (n, n))
    science = st.render_points((n, n), table[:, 0], table[:, 1], table[:, 2], st.PSF(FWHM, 3.5)) + 1500.0 * unit
    science = science + SKY + rng.normal(0.0, SIGMA, (n, n))
    files = {}
    for name, data, w, zp in (("ref", reference, w_ref, 25.0 + 2.5 * math.log10(2.0)), ("sci", science, w_sci, 25.0)):
        header = w.to_header()
        header["MAGZP"], header["GAIN"] = zp, 1000.0
        files[name] = root / f"{name}.fits"
        fits.PrimaryHDU(data.astype(np.float32), header=header).writeto(files[name])
    for name, sigma in (("sci_sigma", np.full((n, n), SIGMA)), ("sci_weight", np.full((n, n), SIGMA ** -2.0)), ("ref_weight", np.full((n, n), (SIGMA / 2) ** -2.0))):
        files[name] = root / f"{name}.fits"
        fits.PrimaryHDU(sigma.astype(np.float32)).writeto(files[name])
    return files, news


def run_predict(files, out, **kw):
    st.run_prediction(science=str(files["sci"]), reference=str(files["ref"]), reference_survey=None, output_dir=str(out), checkpoint=None,
                      threshold=None, device="cpu", max_pixels=st.DEFAULT_MAX_PIXELS, **kw)
    rows = list(csv.DictReader(open(out / "detections.csv")))
    return rows, json.loads((out / "detections.json").read_text())


def test_predict_registers_scales_and_finds_the_changes_of_a_survey_pair(survey_pair, tmp_path):
    files, news = survey_pair
    rows, record = run_predict(files, tmp_path / "out")
    assert record["registration"]["method"] == "wcs+stars"
    assert record["flux_ratio_source"] == "headers (MAGZP)" and record["flux_ratio"] == pytest.approx(0.5)
    assert "Poisson" in record["noise_model"]
    found = sorted((round(float(r["x"])), round(float(r["y"]))) for r in rows)
    assert found == sorted((round(x), round(y)) for x, y in news)
    assert all(float(r["significance"]) >= st.SIGNIFICANCE_GATE for r in rows)


def test_noise_maps_are_used_as_sigma_or_weight(survey_pair, tmp_path):
    files, news = survey_pair
    rows, record = run_predict(files, tmp_path / "out", science_noise=str(files["sci_weight"]), reference_noise=str(files["ref_weight"]), noise_kind="weight")
    assert record["noise_model"] == "noise maps given"
    # The maps hold the true noise: S_corr needs little calibration (resampling smooths the reference a little).
    assert record["significance_calibration"] == pytest.approx(1.0, rel=0.3)
    assert len(rows) == len(news)
    read = dict(shape=(128, 128), max_pixels=st.DEFAULT_MAX_PIXELS, flag="--science-noise")
    assert np.allclose(st.read_noise_map(str(files["sci_sigma"]), kind="sigma", **read), SIGMA)
    assert np.allclose(st.read_noise_map(str(files["sci_weight"]), kind="weight", **read), SIGMA)
    with pytest.raises(st.DataError, match="--science-noise"):
        st.read_noise_map(str(files["sci_sigma"]), kind="sigma", **{**read, "shape": (64, 64)})


# ----------------------------------------------------------------------------
# Types: what changed
# ----------------------------------------------------------------------------

def test_the_type_confusion_matrix_counts_what_was_handed_to_it():
    records = [("transient", "transient", 4.0), ("transient", "supernova", 12.0), ("asteroid", "asteroid", 30.0),
               ("variable_star", "variable_star", 7.0), ("variable_star", "transient", 7.5), ("supernova", "supernova", 40.0)]
    summary = st.summarise_types(records)
    overall = summary["overall"]
    assert overall["n"] == 6 and overall["accuracy"]["count"] == 4 and overall["accuracy"]["total"] == 6
    assert overall["matrix"]["transient"] == {"transient": 1, "variable_star": 0, "supernova": 1, "asteroid": 0}
    assert overall["recall"]["variable_star"]["value"] == 0.5 and overall["precision"]["transient"]["value"] == 0.5
    assert overall["precision"]["supernova"]["count"] == 1 and overall["precision"]["supernova"]["total"] == 2
    assert overall["recall"]["asteroid"]["interval"] == pytest.approx(list(st.wilson_interval(1, 1)))
    assert [b["n"] for b in summary["by_snr"]] == [1, 2, 1, 2]  # 3-5, 5-10, 10-25, >= 25
    assert summary["by_snr"][1]["accuracy"]["count"] == 1 and summary["by_snr"][3]["accuracy"]["count"] == 2
    # A detection within the match radius of a trail's segment types the asteroid; a far one types nothing.
    truth = [dict(type="asteroid", x=20.0, y=20.0, snr=30.0, x1=10.0, y1=20.0, x2=30.0, y2=20.0), dict(type="transient", x=50.0, y=50.0, snr=8.0)]
    detections = [dict(x=13.0, y=21.0, type="asteroid"), dict(x=56.0, y=50.0, type="transient")]
    assert st.type_records(detections, truth) == [("asteroid", "asteroid", 30.0)]


def test_one_change_of_each_type_is_typed_by_the_shipped_weights(tmp_path):
    """A static field with a star, a galaxy and empty sky; the science epoch adds a brighter star,
    a supernova off the galaxy's centre, a new point source and an asteroid trail."""
    n, fwhm = 128, 3.0
    psf = st.PSF(fwhm, 3.5)
    rng = np.random.default_rng(31)
    xs, ys = rng.uniform(8, n - 8, 30), rng.uniform(8, n - 8, 30)
    keep = [(x, y) for x, y in zip(xs, ys) if min(np.hypot(x - 30, y - 30), np.hypot(x - 90, y - 35), np.hypot(x - 30, y - 95), np.hypot(x - 85, y - 95)) > 14]
    stars = st.render_points((n, n), np.array([30.0] + [x for x, _ in keep]), np.array([30.0] + [y for _, y in keep]),
                             np.array([20000.0] + list(rng.uniform(3e3, 3e4, len(keep)))), psf)
    galaxy = st.convolve_psf(st.sersic_image((n, n), [dict(x=90.0, y=35.0, flux=60000.0, half_light_radius=5.0, n=1.5, axis_ratio=0.7, angle=0.4)]), psf)
    static = SKY + stars + galaxy
    changes = st.render_points((n, n), np.array([30.0, 94.0, 30.3]), np.array([30.0, 37.5, 95.4]), np.array([12000.0, 6000.0, 4000.0]), psf)
    tx, ty = st.trail_points(70.0, 88.0, 100.0, 102.0)
    changes += st.render_points((n, n), tx, ty, np.full(tx.size, 9000.0 / tx.size), psf)
    reference = static + rng.normal(0.0, SIGMA, (n, n))
    science = static + changes + rng.normal(0.0, SIGMA, (n, n))
    predictor = st.load_predictor(checkpoint=None, threshold=None, device="cpu")
    found = st.find_changes(predictor.model, reference, science, threshold=predictor.threshold, device=predictor.device, flux_ratio=1.0, seeing=(fwhm, fwhm))

    def typed_at(x, y, radius=3.0):
        near = [d for d in found.detections if np.hypot(d["x"] - x, d["y"] - y) <= radius]
        return near[0]["type"] if near else None

    assert typed_at(30.0, 30.0) == "variable_star"
    assert typed_at(94.0, 37.5) == "supernova"
    assert typed_at(30.3, 95.4) == "transient"
    trail = [d for d in found.detections if d["type"] == "asteroid"]
    assert len(trail) == 1 and 70 <= trail[0]["x"] <= 100
    assert trail[0]["trail_length_px"] == pytest.approx(np.hypot(30, 14), rel=0.35)
    assert trail[0]["trail_angle_deg"] == pytest.approx(np.degrees(np.arctan2(14, 30)), abs=10)
    # The type head gives each change its class probabilities; the rule's type rides along.
    for d in found.detections:
        p = [d[name] for name in st.TYPE_PROBABILITY_COLUMNS]
        assert sum(p) == pytest.approx(1.0, abs=1e-6)
        assert d["type"] == st.ANOMALY_TYPES[int(np.argmax(p))] or d["type"] == d["rule_type"] == "variable_star"
        assert d["rule_type"] in st.ANOMALY_TYPES
    # The catalogue's columns and the DS9 regions carry the types.
    rows = st.detection_catalog(found.detections)
    st.write_detections_csv(tmp_path / "d.csv", rows)
    header = (tmp_path / "d.csv").read_text().splitlines()[0].split(",")
    assert header == list(st.DETECTION_COLUMNS) and {"type", "p_real", *st.TYPE_PROBABILITY_COLUMNS, "trail_length_px", "trail_angle_deg"} <= set(header)
    table = st.detection_table(rows, record={})
    assert all(table[name].description for name in st.TYPE_PROBABILITY_COLUMNS) and not table["p_asteroid"].mask.any()
    st.write_detections_ds9(tmp_path / "d.reg", rows, wcs=None)
    regions = (tmp_path / "d.reg").read_text()
    assert "color=green text={" in regions and " asteroid: " in regions and "color=yellow" in regions and " variable_star: " in regions


def test_a_change_takes_the_type_its_footprint_votes_for_and_an_old_model_keeps_the_rule(tmp_path):
    """p_<type> is the change-probability-weighted mean over the footprint; a checkpoint without a type head loads and types by the rule."""
    n = 48
    rng = np.random.default_rng(3)
    pair = st.subtract_pair(rng.normal(SKY, SIGMA, (n, n)), rng.normal(SKY, SIGMA, (n, n)), flux_ratio=1.0, seeing=(3.0, 3.0))
    prob = np.zeros((n, n), np.float32)
    prob[22:27, 22:27] = 0.9
    type_prob = np.full((4, n, n), 0.25, np.float16)
    type_prob[:, 22:27, 22:27] = np.array([0.1, 0.6, 0.2, 0.1], np.float16)[:, None, None]  # variable star where it changed
    type_prob[:, 30:, 30:] = np.array([0.0, 0.0, 0.0, 1.0], np.float16)[:, None, None]  # an asteroid elsewhere, outside the footprint
    detection = dict(x=24.0, y=24.0, peak=0.9, significance=8.0, sign=1, area_px=25)
    [learned] = st.type_detections([detection], pair, type_prob=type_prob, prob=prob)
    assert learned["type"] == "variable_star" and learned["p_variable_star"] == pytest.approx(0.6, abs=0.01)
    assert learned["rule_type"] == "transient"  # blank sky to the rule
    [ruled] = st.type_detections([detection], pair)
    assert ruled["type"] == ruled["rule_type"] == "transient" and "p_transient" not in ruled
    old = st.StandaloneUNet(width=4, types=0)
    st.save_checkpoint(tmp_path / "old.pt", {"model": old.state_dict(), "model_config": old.config})
    back = st.model_from_checkpoint(st.load_checkpoint(tmp_path / "old.pt"))
    assert back.type_head is None and "types" not in back.config
    assert st.model_from_checkpoint(st.load_checkpoint(st.DEFAULT_WEIGHTS)).config["types"] == len(st.ANOMALY_TYPES)


def test_the_calibrated_typer_reads_the_pairs_cues_and_refuses_a_damaged_calibration(tmp_path, caplog):
    """type_cues sees a star of the reference under one change and blank sky under another; a calibration that weighs
    that cue types them so, keeps the head's probabilities beside its own, and loads only when whole."""
    n, fwhm = 64, 3.0
    psf = st.PSF(fwhm, 3.5)
    rng = np.random.default_rng(5)
    star = st.render_points((n, n), [20.0], [20.0], [20000.0], psf)
    change = st.render_points((n, n), [20.0, 44.0], [20.0, 44.0], [6000.0, 6000.0], psf)
    pair = st.subtract_pair(SKY + star + rng.normal(0, SIGMA, (n, n)), SKY + star + change + rng.normal(0, SIGMA, (n, n)),
                            flux_ratio=1.0, seeing=(fwhm, fwhm))
    prob = np.zeros((n, n), np.float32)
    prob[18:23, 18:23] = prob[42:47, 42:47] = 0.9
    type_prob = np.full((4, n, n), 0.25, np.float16)
    detections = [dict(x=20.0, y=20.0, peak=0.9, significance=40.0, sign=1, area_px=25),
                  dict(x=44.0, y=44.0, peak=0.9, significance=40.0, sign=1, area_px=25)]
    typed = st.type_detections(detections, pair, type_prob=type_prob, prob=prob)
    cues = st.type_cues(typed, pair)
    column = {name: cues[:, k] for k, name in enumerate(st.TYPE_CUES)}
    assert cues.shape == (2, len(st.TYPE_CUES)) and np.isfinite(cues).all()
    assert column["reference_peak"][0] > np.arcsinh(100 / 5) and abs(column["reference_peak"][1]) < np.arcsinh(5 / 5)
    assert column["reference_offset_px"][0] < 1.0 and column["reference_point_fraction"][0] == pytest.approx(1.0, abs=0.25)
    assert list(column["rule_variable_star"]) == [1.0, 0.0]
    # A calibration that reads the reference's peak alone: a star under the change is a variable star.
    k, types = len(st.TYPE_CUES), len(st.ANOMALY_TYPES)
    weight = np.zeros((types, k))
    weight[st.ANOMALY_TYPES.index("variable_star"), st.TYPE_CUES.index("reference_peak")] = 5.0
    saved = dict(classes=list(st.ANOMALY_TYPES), cues=list(st.TYPE_CUES), mean=np.zeros(k), scale=np.ones(k),
                 weight=weight, bias=np.array([1.0, -3.0, 0.0, -1.0]), record=dict(images=1))
    calibration = st.type_calibration_from({"type_calibration": saved})
    on_star, on_sky = st.type_detections(detections, pair, type_prob=type_prob, prob=prob, calibration=calibration)
    assert (on_star["type"], on_sky["type"]) == ("variable_star", "transient")
    for det in (on_star, on_sky):
        assert sum(det[c] for c in st.TYPE_PROBABILITY_COLUMNS) == pytest.approx(1.0)
        assert det["p_head_transient"] == pytest.approx(0.25, abs=0.01)  # the head's own, kept beside
    # The shipped weights carry one, fitted on their own seed stream; a damaged one is refused, another release's set aside.
    shipped = st.type_calibration_from(st.load_checkpoint(st.DEFAULT_WEIGHTS))
    assert shipped is not None and shipped.record["stream"] == "types" and min(shipped.record["changes"].values()) >= st.MIN_CHANGES_PER_TYPE
    with pytest.raises(st.AstridError, match=r"type_calibration is malformed: weight \(4, 3\)"):
        st.type_calibration_from({"type_calibration": {**saved, "weight": np.zeros((4, 3))}}, path="x.pt")
    with pytest.raises(st.AstridError, match="type_calibration is malformed"):
        st.type_calibration_from({"type_calibration": {**saved, "scale": np.zeros(k)}})
    assert st.type_calibration_from({"type_calibration": {**saved, "cues": ["a"] * k}}) is None
    assert "set aside" in caplog.text


def test_export_fits_the_typer_on_its_own_images_and_refuses_too_few(tmp_path):
    """export --fit-types: the calibration it writes is what load_predictor gives the model; too few changes, one line."""
    path = st.export_weights(str(st.DEFAULT_WEIGHTS), str(tmp_path / "typed.pt"), fit_types=40, types_seed=7)
    model = st.load_predictor(checkpoint=str(path), threshold=None, device="cpu").model
    record = model.type_calibration.record
    assert (record["images"], record["seed"], record["stream"]) == (40, 7, "types")
    assert sum(record["changes"].values()) >= 4 * st.MIN_CHANGES_PER_TYPE and 0.5 < record["accuracy_on_fit"] <= 1.0
    with pytest.raises(st.ConfigError, match=r"--fit-types 2: 2 images gave .* a fit needs 20 of each type"):
        st.export_weights(str(st.DEFAULT_WEIGHTS), str(tmp_path / "few.pt"), fit_types=2)
    with pytest.raises(st.ConfigError, match="--fit-types must be >= 0"):
        st.export_weights(str(st.DEFAULT_WEIGHTS), str(tmp_path / "few.pt"), fit_types=-1)
    assert not (tmp_path / "few.pt").exists()

def test_forced_photometry_measures_a_known_change_and_nothing_where_there_is_none(tmp_path):
    """predict --positions: the flux, its error and S_corr at given places, detected or not."""
    n, x, y, snr = 96, 47.3, 50.6, 20.0
    psf = st.PSF(3.0, 3.5)
    unit = st.render_points((n, n), [x], [y], [1.0], psf)
    variance = np.full((n, n), 2 * SIGMA**2)
    flux = snr / st.matched_filter_snr(1.0, unit, variance)
    rng = np.random.default_rng(41)
    pair = st.subtract_pair(rng.normal(SKY, SIGMA, (n, n)), rng.normal(SKY, SIGMA, (n, n)) + flux * unit, flux_ratio=1.0, seeing=(3.0, 3.0))
    found = st.PairDetections([], np.zeros((n, n)), pair.subtraction.significance, pair.subtraction.valid, pair)
    at_source, blank, outside = st.forced_photometry(found, [(x, y), (20.0, 75.0), (-5.0, 10.0)])
    assert at_source["flux"] == pytest.approx(flux, rel=0.15)
    assert at_source["significance"] == pytest.approx(snr, rel=0.15)
    assert at_source["flux_error"] == pytest.approx(flux / snr, rel=0.15)  # the 1-sigma flux limit of the pair
    assert abs(blank["significance"]) < 4 and abs(blank["flux"]) < 4 * blank["flux_error"]
    assert blank["flux_error"] == pytest.approx(at_source["flux_error"], rel=0.2)
    assert outside["flux"] is None and outside["significance"] is None
    st.write_forced_csv(tmp_path / "forced.csv", [at_source, blank, outside])
    lines = (tmp_path / "forced.csv").read_text().splitlines()
    assert lines[0] == ",".join(st.FORCED_COLUMNS) and lines[3].startswith("-5.000,10.000,,,,")
    (tmp_path / "pos.csv").write_text("x,y\n47.3,50.6\n1e400,3\n")
    with pytest.raises(st.DataError, match="not finite"):
        st.read_positions(tmp_path / "pos.csv", wcs=None)
    (tmp_path / "pos.csv").write_text("ra,dec\n150.0,2.0\n")
    with pytest.raises(st.DataError, match="no usable celestial WCS"):
        st.read_positions(tmp_path / "pos.csv", wcs=None)


# ----------------------------------------------------------------------------
# Islands of S that hold several sources
# ----------------------------------------------------------------------------


def merged_pair(positions, fluxes, *, n=96, seed=31):
    """ZOGY's products for new point sources (FWHM 2.5 px) on blank sky, both epochs of one seeing and scale."""
    unit = st.render_points((n, n), [p[0] for p in positions], [p[1] for p in positions], fluxes, st.PSF(2.5, 3.5))
    rng = np.random.default_rng(seed)
    reference, science = rng.normal(SKY, SIGMA, (n, n)), rng.normal(SKY, SIGMA, (n, n)) + unit
    return st.subtract_pair(reference, science, flux_ratio=1.0, seeing=(2.5, 2.5)).subtraction


def candidates_of(sub, *, split=True):
    return st.significance_candidates(
        sub.significance, gate=st.SIGNIFICANCE_GATE, valid=sub.valid, score=sub.score, score_noise=sub.score_noise,
        response=sub.response if split else None,
    )


def test_score_response_is_what_a_point_source_leaves_in_s():
    n, flux = 64, 1000.0
    psf_reference, psf_science = st.PSF(2.5, 3.5).stamp, st.PSF(3.5, 3.5).stamp
    science = np.zeros((n, n))
    h = psf_science.shape[0] // 2
    science[32 - h:32 + h + 1, 32 - h:32 + h + 1] = flux * psf_science / psf_science.sum()
    shared = dict(sigma_reference=1.0, sigma_science=1.3, flux_ratio=0.7)
    z = st.zogy_subtraction(np.zeros((n, n)), science, psf_reference=psf_reference, psf_science=psf_science,
                            variance_reference=np.ones((n, n)), variance_science=np.ones((n, n)), **shared)
    response = st.score_response(psf_reference, psf_science, **shared)
    r = response.shape[0] // 2
    # S loses its mesh background, which a noiseless frame leaves at ~1e-4 of the peak
    np.testing.assert_allclose(z.score[32 - r:32 + r + 1, 32 - r:32 + r + 1], flux * response,
                               atol=1e-3 * flux * response.max())
    assert np.allclose(response, response[::-1, ::-1]) and response.argmax() == response.size // 2
    assert np.array_equal(z.response, response)


@pytest.mark.parametrize("gap, faint", [(4.0, 0.3), (6.0, 0.2)])
def test_a_faint_change_merged_with_a_bright_one_is_split_out(gap, faint):
    """Two changes 4-6 px apart make one island of S with no saddle: the fainter is found in the residual of the
    brighter, where it is, and the island's pixels are shared between them; inputs are left as they were."""
    sub = merged_pair([(40.0, 48.0), (40.0 + gap, 48.0)], [6000.0, 6000.0 * faint])
    before, old_segments = candidates_of(sub, split=False)
    kept = [dict(c) for c in before], old_segments.copy(), sub.score.copy()
    after, segments = candidates_of(sub)
    assert len(before) == 1 and len(after) == 2
    assert sorted(c["x"] for c in after) == pytest.approx([40.0, 40.0 + gap], abs=0.5)
    assert set(np.unique(segments[old_segments > 0])) == {c["segment"] for c in after}
    assert after[1]["split_from"] == before[0]["segment"] and after[1]["significance"] >= st.SIGNIFICANCE_GATE
    again = st.split_merged_islands(before, old_segments, score=sub.score, score_noise=sub.score_noise,
                                    response=sub.response, gate=st.SIGNIFICANCE_GATE)
    assert again[0] == after and np.array_equal(again[1], segments)  # deterministic
    assert before == kept[0] and np.array_equal(old_segments, kept[1]) and np.array_equal(sub.score, kept[2])


def test_nothing_is_split_from_a_lone_change_or_where_nothing_changed():
    lone = merged_pair([(48.0, 48.0)], [20000.0])
    assert len(candidates_of(lone)[0]) == len(candidates_of(lone, split=False)[0]) == 1
    frame = st.null_frames(synthetic=1, image_size=128, real=False)[0].data
    rng = np.random.default_rng([st.DEFAULT_NULL_SEED, 0])
    for case, reference, science in st.null_pairs(frame, rng, seeing_ratios=()):
        sub = st.subtract_pair(reference, science).subtraction
        assert len(candidates_of(sub)[0]) == len(candidates_of(sub, split=False)[0]), case


def test_sharpness_is_read_near_a_point_like_candidate_and_along_a_whole_trail():
    segments = np.zeros((40, 40), dtype=np.int32)
    segments[5:30, 5:30] = 1
    segments[32:34, 5:35] = 2
    point = dict(x=10.2, y=11.0, segment=1, elongation=1.1)
    trail = dict(x=20.0, y=32.5, segment=2, elongation=8.0)
    local = st.central_pixels([point, trail], segments, radius=2.0)
    rows, cols = np.nonzero(local == 1)
    assert rows.size > 0 and np.all((rows - 11.0) ** 2 + (cols - 10.2) ** 2 <= 4.0)
    assert np.array_equal(local == 2, segments == 2)
    assert segments.sum() == 25 * 25 + 2 * 2 * 30  # not modified


def test_a_change_split_from_a_brighter_ones_island_keeps_its_place_in_their_shared_footprint():
    """The network's footprint covers both; the fainter is under a third of the brighter's significance, which drops
    a speck, but split_merged_islands has shown it to be a source of its own."""
    sub = merged_pair([(40.0, 48.0), (46.0, 48.0)], [6000.0, 800.0])
    candidates, _ = candidates_of(sub)
    faint = [c for c in candidates if "split_from" in c]
    assert len(faint) == 1 and faint[0]["significance"] < st.COMPANION_FRACTION * max(c["significance"] for c in candidates)
    footprint = np.zeros(sub.significance.shape, dtype=np.float32)
    footprint[42:55, 34:53] = 1.0
    found = st.detect_changes(footprint, sub, threshold=0.5)
    assert sorted(d["x"] for d in found) == pytest.approx([40.0, 46.0], abs=0.5)


def test_a_faint_change_far_from_a_bright_one_is_its_own_even_in_one_footprint():
    """Lobes, rings and specks lie within COMPANION_REACH FWHMs of S's response of their change; a candidate farther
    away is kept whatever footprint it shares, and one nearer that is no split source is dropped."""
    sub = merged_pair([(30.0, 48.0), (52.0, 48.0)], [20000.0, 700.0])
    candidates, _ = candidates_of(sub)
    assert len(candidates) == 2 and min(c["significance"] for c in candidates) < st.COMPANION_FRACTION * max(
        c["significance"] for c in candidates)
    assert 22.0 > st.COMPANION_REACH * st.response_fwhm(sub.response)
    footprint = np.zeros(sub.significance.shape, dtype=np.float32)
    footprint[42:55, 24:58] = 1.0
    found = st.detect_changes(footprint, sub, threshold=0.5)
    assert sorted(d["x"] for d in found) == pytest.approx([30.0, 52.0], abs=0.5)
    # A significance map alone has no response to measure the reach with: the footprint's rule holds everywhere.
    alone = st.detect_changes(footprint, sub.significance, threshold=0.5)
    assert [round(d["x"]) for d in alone] == [30]


def test_the_network_scores_a_candidate_on_its_central_pixels_not_its_whole_island():
    """A bright cosmic ray's island of S reaches into a real neighbour's footprint; the network saw nothing at the
    ray itself, so it is vetoed."""
    yy, xx = np.mgrid[:40, :40]
    significance = 50.0 * np.exp(-((xx - 24) ** 2 + (yy - 24) ** 2) / 18.0)  # an island 6 px in radius
    prob = np.zeros((40, 40), dtype=np.float32)
    prob[14:20, 14:20] = 1.0  # a neighbour's footprint, within the island's reach
    assert st.detect_changes(prob, significance, threshold=0.5) == []
    prob[23:26, 23:26] = 1.0  # the network fires on the candidate itself
    assert [(round(d["x"]), round(d["y"])) for d in st.detect_changes(prob, significance, threshold=0.5)] == [(24, 24)]
