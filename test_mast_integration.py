"""Real-sky section: fetching, caching, reading and measuring real cutouts.

Offline tests replay real SkyView responses (astroquery's recorded form and results pages and
the DSS cutout of M13 that astropy ships) from an HTTP server on 127.0.0.1, driven by the real
astroquery client. Tests marked ``remote_data`` reach the real services.
"""

import json
import logging
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import astropy
import astropy.config.paths
import astroquery
import numpy as np
import pytest
import scipy.ndimage
from astropy import units as u
from astropy.io import fits
from astropy.wcs import WCS
from astroquery.skyview import conf as skyview_conf

from conftest import cli_env
from standalone_training import (
    MASTRealDataset,
    real_tile_pair,
    SkyConfig,
    DEFAULT_TARGETS,
    DataError,
    fetch_frames,
    measure_psf_fwhm,
    path_inside,
    prefetch,
    read_fits_image,
    resolve_target,
    robust_sigma,
    safe_filename,
    tile_frame,
)

M13_FITS = Path(astropy.__file__).parent / "io/fits/hdu/compressed/tests/data/m13.fits"
SKYVIEW_DATA = Path(astroquery.__file__).parent / "skyview/tests/data"
FAST = dict(timeout=5, retries=2, backoff=0.01, pixels=300)


def _fits_bytes(data, header=None):
    """Bytes of a one-HDU FITS file."""
    buffer = BytesIO()
    fits.PrimaryHDU(data, header=header).writeto(buffer)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# A replaying SkyView server


class _SkyViewReplay(BaseHTTPRequestHandler):
    """Serves SkyView's recorded pages and a FITS body; ``server.mode`` picks the behaviour."""

    def do_GET(self):
        server = self.server
        server.requests.append(self.path)
        if server.mode == "hang":
            server.release.wait(30)  # accept, then never answer
            return
        if server.mode in ("500", "404"):
            self._reply(int(server.mode), b"error page", "text/plain")
            return
        if len(server.requests) - 1 in server.busy_requests:
            self._reply(200, b"<html>SkyView is busy, try later</html>", "text/html")
            return
        path = urlsplit(self.path).path
        if path.endswith("/basicform.pl"):
            self._reply(200, (SKYVIEW_DATA / "query_page.html").read_bytes(), "text/html")
        elif path.endswith("/runquery.pl"):
            self._reply(200, server.results_page().encode(), "text/html")
        elif path.startswith("/tempspace/fits/"):
            self._reply(200, server.fits_body, "application/fits")
        else:
            self._reply(404, b"not found", "text/plain")

    def _reply(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def results_page(self):
        """The recorded results page (3 surveys) cut to one FITS link, or to none when empty."""
        page = (SKYVIEW_DATA / "results.html").read_text()
        keep = "" if self.mode == "empty" else "_1"
        return re.sub(r"<a href=[^>]*?(_\d)\.fits>FITS</a>",
                      lambda m: m.group(0) if m.group(1) == keep else "", page)


@pytest.fixture
def skyview(tmp_path):
    """Local SkyView replay with switchable ``mode``; astroquery's SkyView conf points at it."""
    server = _Server(("127.0.0.1", 0), _SkyViewReplay)
    server.mode, server.requests, server.release = "ok", [], threading.Event()
    server.busy_requests = set()  # indices of requests answered by a 200 "busy" page
    server.fits_body = M13_FITS.read_bytes()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/current/cgi/basicform.pl"

    def stop():
        server.release.set()
        server.shutdown()
        server.server_close()

    server.stop = stop
    with skyview_conf.set_temp("url", url):
        yield server
    if not server.release.is_set():
        stop()


def _fits_files(directory):
    return sorted(p.name for p in Path(directory).rglob("*") if p.is_file()
                  and p.name not in ("manifest.json", "names.json"))


# ----------------------------------------------------------------------------------------------
# SkyView through the real astroquery client


def test_skyview_fetch_keeps_pixels_wcs_and_provenance(skyview, tmp_path):
    frames, failures = fetch_frames(["M13"], ["DSS2 Red"], cache_dir=tmp_path, **FAST)
    assert failures == []
    (frame,) = frames
    original = fits.getdata(M13_FITS).astype(np.float64)
    original_wcs = WCS(fits.getheader(M13_FITS))
    assert np.array_equal(frame.data, original)
    assert np.allclose(frame.wcs.wcs.crval, original_wcs.wcs.crval)
    for x, y in [(0, 0), (150, 40), (299, 299)]:
        sep = frame.wcs.pixel_to_world(x, y).separation(original_wcs.pixel_to_world(x, y))
        assert sep < 1e-6 * u.arcsec
    assert frame.pixel_scale == pytest.approx(0.9997, abs=1e-3)  # DSS cutout: 1 arcsec/px

    query = parse_qs(urlsplit(next(r for r in skyview.requests if "runquery" in r)).query)
    assert query["survey"] == ["DSS2 Red"] and query["pixels"] == ["300"]

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    entry = manifest[frame.path.name]
    assert frame.path.parent == tmp_path.resolve()
    assert entry["sha256"] == __import__("hashlib").sha256(M13_FITS.read_bytes()).hexdigest()
    assert entry["service"] == "skyview" and entry["pixels"] == 300
    assert entry["url"].endswith("/tempspace/fits/skv6724208473423_1.fits")
    assert entry["ra"] == pytest.approx(DEFAULT_TARGETS["M13"][0])
    assert entry["retrieved"].endswith("+00:00")


def test_second_run_is_served_from_cache_with_the_server_down(skyview, tmp_path):
    first, _ = fetch_frames(["M13"], ["DSS2 Red"], cache_dir=tmp_path, **FAST)
    seen = len(skyview.requests)
    skyview.stop()
    again, failures = fetch_frames(["M13"], ["DSS2 Red"], cache_dir=tmp_path, **FAST)
    assert failures == []
    assert len(skyview.requests) == seen
    assert np.array_equal(again[0].data, first[0].data)


def test_corrupt_cache_entry_is_refetched_or_refused_offline(skyview, tmp_path, caplog):
    (frame,), _ = fetch_frames(["M13"], ["DSS2 Red"], cache_dir=tmp_path, **FAST)
    frame.path.write_bytes(frame.path.read_bytes()[:-10] + b"0123456789")
    frames, failures = fetch_frames(["M13"], ["DSS2 Red"], cache_dir=tmp_path, offline=True,
                                    **FAST)
    assert frames == [] and "not in the cache" in failures[0].reason
    assert "fails its checksum" in caplog.text

    seen = len(skyview.requests)
    frames, failures = fetch_frames(["M13"], ["DSS2 Red"], cache_dir=tmp_path, **FAST)
    assert failures == [] and len(skyview.requests) > seen
    assert frames[0].path.read_bytes() == M13_FITS.read_bytes()


def test_http_500_is_retried_a_bounded_number_of_times(skyview, tmp_path, caplog):
    skyview.mode = "500"
    with caplog.at_level(logging.WARNING, logger="astrid"):
        frames, failures = fetch_frames(["M13"], ["DSS2 Red"], cache_dir=tmp_path, **FAST)
    assert frames == []
    assert len(failures) == 1 and "500" in failures[0].reason
    assert len(skyview.requests) == 3  # retries=2: three attempts, each stopped at its first GET
    assert "fetch failed: M13 / DSS2 Red attempt 3/3:" in caplog.text
    assert _fits_files(tmp_path) == []


def test_a_bad_response_is_not_replayed_from_astroquerys_cache(skyview, tmp_path):
    # The second GET of the form page is the one astroquery would pickle; a "busy" page with
    # status 200 would then be served from its cache to every later run.
    skyview.busy_requests = {1}
    with astropy.config.paths.set_temp_cache(tmp_path / "astropy-cache"):
        _, failures = fetch_frames(["M13"], ["DSS2 Red"], cache_dir=tmp_path / "c", **FAST)
        assert len(failures) == 1
        frames, failures = fetch_frames(["M13"], ["DSS2 Red"], cache_dir=tmp_path / "c", **FAST)
    assert failures == [] and len(frames) == 1


def test_http_404_is_not_retried(skyview, tmp_path):
    skyview.mode = "404"
    _, failures = fetch_frames(["M13"], ["DSS2 Red"], cache_dir=tmp_path, **FAST)
    assert "404" in failures[0].reason and len(skyview.requests) == 1


def test_silent_server_times_out_quickly(skyview, tmp_path):
    skyview.mode = "hang"
    start = time.monotonic()
    frames, failures = fetch_frames(["M13"], ["DSS2 Red"], cache_dir=tmp_path,
                                    **{**FAST, "timeout": 0.3, "retries": 1})
    elapsed = time.monotonic() - start
    assert frames == [] and "timed out" in failures[0].reason.lower()
    assert len(skyview.requests) == 2
    assert elapsed < 3.0


def test_results_page_without_images_is_a_failure_not_retried(skyview, tmp_path):
    skyview.mode = "empty"
    frames, failures = fetch_frames(["M13"], ["DSS2 Red"], cache_dir=tmp_path, **FAST)
    assert frames == []
    assert "no image" in failures[0].reason
    assert sum("runquery" in r for r in skyview.requests) == 1
    assert _fits_files(tmp_path) == []


@pytest.mark.parametrize("body", [b"<html>Service busy</html>" * 200,
                                  M13_FITS.read_bytes()[:100_000]],
                         ids=["html-instead-of-fits", "truncated-fits"])
def test_corrupt_fits_body_leaves_nothing_in_the_cache(skyview, tmp_path, body):
    skyview.fits_body = body
    frames, failures = fetch_frames(["M13", "M51"], ["DSS2 Red"], cache_dir=tmp_path, **FAST)
    assert frames == [] and len(failures) == 2  # M13's failure did not stop M51
    assert "\n" not in failures[0].reason and "FITS" in failures[0].reason
    assert _fits_files(tmp_path) == []
    assert not (tmp_path / "manifest.json").exists()


def test_nan_regions_are_skipped_or_filled_with_a_valid_mask(skyview, tmp_path):
    data = fits.getdata(M13_FITS).astype(np.float32)
    data[:, :110] = np.nan  # a survey edge: no data left of column 110
    skyview.fits_body = _fits_bytes(data, fits.getheader(M13_FITS))
    (frame,), _ = fetch_frames(["M13"], ["DSS2 Red"], cache_dir=tmp_path, **FAST)
    tiles = tile_frame(frame.data, tile_size=50, max_bad_fraction=0.25)
    corners = {(t.y0, t.x0) for t in tiles}
    assert len(tiles) == 6 * 4
    assert not any(x0 < 100 for _, x0 in corners)
    edge = next(t for t in tiles if t.x0 == 100)
    assert not edge.valid[:, :10].any() and edge.valid[:, 10:].all()
    assert np.isfinite(edge.data).all()
    assert np.all(edge.data[:, :10] == np.median(frame.data[edge.y0:edge.y0 + 50, 110:150]))


HOSTILE = ["../../etc/passwd", "/etc/passwd", "..", ".", "a/../../b", "C:\\Windows\\x",
           "nul\x00byte", "~/.ssh/id_rsa", "x" * 5000, ""]


@pytest.mark.parametrize("name", HOSTILE)
def test_safe_filename_never_escapes(tmp_path, name):
    slug = safe_filename(name)
    assert "/" not in slug and "\\" not in slug and "\x00" not in slug
    assert not slug.startswith(".") and 0 < len(slug) <= 80
    assert path_inside(tmp_path, name).parent == tmp_path.resolve()


def test_distinct_names_never_collide():
    names = ["M 31", "M_31", "M/31", "m 31", "M31"]
    assert len({safe_filename(n) for n in names}) == len(names)


def test_hostile_target_names_stay_inside_the_cache(skyview, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    hostile = ["../../etc/passwd", "/tmp/evil", "..\\..\\boot"]
    names = {n.lower(): list(DEFAULT_TARGETS["M13"]) for n in hostile}
    (cache / "names.json").write_text(json.dumps(names))
    frames, failures = fetch_frames(hostile + ["nul\x00byte"], ["DSS2 Red"], cache_dir=cache,
                                    **FAST)
    assert len(frames) == 3 and len(failures) == 1
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(p.resolve().parent == cache.resolve() for p in written)
    assert len(_fits_files(cache)) == 3


def test_prefetch_summarises_cached_and_failed(skyview, tmp_path):
    summary = prefetch(["250 95", "M13"], ["DSS2 Red"], cache_dir=tmp_path, **FAST)
    assert len(summary["cached"]) == 1 and summary["cached"][0].startswith("M13 / DSS2 Red: ")
    assert len(summary["failed"]) == 1 and summary["failed"][0].startswith("250 95 / DSS2 Red")


def test_unknown_survey_is_a_recorded_failure(tmp_path):
    frames, failures = fetch_frames(["M13"], ["NotASurvey"], cache_dir=tmp_path, **FAST)
    assert frames == [] and "unknown survey" in failures[0].reason


@pytest.mark.parametrize("timeout", [0, -1, 61, 600])
def test_timeouts_are_bounded(tmp_path, timeout):
    with pytest.raises(ValueError, match="timeout"):
        fetch_frames(["M13"], ["DSS2 Red"], cache_dir=tmp_path, timeout=timeout)


# ----------------------------------------------------------------------------------------------
# Targets


@pytest.mark.parametrize("text, ra, dec", [
    ("250.4226 36.4602", 250.4226, 36.4602),
    ("250.4226, -36.4602", 250.4226, -36.4602),
    ("16:41:41.6 +36:27:41", 250.42333, 36.46139),
    ("16h41m41.6s +36d27m41s", 250.42333, 36.46139),
    ("m13", *DEFAULT_TARGETS["M13"]),
    ("  crab   NEBULA ", *DEFAULT_TARGETS["Crab Nebula"]),
    ("M42", *DEFAULT_TARGETS["Orion Nebula"]),
])
def test_resolve_target_without_network(tmp_path, text, ra, dec):
    coord = resolve_target(text, cache_dir=tmp_path, timeout=1)
    assert coord.ra.deg == pytest.approx(ra, abs=1e-4)
    assert coord.dec.deg == pytest.approx(dec, abs=1e-4)
    assert not (tmp_path / "names.json").exists()


def test_resolved_names_are_read_back_from_the_cache(tmp_path):
    (tmp_path / "names.json").write_text(json.dumps({"ngc 6205": [250.4, 36.5]}))
    coord = resolve_target("NGC  6205", cache_dir=tmp_path, timeout=1)
    assert (coord.ra.deg, coord.dec.deg) == pytest.approx((250.4, 36.5))


@pytest.mark.parametrize("text", ["250 95", "400 10", "", "a\x00b"])
def test_resolve_target_refuses_bad_input(tmp_path, text):
    with pytest.raises(DataError):
        resolve_target(text, cache_dir=tmp_path, timeout=1)


# ----------------------------------------------------------------------------------------------
# Reading FITS


def _write(path, content):
    path.write_bytes(content)
    return path


REFUSALS = {
    "missing": (lambda d: d / "absent.fits", "no such file"),
    "empty": (lambda d: _write(d / "e.fits", b""), "empty"),
    "text": (lambda d: _write(d / "t.fits", b"hello, not FITS\n" * 300), "not a readable FITS"),
    "truncated": (lambda d: _write(d / "tr.fits", M13_FITS.read_bytes()[:100_000]), "FITS"),
    "cube": (lambda d: _write(d / "c.fits", _fits_bytes(np.zeros((3, 8, 8)))), "2-D"),
    "all-nan": (lambda d: _write(d / "n.fits", _fits_bytes(np.full((8, 8), np.nan))), "NaN"),
    "table-only": (lambda d: _write(d / "tb.fits", _table_only()), "no image"),
}


def _table_only():
    buffer = BytesIO()
    table = fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=[1.0])])
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case", list(REFUSALS))
def test_read_fits_image_refusals_are_one_line(tmp_path, case):
    make, phrase = REFUSALS[case]
    with pytest.raises(DataError) as info:
        read_fits_image(make(tmp_path))
    assert "\n" not in str(info.value) and phrase in str(info.value)


def test_read_fits_image_reads_compressed_and_squeezes_degenerate_axes(tmp_path):
    original = fits.getdata(M13_FITS)
    header = fits.getheader(M13_FITS)
    compressed = tmp_path / "c.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(original, header=header)]).writeto(
        compressed)
    data, _, wcs = read_fits_image(compressed)
    assert data.dtype == np.float64 and np.array_equal(data, original)
    assert wcs is not None and wcs.wcs.crval[0] == pytest.approx(250.4226)

    flat = _write(tmp_path / "d.fits", _fits_bytes(original[None, :, :].astype(np.float32)))
    data, _, wcs = read_fits_image(flat)
    assert data.shape == (300, 300) and wcs is None


# ----------------------------------------------------------------------------------------------
# Tiles, noise and PSF


def test_robust_sigma_matches_gaussian_noise_and_ignores_nan():
    rng = np.random.default_rng(0)
    noise = rng.normal(10.0, 4.0, 100_000)
    noise[::7] = np.nan
    noise[::101] = 1e6  # outliers barely move the MAD
    assert robust_sigma(noise) == pytest.approx(4.0, rel=0.02)
    assert np.isnan(robust_sigma(np.full(5, np.nan)))


def test_tile_frame_skips_blank_and_saturated_tiles():
    rng = np.random.default_rng(1)
    frame = rng.normal(100.0, 5.0, (64, 96))
    frame[:32, :32] = 0.0  # blank padding
    frame[32:, 64:] = frame.max() + 1000  # saturated block at the frame maximum
    tiles = tile_frame(frame, tile_size=32)
    assert {(t.y0, t.x0) for t in tiles} == {(0, 32), (0, 64), (32, 0), (32, 32)}
    assert all(t.valid.all() and t.data.shape == (32, 32) for t in tiles)


def _star_field(fwhm, *, saturate=None, seed=0):
    """Isolated pixel-integrated Gaussian stars on a grid, sky 100, noise 3."""
    from standalone_training import _pixel_gaussian

    rng = np.random.default_rng(seed)
    image = np.full((256, 256), 100.0)
    sigma = fwhm / (2 * np.sqrt(2 * np.log(2)))
    for y in range(20, 236, 36):
        for x in range(20, 236, 36):
            position = x + rng.uniform(-0.5, 0.5), y + rng.uniform(-0.5, 0.5)
            image += _pixel_gaussian(image.shape, rng.uniform(3e3, 3e4), *position, sigma, 0.0)
    image += rng.normal(0.0, 3.0, image.shape)
    return image if saturate is None else np.minimum(image, saturate)


@pytest.mark.parametrize("fwhm", [1.8, 3.0, 5.0])
def test_psf_fwhm_of_synthetic_stars(fwhm):
    estimate = measure_psf_fwhm(_star_field(fwhm), default=2.5)
    assert estimate.measured and estimate.n_stars >= 10
    assert estimate.fwhm == pytest.approx(fwhm, rel=0.10)


def test_psf_falls_back_without_stars():
    rng = np.random.default_rng(2)
    estimate = measure_psf_fwhm(rng.normal(100.0, 3.0, (128, 128)), default=2.7)
    assert estimate == (2.7, False, 0)


def test_psf_ignores_saturated_stars():
    estimate = measure_psf_fwhm(_star_field(3.0, saturate=400.0), default=2.7)
    assert not estimate.measured and estimate.fwhm == 2.7


def _broad_stars(positions, peaks, *, fwhm=8.0, seed=0, noise=7.4, size=128):
    """Stars of one FWHM on a square sky of 300 with Gaussian noise (peaks in noise sigmas)."""
    from standalone_training import _pixel_gaussian

    sigma = fwhm / (2 * np.sqrt(2 * np.log(2)))
    image = np.full((size, size), 300.0)
    for (y, x), peak in zip(positions, peaks):
        image += _pixel_gaussian(image.shape, peak * noise * 2 * np.pi * sigma**2, x + 0.3, y - 0.2, sigma, 0.0)
    return image + np.random.default_rng(seed).normal(0.0, noise, image.shape)


def test_psf_of_broad_noisy_stars_in_a_sparse_field():
    # A 1 m telescope's raw frame: four stars of FWHM 8 px, 12-18 sigma at the peak. Noise
    # makes several 3x3 maxima on each star's top, and the plain search refuses each star
    # for its "neighbours"; the search on the smoothed frame finds them.
    from standalone_training import PSF_SEARCH_SMOOTH, _psf_candidates, measure_seeing

    image = _broad_stars([(30, 30), (30, 95), (95, 35), (90, 92)], [12.0, 14.0, 16.0, 18.0])
    assert len(_psf_candidates(image, default=2.5, threshold=8.0, max_stars=25)[3]) < 3
    estimate = measure_psf_fwhm(image, default=2.5)
    assert estimate.measured and estimate.n_stars >= 3
    assert estimate.fwhm == pytest.approx(8.0, rel=0.1)
    # the pair's seeing too (pair_seeing's last try): the science epoch blurred to 10 px
    noise = np.random.default_rng(1).normal(0.0, 5.0, image.shape)
    science = scipy.ndimage.gaussian_filter(image, 6.0 / 2.3548) + noise
    assert not measure_seeing(image, science, threshold=8.0)[0].measured
    psf_reference, psf_science = measure_seeing(image, science, threshold=8.0, smooth=PSF_SEARCH_SMOOTH)
    assert psf_reference.measured and psf_science.fwhm / psf_reference.fwhm == pytest.approx(1.25, rel=0.1)


def test_a_pair_with_one_star_gets_its_width_in_both_epochs():
    # Too few stars for a seeing ratio: the one star's width, for both epochs, and a warning
    # that names --seeing; a blank pair keeps the default and says so. (The brighter star
    # peaks at the frame's maximum, which the search takes for a saturated core.)
    from standalone_training import pair_seeing, seeing_source

    reference = _broad_stars([(40, 40), (90, 90)], [30.0, 60.0], seed=1)
    science = _broad_stars([(40, 40), (90, 90)], [30.0, 60.0], seed=2)
    warnings = []
    psf_reference, psf_science = pair_seeing(reference, science, seeing=None, warnings_=warnings)
    assert psf_reference == psf_science and psf_reference.n_stars == 1
    assert psf_reference.fwhm == pytest.approx(8.0, rel=0.1)
    assert seeing_source(psf_reference, given=False) == "measured on 1 star(s) only, one width for both epochs"
    assert len(warnings) == 1 and "1 star(s) only" in warnings[0] and "--seeing" in warnings[0]
    blank = np.random.default_rng(3).normal(300.0, 7.4, (128, 128))
    warnings = []
    psf_reference, _ = pair_seeing(blank, blank + 1.0, seeing=None, warnings_=warnings)
    assert not psf_reference.measured and psf_reference.fwhm == 2.5
    assert seeing_source(psf_reference, given=False).startswith("the default FWHM")
    assert "could not be measured" in warnings[0]
    assert seeing_source(psf_reference, given=True) == "given"


def test_the_psf_stack_leaves_out_cosmic_rays_that_outnumber_the_stars():
    # Six stars of FWHM 3 px and twelve one-pixel cosmic rays, all found as "stars": the
    # median of all their stamps is a spike; without the spikes it is the stars' PSF.
    from standalone_training import ASSUMED_MOFFAT_BETA, EPSF_MAX_PEAK, PSF, empirical_psf

    slots = [(16 + 24 * (k % 7), 16 + 24 * (k // 7)) for k in range(18)]  # (x, y), 24 px apart
    stars, rays = slots[::3], [slot for k, slot in enumerate(slots) if k % 3]
    image = _broad_stars([(y, x) for x, y in stars], [300.0] * 6, fwhm=3.0, noise=2.0, size=176)
    for x, y in rays:
        image[y, x] += 5000.0
    found = np.array([(x + 0.3, y - 0.2, 1.0) for x, y in stars] + [(x, y, 1.0) for x, y in rays], dtype=float)
    moffat = PSF(3.0, ASSUMED_MOFFAT_BETA).stamp
    kwargs = dict(stars=found, background=np.full(image.shape, 300.0), radius=moffat.shape[0] // 2)
    spike = empirical_psf(image, **kwargs)
    assert spike is not None and spike.max() > 0.5
    stack = empirical_psf(image, **kwargs, max_peak=EPSF_MAX_PEAK * float(moffat.max()))
    gaussian_peak = 4 * np.log(2) / (np.pi * 3.0**2)  # a unit Gaussian of FWHM 3 px at its centre
    assert stack is not None and stack.max() == pytest.approx(gaussian_peak, rel=0.2)


def test_psf_of_the_real_m13_cutout():
    data, _, _ = read_fits_image(M13_FITS)
    estimate = measure_psf_fwhm(data, default=2.5)
    # DSS2 at 1 arcsec/px with 2-4 arcsec seeing (measured here: about 3.2 px).
    assert estimate.measured and 2.0 < estimate.fwhm < 5.0


# ----------------------------------------------------------------------------------------------
# Live services


@pytest.mark.remote_data
@pytest.mark.parametrize("survey", ["DSS2 Red", "PanSTARRS/DR1/r", "TESS", "HST"])
def test_live_services(tmp_path, survey):
    target = "M51" if survey == "HST" else "M13"
    pixels = 50 if survey == "TESS" else 300
    frames, failures = fetch_frames([target], [survey], cache_dir=tmp_path, timeout=60,
                                    retries=1, pixels=pixels)
    assert failures == [], failures
    assert frames[0].wcs is not None and np.isfinite(frames[0].data).mean() > 0.5


@pytest.mark.remote_data
def test_live_sesame_resolution_is_cached(tmp_path):
    coord = resolve_target("NGC 6205", cache_dir=tmp_path, timeout=30)
    assert coord.ra.deg == pytest.approx(DEFAULT_TARGETS["M13"][0], abs=0.01)
    assert "ngc 6205" in json.loads((tmp_path / "names.json").read_text())


# ----------------------------------------------------------------------------------------------
# The real-sky dataset: injection on real pixels, provenance and fallback


def test_real_dataset_from_skyview_keeps_the_sample_contract(skyview, tmp_path):
    ds = MASTRealDataset(6, image_size=64, seed=3, source="mast", targets=["M13"], surveys=["DSS2 Red"], cache_dir=tmp_path, timeout=5, retries=0)
    info = ds.provenance()
    assert info["real_fraction"] == 1.0 and info["data_source"] == "mast"
    assert info["real_tiles"] == (300 // 64) ** 2  # m13.fits is 300x300 and full of real data
    inputs, mask = ds[0]
    assert inputs.shape == (3, 64, 64) and mask.shape == (2, 64, 64)  # the change mask and the type labels
    assert set(np.unique(mask[0].numpy())) <= {0.0, 1.0}
    raw = ds.raw(0)
    assert raw.reference.shape == (64, 64) and raw.fwhm_science >= raw.fwhm_reference > 0
    # Same (seed, i), same sample; the cache is reused without the server.
    skyview.stop()
    again = MASTRealDataset(6, image_size=64, seed=3, source="mast", targets=["M13"], surveys=["DSS2 Red"], cache_dir=tmp_path, timeout=5, retries=0)
    assert np.array_equal(again[0][0].numpy(), inputs.numpy())
    assert again.truth(0) == ds.truth(0)


def test_injections_on_real_pixels_show_in_the_difference(tmp_path):
    """An injected transient on a real M13 tile stands out of the difference at its SNR."""
    data, _, _ = read_fits_image(M13_FITS)
    tile = tile_frame(data, tile_size=64)[0]
    sky = SkyConfig(snr_range=(40.0, 40.001), empty_fraction=0.0, anomaly_mix=(1, 0, 0, 0), cosmic_rays_per_field=0, hot_pixels_per_field=0)
    sample = real_tile_pair(np.random.default_rng(0), tile, 3.2, sky)
    transients = [o for o in sample.truth if o["type"] == "transient"]
    assert transients, "the sky config asks for at least one transient"
    diff = sample.science.astype(float) - sample.reference
    noise = np.sqrt(np.median(sample.variance))
    for obj in transients:
        x, y = int(round(obj["x"])), int(round(obj["y"]))
        assert diff[y, x] > 5 * noise
        assert sample.mask[y, x]


def test_nan_pixels_are_never_labelled(tmp_path):
    data, _, _ = read_fits_image(M13_FITS)
    data = data.copy()
    data[:64, :12] = np.nan  # a chip gap inside the first tile (under the 25% NaN limit)
    tile = tile_frame(data, tile_size=64)[0]
    assert (tile.y0, tile.x0) == (0, 0) and not tile.valid[:, :12].any() and tile.valid[:, 12:].all()
    sky = SkyConfig(empty_fraction=0.0, anomalies_per_field=30.0)
    sample = real_tile_pair(np.random.default_rng(1), tile, 3.2, sky)
    assert not sample.mask[:, :12].any()
    assert sample.mask.any()


def test_failed_source_falls_back_and_says_so(skyview, tmp_path, caplog):
    skyview.mode = "500"
    with caplog.at_level(logging.WARNING, logger="astrid"):
        ds = MASTRealDataset(5, image_size=64, seed=0, source="mast", targets=["M13", "M31"], surveys=["DSS2 Red", "DSS2 Blue"], cache_dir=tmp_path, timeout=5, retries=1)
    info = ds.provenance()
    assert info["real_fraction"] == 0.0 and info["synthetic_samples"] == 5
    assert info["data_source"] == "synthetic (fallback from mast)"
    assert len(info["failures"]) == 4
    assert any("FALLING BACK" in r.getMessage() for r in caplog.records)
    # SkyView failed its retries once; the other pairs are not hammered again.
    assert len(skyview.requests) == 2
    assert ds[0][0].shape == (3, 64, 64)


def test_no_fallback_makes_a_failed_source_fatal(skyview, tmp_path):
    skyview.mode = "500"
    with pytest.raises(DataError, match="no real sky available") as err:
        MASTRealDataset(5, image_size=64, source="mast", targets=["M13"], surveys=["DSS2 Red"], cache_dir=tmp_path, timeout=5, retries=0, fallback=False)
    assert "\n" not in str(err.value)


def _astroquery_config(tmp_path, skyview_url):
    """An XDG config dir whose astroquery.cfg points SkyView at the local replay server."""
    config = tmp_path / "xdg" / "astropy"  # astroquery reads $XDG_CONFIG_HOME/astropy/astroquery.cfg
    config.mkdir(parents=True)
    (config / "astroquery.cfg").write_text(f"[skyview]\nurl = {skyview_url}\n")
    return tmp_path / "xdg"


def _train(tmp_path, *args, env=None):
    cmd = [sys.executable, str(Path(__file__).parent / "run_standalone_training.py"), "--mode", "quick", "--samples", "8", "--test-samples", "4", "--no-mlflow", "--no-energy", *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=cli_env(**(env or {})))


@pytest.mark.slow
def test_quick_training_on_a_local_fits_directory_is_all_real(tmp_path):
    fits_dir = tmp_path / "fits"
    fits_dir.mkdir()
    (fits_dir / "m13.fits").write_bytes(M13_FITS.read_bytes())
    (fits_dir / "broken.fits").write_bytes(b"SIMPLE  =   T" + b" " * 50)  # skipped with a warning
    result = _train(tmp_path, "--data", "fits", "--fits-dir", str(fits_dir), "--output-dir", "run")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]
    assert data["real_fraction"] == 1.0 and data["data_source"] == "fits"
    assert data["frames"] == ["m13 / local FITS"] and len(data["failures"]) == 1


@pytest.mark.slow
def test_cli_mast_with_unreachable_service_falls_back_or_fails_on_one_line(skyview, tmp_path):
    skyview.mode = "500"
    url = skyview_conf.url
    env = {"XDG_CONFIG_HOME": str(_astroquery_config(tmp_path, url))}
    common = ["--data", "mast", "--targets", "M13", "--surveys", "DSS2 Red", "--cache-dir", str(tmp_path / "cache"), "--retries", "0", "--timeout", "5"]
    fell_back = _train(tmp_path, *common, "--output-dir", "run", env=env)
    assert fell_back.returncode == 0, fell_back.stderr[-2000:]
    assert sum("FALLING BACK" in line for line in fell_back.stderr.splitlines()) == 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["data"]["real_fraction"] == 0.0
    assert skyview.requests, "the subprocess must have reached the local replay server"
    refused = _train(tmp_path, *common, "--no-fallback", "--output-dir", "run2", env=env)
    assert refused.returncode != 0
    errors = [line for line in refused.stderr.splitlines() if line.startswith("astrid: error")]
    assert len(errors) == 1 and "--no-fallback" in errors[0]
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "run2" / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("content", ["null", "[]"])
def test_cli_fetch_with_a_manifest_of_the_wrong_type_ignores_it_and_refetches(skyview, tmp_path, content):
    """A manifest that is not a mapping is ignored with a warning, never an AttributeError traceback."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(content)
    env = cli_env(XDG_CONFIG_HOME=str(_astroquery_config(tmp_path, skyview_conf.url)))
    cmd = [sys.executable, str(Path(__file__).parent / "standalone_training.py"), "fetch", "--targets", "M13", "--surveys", "DSS2 Red",
           "--cache-dir", str(cache), "--retries", "0", "--timeout", "5"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "ignoring" in result.stderr and "manifest.json" in result.stderr
    manifest = json.loads((cache / "manifest.json").read_text())
    assert isinstance(manifest, dict) and any(isinstance(entry, dict) and entry.get("sha256") for entry in manifest.values())
    assert skyview.requests, "the frame was fetched again from the local replay server"
