"""The detector on real pixels, through the public `predict` command only.

    python benchmarks/real_pixel_probe.py            # every case: ~35 predict calls, ~5 min on 2 idle cores
    python benchmarks/real_pixel_probe.py --quick    # a subset: ~10 calls, under 2 minutes

    # another version's predict, e.g. the committed one while the working tree changes
    # (the probe's helpers, PSF rendering and noise, then come from that version too):
    mkdir /tmp/astrid-head && git archive HEAD | tar -x -C /tmp/astrid-head
    python benchmarks/real_pixel_probe.py --module /tmp/astrid-head/standalone_training.py \\
        --output docs/benchmarks/real_pixel_probe_before.json

The frame is the real 300x300 DSS cutout of M13 that astropy ships (``st.M13_FITS``), and
only its right half (columns 150:300, 300 rows x 150 columns): the left half is training data
elsewhere. Every pair is built from that half: each epoch is the half plus independent
Gaussian noise at the half's own robust noise (1.4826 MAD), so each epoch is noisier than
the plate and the two epochs' noise is independent. Each pair is written as two FITS files
with WCS headers and goes through ``python standalone_training.py predict --science S.fits
--reference R.fits --output-dir D --overwrite`` in a subprocess of its own; the probe reads
``D/detections.csv`` and ``D/detections.json``. A pair that ``predict`` refuses for want of a
flux-ratio fit is run again with ``--flux-ratio 1`` (both epochs share one scale here), and
the case records that it was needed.

Scenarios (each one function, each reporting one dict):

1. **misregistration**: the science epoch resampled (``scipy.ndimage.affine_transform``,
   order 3, about the half's centre) to a shift of 0.1-2 px (along 30 degrees from the
   x axis), a rotation of 0.1-0.5 degrees or a pixel scale 0.5-2% larger, with a WCS that
   describes the resampled pixels exactly (CD matrix and CRPIX transformed with the pixels;
   checked on bright stars, whose fitted positions must agree in the sky to < 0.02 px).
   Pixels whose centre falls outside the half are NaN. The resampling interpolates values
   (surface brightness is kept), so under a scale change a star's summed flux changes by
   1/scale^2, which predict's flux-ratio fit has to absorb. Nothing is injected: every
   detection is false. A shift of 0 is the control; every case has the same noise.
2. **gradient**: a linear ramp of 0, 2, 5 and 20 sigma from corner to corner added to the
   reference epoch; point sources injected into the science epoch at SNR 5, 7, 10, 20 and
   50 (3 each per pair, 2 noise realisations: the same pairs and sources for every ramp).
3. **depth**: no ramp; injections at SNR 3, 4, 5, 6, 7, 8, 10, 13 and 20 (2 each per pair,
   8 noise realisations: 16 per SNR): completeness per SNR with 95% Wilson intervals, and
   the SNR at 50% completeness (SNR50, linear in log SNR at the first upward crossing,
   ``st.snr_at_completeness``).
4. **quantised**: both epochs rounded to integer steps of 3 sigma (after the injections):
   one null pair, and 8 sources each at SNR 10 and 20 per pair in 2 realisations; false
   detections, completeness, and ``sigma_difference`` from ``detections.json``.

**SNR** is the matched-filter SNR on the pair itself: the peak of the injected source's
PSF-filtered image (the source alone in a zero image, correlated with the unit-sum PSF)
divided by the robust noise (1.4826 MAD) of the PSF-filtered difference, science -
reference, of the same pair without the injections. Each source's flux is scaled so that
this ratio is the target SNR. The PSF is a Moffat (beta ``st.ASSUMED_MOFFAT_BETA``) of the
half's measured FWHM, for the injections and for the filter alike. In the gradient scenario
the noise is measured before the ramp is added (a ramp is no noise, and the same source then
has the same SNR in every ramp case); in the quantised scenario it is measured on the
quantised pair. An ideal 5 sigma detector reaches 50% completeness at SNR 5 by this
definition.

Sources go on blank-ish sky (no pixel within 3 px above the background + 3 sigma), at least
``MIN_SEPARATION`` px from one another and from the edges. A detection within
``st.MATCH_RADIUS`` (3 px) of a source recovers it; a detection near none is false. False
detections are counted per megapixel of pixels with data in both epochs (``valid_fraction``
of ``detections.json``). Everything is seeded: the same command gives the same pairs.

The JSON (``--output``) holds every case, the command line, the date, the commit, the
module's checksum (and whether it is the committed one) and the machine; a short table is
printed.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS
from scipy import ndimage, optimize, stats

REPO = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------

SEED = 20261201  # every noise realisation and injection site derives from it
COLUMNS = slice(150, 300)  # the right half of M13; the left half is training data elsewhere
SHIFT_DIRECTION_DEG = 30.0  # shifts are along this angle from the x axis: both axes move
WCS_TOLERANCE = 0.02  # px: a star's sky position in the two epochs must agree to this
MIN_SEPARATION = 12.0  # px between injected sources, and from the edges
BLANK_RADIUS = 3  # px: blank sky has no pixel above BLANK_SIGMA within this distance
BLANK_SIGMA = 3.0  # robust sigmas above the background
QUANTISATION_STEP = 3.0  # sigma per integer step of the quantised pair
PREDICT_TIMEOUT = 300  # s per predict call; one 150x300 pair takes a few seconds

MISREGISTRATIONS = (  # (kind, amount): px, degrees, percent of the pixel scale
    ("shift", 0.0), ("shift", 0.1), ("shift", 0.2), ("shift", 0.5), ("shift", 1.0), ("shift", 2.0),
    ("rotation", 0.1), ("rotation", 0.25), ("rotation", 0.5),
    ("scale", 0.5), ("scale", 1.0), ("scale", 2.0),
)
RAMPS = (0.0, 2.0, 5.0, 20.0)  # sigma, corner to corner, added to the reference epoch
GRADIENT_SNRS = (5, 7, 10, 20, 50)
DEPTH_SNRS = (3, 4, 5, 6, 7, 8, 10, 13, 20)
QUANTISED_SNRS = (10, 20)


@dataclass(frozen=True)
class Preset:
    """How much of each scenario a run does."""

    misregistrations: tuple[tuple[str, float], ...]
    ramps: tuple[float, ...]
    gradient_realisations: int  # noise realisations per ramp (the same ones for every ramp)
    gradient_per_snr: int  # sources per SNR per realisation
    depth_realisations: int
    depth_per_snr: int
    quantised_realisations: int  # with injections; one null pair comes on top
    quantised_per_snr: int


PRESETS = {
    "full": Preset(MISREGISTRATIONS, RAMPS, gradient_realisations=2, gradient_per_snr=3,
                   depth_realisations=8, depth_per_snr=2, quantised_realisations=2, quantised_per_snr=8),
    "quick": Preset((("shift", 0.0), ("shift", 1.0), ("rotation", 0.25), ("scale", 1.0)), (0.0, 20.0),
                    gradient_realisations=1, gradient_per_snr=3, depth_realisations=1, depth_per_snr=2,
                    quantised_realisations=1, quantised_per_snr=8),
}


# ----------------------------------------------------------------------------
# The module under test and the frame
# ----------------------------------------------------------------------------

def load_module(path: Path) -> ModuleType:
    """Import a standalone_training.py by path (read-only: only its helpers are used here)."""
    spec = importlib.util.spec_from_file_location("standalone_training", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["standalone_training"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


class Frame(NamedTuple):
    """The right half of M13 and what the probe measured on it."""

    data: np.ndarray  # (300, 150) plate pixels, density units
    wcs: WCS  # celestial WCS of these pixels
    background: float  # median
    sigma: float  # robust noise, 1.4826 MAD: the noise added to each epoch
    psf: Any  # st.PSF of the measured FWHM, beta st.ASSUMED_MOFFAT_BETA
    fwhm_stars: int  # stars the FWHM was measured on
    blank: np.ndarray  # bool: blank-ish sky, where sources may be injected


def load_frame(st: ModuleType) -> Frame:
    """The right half of ``st.M13_FITS``, its noise, PSF and blank sky."""
    data, _, wcs = st.read_fits_image(st.M13_FITS)
    data, wcs = data[:, COLUMNS], wcs[:, COLUMNS]  # WCS slices in numpy order: CRPIX moves with the columns
    background, sigma = st.robust_background(data)
    estimate = st.measure_psf_fwhm(data)
    psf = st.PSF(estimate.fwhm, st.ASSUMED_MOFFAT_BETA)
    blank = ndimage.maximum_filter(data, size=2 * BLANK_RADIUS + 1) < background + BLANK_SIGMA * sigma
    return Frame(data, wcs, background, sigma, psf, estimate.n_stars, blank)


# ----------------------------------------------------------------------------
# Epochs: noise, resampling with its WCS, FITS files
# ----------------------------------------------------------------------------

def noisy(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """One epoch: the image plus independent Gaussian noise (NaN stays NaN)."""
    return image + rng.normal(0.0, sigma, image.shape)


def quantised(image: np.ndarray, step: float) -> np.ndarray:
    """The image rounded to integer multiples of `step`."""
    return step * np.round(image / step)


def ramp(shape: tuple[int, int], amplitude: float) -> np.ndarray:
    """A plane rising linearly from 0 at pixel (0, 0) to `amplitude` at the opposite corner."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    return amplitude * (x / (shape[1] - 1) + y / (shape[0] - 1)) / 2.0


class Affine(NamedTuple):
    """Where each science pixel samples the frame: frame_xy = matrix @ science_xy + offset (0-based x, y)."""

    matrix: np.ndarray  # (2, 2), x/y order
    offset: np.ndarray  # (2,)

    def to_frame(self, xy: np.ndarray) -> np.ndarray:
        """Frame positions of science positions, (N, 2) x, y."""
        return xy @ self.matrix.T + self.offset

    def to_science(self, xy: np.ndarray) -> np.ndarray:
        """Science positions of frame positions, (N, 2) x, y."""
        return (xy - self.offset) @ np.linalg.inv(self.matrix).T


def misregistration(shape: tuple[int, int], kind: str, amount: float) -> Affine:
    """The science epoch's grid against the frame's, about the frame's centre.

    Parameters
    ----------
    shape : tuple of int
        (rows, columns) of the frame.
    kind : {"shift", "rotation", "scale"}
        A shift moves the sky by `amount` px along SHIFT_DIRECTION_DEG; a rotation turns the
        science grid by `amount` degrees; a scale makes its pixels `amount` percent larger
        (the sky shrinks on it).
    amount : float
        In px, degrees or percent.

    Returns
    -------
    Affine
        The map from science pixels to frame pixels.
    """
    centre = np.array([(shape[1] - 1) / 2.0, (shape[0] - 1) / 2.0])
    shift, angle, scale = np.zeros(2), 0.0, 1.0
    if kind == "shift":
        shift = amount * np.array([math.cos(math.radians(SHIFT_DIRECTION_DEG)), math.sin(math.radians(SHIFT_DIRECTION_DEG))])
    elif kind == "rotation":
        angle = math.radians(amount)
    elif kind == "scale":
        scale = 1.0 + amount / 100.0
    else:
        msg = f"unknown misregistration {kind!r}"
        raise ValueError(msg)
    matrix = scale * np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return Affine(matrix, centre - shift - matrix @ centre)


def resample(image: np.ndarray, affine: Affine) -> np.ndarray:
    """The image on the science grid.

    Parameters
    ----------
    image : numpy.ndarray
        The frame.
    affine : Affine
        Where each science pixel samples the frame.

    Returns
    -------
    numpy.ndarray
        The frame interpolated with a cubic spline (``scipy.ndimage.affine_transform``,
        order 3), NaN where a pixel's centre falls outside the frame's pixels: no made-up sky.
    """
    swap = np.array([[0, 1], [1, 0]])  # x/y <-> row/column
    out = ndimage.affine_transform(image, swap @ affine.matrix @ swap, offset=swap @ affine.offset, order=3, mode="mirror")
    y, x = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    fx, fy = affine.to_frame(np.stack([x.ravel(), y.ravel()], axis=1)).T
    inside = (fx >= -0.5) & (fx <= image.shape[1] - 0.5) & (fy >= -0.5) & (fy <= image.shape[0] - 0.5)
    out[~inside.reshape(image.shape)] = np.nan
    return out


def resampled_wcs(wcs: WCS, affine: Affine) -> WCS:
    """The WCS of the resampled pixels: the frame's, composed with the affine map.

    Parameters
    ----------
    wcs : astropy.wcs.WCS
        The frame's celestial WCS (linear part CD or CDELT with PC or CROTA).
    affine : Affine
        Where each science pixel p samples the frame: A p + b.

    Returns
    -------
    astropy.wcs.WCS
        world(p) = world_frame(A p + b). The projection acts on the intermediate world
        coordinates CD (p - CRPIX), so the composition is exact: CD' = CD A and
        CRPIX' = A^-1 (CRPIX - b) (in 0-based pixels, then back to FITS's 1-based ones).
    """
    out = WCS(naxis=2)
    out.wcs.ctype, out.wcs.cunit = list(wcs.wcs.ctype), list(wcs.wcs.cunit)
    out.wcs.crval, out.wcs.lonpole, out.wcs.latpole = wcs.wcs.crval, wcs.wcs.lonpole, wcs.wcs.latpole
    out.wcs.radesys, out.wcs.equinox = wcs.wcs.radesys, wcs.wcs.equinox
    out.wcs.cd = wcs.pixel_scale_matrix @ affine.matrix
    out.wcs.crpix = affine.to_science(np.asarray(wcs.wcs.crpix) - 1.0) + 1.0
    return out


def write_fits(path: Path, image: np.ndarray, wcs: WCS) -> Path:
    """A float32 FITS image with the WCS in its header."""
    fits.PrimaryHDU(image.astype(np.float32), header=wcs.to_header()).writeto(path, overwrite=True)
    return path


def bright_stars(frame: Frame, *, count: int = 5, box: int = 6) -> np.ndarray:
    """(x, y) of the brightest isolated, unsaturated stars, away from the edges."""
    data = frame.data
    peaks = (data == ndimage.maximum_filter(data, size=2 * box + 1)) & (data < 0.5 * np.nanmax(data))
    peaks &= data > frame.background + 30 * frame.sigma
    peaks[: 3 * box], peaks[-3 * box :], peaks[:, : 3 * box], peaks[:, -3 * box :] = False, False, False, False
    y, x = np.nonzero(peaks)
    order = np.argsort(data[y, x])[::-1][:count]
    return np.stack([x[order], y[order]], axis=1).astype(float)


def star_centre(image: np.ndarray, xy: np.ndarray, *, box: int = 6) -> np.ndarray:
    """(x, y) of a circular Gaussian plus constant fitted to the star nearest `xy`."""
    cx, cy = (int(round(v)) for v in xy)
    stamp = image[cy - box : cy + box + 1, cx - box : cx + box + 1]
    yy, xx = np.mgrid[-box : box + 1, -box : box + 1]

    def model(_, amplitude, x0, y0, width, level):
        return (amplitude * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * width**2)) + level).ravel()

    start = (stamp.max() - np.median(stamp), xy[0] - cx, xy[1] - cy, 1.5, np.median(stamp))
    params, _ = optimize.curve_fit(model, None, stamp.ravel(), p0=start)
    return np.array([cx + params[1], cy + params[2]])


def wcs_error(frame: Frame, science: np.ndarray, affine: Affine, wcs: WCS) -> float:
    """How far apart the two epochs' WCSs put the same stars.

    Parameters
    ----------
    frame : Frame
        The reference epoch's pixels and WCS.
    science : numpy.ndarray
        The resampled frame, without noise.
    affine : Affine
        The resampling (only to find each star in `science`).
    wcs : astropy.wcs.WCS
        The science WCS as a reader gets it from the FITS header.

    Returns
    -------
    float
        The largest disagreement over the brightest stars, in frame px: each star is fitted
        in both images, its science position goes to the sky with `wcs` and back to frame
        pixels with the frame's WCS, where it must land on its fitted frame position.
    """
    errors = []
    for xy in bright_stars(frame):
        in_frame = star_centre(frame.data, xy)
        in_science = star_centre(science, affine.to_science(in_frame))
        sky = wcs.pixel_to_world(*in_science)
        back = np.array(frame.wcs.world_to_pixel(sky), dtype=float)
        errors.append(float(np.hypot(*(back - in_frame))))
    return max(errors)


# ----------------------------------------------------------------------------
# Injections at a matched-filter SNR
# ----------------------------------------------------------------------------

def injection_sites(frame: Frame, count: int, rng: np.random.Generator) -> np.ndarray:
    """Where to inject: random blank-ish pixels, each source MIN_SEPARATION px from the others and the edges.

    Parameters
    ----------
    frame : Frame
        Its ``blank`` mask says where the sky is blank-ish.
    count : int
        Number of sources.
    rng : numpy.random.Generator
        Draws the order of the candidates and a sub-pixel offset for each.

    Returns
    -------
    numpy.ndarray of shape (count, 2)
        x, y (0-based, x = column).

    Raises
    ------
    RuntimeError
        The blank sky cannot hold `count` sources that far apart.
    """
    height, width = frame.blank.shape
    edge = int(math.ceil(MIN_SEPARATION))
    ys, xs = np.nonzero(frame.blank[edge : height - edge, edge : width - edge])
    sites: list[np.ndarray] = []
    if count == 0:
        return np.zeros((0, 2))
    for i in rng.permutation(len(xs)):
        xy = np.array([xs[i] + edge, ys[i] + edge], dtype=float) + rng.uniform(-0.5, 0.5, 2)
        if all(np.hypot(*(xy - s)) >= MIN_SEPARATION for s in sites):
            sites.append(xy)
            if len(sites) == count:
                return np.array(sites)
    msg = f"only {len(sites)} of {count} injection sites fit on the blank sky"
    raise RuntimeError(msg)


def filtered_noise(st: ModuleType, science: np.ndarray, reference: np.ndarray, psf: Any) -> float:
    """Robust noise (1.4826 MAD) of the PSF-filtered difference science - reference."""
    difference = science - reference
    return st.robust_sigma(st.correlate_psf(difference, psf.stamp)[np.isfinite(difference)])


def fluxes_for_snr(st: ModuleType, shape: tuple[int, int], sites: np.ndarray, snr: np.ndarray, psf: Any, noise: float) -> np.ndarray:
    """Each source's flux such that its PSF-filtered peak is `snr` times `noise`."""
    peaks = [st.correlate_psf(st.render_points(shape, [x], [y], [1.0], psf), psf.stamp).max() for x, y in sites]
    return snr * noise / np.array(peaks)


class Injected(NamedTuple):
    """A pair with sources in its science epoch."""

    science: np.ndarray
    reference: np.ndarray
    sites: np.ndarray  # (N, 2) x, y
    snr: np.ndarray  # (N,) target matched-filter SNR
    flux: np.ndarray  # (N,) in the frame's units
    noise: float  # robust noise of the PSF-filtered difference, without the sources


def injected_pair(st: ModuleType, frame: Frame, snrs: Sequence[float], rng: np.random.Generator, *,
                  reference_ramp: float = 0.0, step: float | None = None) -> Injected:
    """Two noisy epochs of the frame, with sources in the science one.

    Parameters
    ----------
    st : module
        standalone_training, for its PSF rendering, filter and robust noise.
    frame : Frame
        The sky of both epochs.
    snrs : sequence of float
        One matched-filter SNR per source (assigned to the sites in random order).
    rng : numpy.random.Generator
        Draws the noise of both epochs, then the sites.
    reference_ramp : float
        Corner-to-corner amplitude, in the frame's sigma, of a ramp added to the reference last.
    step : float, optional
        Round both epochs to multiples of this (the sources are added before the science
        epoch is rounded).

    Returns
    -------
    Injected
        The noise that sets the fluxes is measured on the pair as ``predict`` will see it,
        without the sources and without the ramp: quantised when `step` is given.
    """
    science, reference = noisy(frame.data, frame.sigma, rng), noisy(frame.data, frame.sigma, rng)
    look = (lambda image: quantised(image, step)) if step else (lambda image: image)
    noise = filtered_noise(st, look(science), look(reference), frame.psf)
    snr = rng.permutation(np.asarray(snrs, dtype=float))
    sites = injection_sites(frame, len(snr), rng)
    flux = fluxes_for_snr(st, frame.data.shape, sites, snr, frame.psf, noise)
    science = look(science + st.render_points(frame.data.shape, sites[:, 0], sites[:, 1], flux, frame.psf))
    reference = look(reference) + ramp(frame.data.shape, reference_ramp * frame.sigma)
    return Injected(science, reference, sites, snr, flux, noise)


# ----------------------------------------------------------------------------
# predict, through the command line
# ----------------------------------------------------------------------------

RECORD_KEYS = (  # what the JSON keeps of each detections.json
    "flux_ratio", "flux_ratio_source", "flux_fit_stars", "offset", "sigma_difference", "fwhm_reference", "fwhm_science",
    "blur_reference", "blur_science", "valid_fraction", "n_detections", "threshold", "significance_gate",
)


@dataclass
class Probe:
    """What every case needs: the module, the frame, where the pairs go."""

    st: ModuleType
    module: Path  # standalone_training.py whose predict is run
    frame: Frame
    workdir: Path


def case_dir(probe: Probe, name: str) -> Path:
    """The directory of one case: its FITS pair and predict's outputs."""
    directory = probe.workdir / name
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def call(command: list[str], *, cwd: Path) -> subprocess.CompletedProcess:
    """Run a command, its output captured; one that runs past PREDICT_TIMEOUT fails with code 124."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=PREDICT_TIMEOUT, cwd=cwd)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 124, "", f"timed out after {PREDICT_TIMEOUT} s")


def last_line(text: str) -> str:
    """The last non-blank line: a command-line tool's one-line error."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_predict(probe: Probe, name: str, science: np.ndarray, reference: np.ndarray, *, science_wcs: WCS | None = None) -> dict:
    """Write the pair as FITS, run ``predict`` on it in a subprocess, read what it wrote.

    Parameters
    ----------
    probe : Probe
        The module to run and the working directory.
    name : str
        The case's directory name.
    science, reference : numpy.ndarray
        The two epochs.
    science_wcs : astropy.wcs.WCS, optional
        The science epoch's WCS; default the frame's (the reference always has the frame's).

    Returns
    -------
    dict
        ``detections`` (x, y, significance, score from detections.csv), ``record`` (the
        RECORD_KEYS of detections.json), ``valid_mpix`` (megapixels with data in both
        epochs), ``flux_ratio_given`` and ``refusal`` (``predict`` refused to fit the flux
        ratio and was run again with ``--flux-ratio 1``), ``calls`` and ``seconds`` (its
        wall time, all calls); or ``error``, the last line of a failed command.
    """
    directory = case_dir(probe, name)
    science_wcs = probe.frame.wcs if science_wcs is None else science_wcs
    paths = [write_fits(directory / f"{epoch}.fits", image, wcs)
             for epoch, image, wcs in (("science", science, science_wcs), ("reference", reference, probe.frame.wcs))]
    command = [sys.executable, str(probe.module), "predict", "--science", str(paths[0]), "--reference", str(paths[1]),
               "--output-dir", str(directory / "out"), "--overwrite"]
    start = time.perf_counter()
    done, refusal, calls = call(command, cwd=probe.module.parent), None, 1
    if done.returncode != 0 and "--flux-ratio" in done.stderr:
        refusal, calls = last_line(done.stderr), 2
        done = call([*command, "--flux-ratio", "1"], cwd=probe.module.parent)
    seconds = time.perf_counter() - start
    result: dict[str, Any] = dict(flux_ratio_given=refusal is not None, refusal=refusal, calls=calls, seconds=round(seconds, 2))
    if done.returncode != 0:
        return {**result, "error": last_line(done.stderr or done.stdout)}
    record = json.loads((directory / "out" / "detections.json").read_text())
    with open(directory / "out" / "detections.csv", newline="") as f:
        rows = [dict(x=float(r["x"]), y=float(r["y"]), significance=float(r["significance"]), score=float(r["score"])) for r in csv.DictReader(f)]
    valid_mpix = record["valid_fraction"] * science.size / 1e6
    return {**result, "detections": rows, "valid_mpix": valid_mpix, "record": {k: record.get(k) for k in RECORD_KEYS}}


# ----------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------

def score(st: ModuleType, result: dict, sites: np.ndarray) -> dict:
    """Which sources a case recovered and how many of its detections are false.

    Parameters
    ----------
    st : module
        standalone_training, for MATCH_RADIUS.
    result : dict
        What :func:`run_predict` returned.
    sites : numpy.ndarray of shape (N, 2)
        x, y of the injected sources (none in a null pair).

    Returns
    -------
    dict
        ``recovered`` (per source: a detection within MATCH_RADIUS), ``false_detections``
        (detections within MATCH_RADIUS of no source) and ``false_per_mpix``; None for a
        failed case.
    """
    if "error" in result:
        return dict(recovered=[], false_detections=None, false_per_mpix=None)
    found = np.array([[d["x"], d["y"]] for d in result["detections"]]).reshape(-1, 2)
    distance = np.hypot(*(found[:, None, :] - sites[None, :, :]).transpose(2, 0, 1))  # (detections, sources)
    near = distance <= st.MATCH_RADIUS
    false = int(np.sum(~near.any(axis=1)))
    return dict(recovered=near.any(axis=0).tolist(), false_detections=false, false_per_mpix=false / result["valid_mpix"])


def proportion(count: int, total: int) -> dict:
    """count / total with its 95% Wilson interval."""
    if total == 0:
        return dict(count=0, total=0, value=None, low=None, high=None)
    ci = stats.binomtest(count, total).proportion_ci(confidence_level=0.95, method="wilson")
    return dict(count=count, total=total, value=count / total, low=float(ci.low), high=float(ci.high))


def completeness(snr: Sequence[float], recovered: Sequence[bool]) -> list[dict]:
    """Completeness per distinct SNR, with Wilson intervals."""
    snr, recovered = np.asarray(snr, dtype=float), np.asarray(recovered, dtype=bool)
    return [dict(snr=float(s), **proportion(int(recovered[snr == s].sum()), int((snr == s).sum()))) for s in np.unique(snr)]


def snr50(st: ModuleType, curve: list[dict]) -> dict:
    """SNR at 50% completeness, linear in log SNR at the first upward crossing.

    Parameters
    ----------
    st : module
        standalone_training, for ``snr_at_completeness`` (the rule of its evaluation).
    curve : list of dict
        :func:`completeness`'s output.

    Returns
    -------
    dict
        ``value``, and the same read off the upper and lower Wilson bounds of every SNR:
        a rough band, not a confidence interval. None where 50% is never reached.
    """
    snrs = [c["snr"] for c in curve]

    def at(key: str) -> float | None:
        value = st.snr_at_completeness(snrs, [math.nan if c[key] is None else c[key] for c in curve], 0.5)
        return None if math.isnan(value) else value

    return dict(value=at("value"), from_upper_bound=at("high"), from_lower_bound=at("low"))


def summarise(st: ModuleType, cases: list[dict]) -> dict:
    """Completeness and false detections over the cases of one configuration."""
    ok = [c for c in cases if "error" not in c]
    snr = [s for c in ok for s in c["snr"]]
    recovered = [r for c in ok for r in c["recovered"]]
    false = sum(c["false_detections"] for c in ok)
    mpix = sum(c["valid_mpix"] for c in ok)
    return dict(completeness=completeness(snr, recovered), false_detections=false, valid_mpix=mpix,
                false_per_mpix=false / mpix if mpix else None, failed=len(cases) - len(ok),
                flux_ratio_given=sum(c["flux_ratio_given"] for c in cases))


def case_entry(st: ModuleType, result: dict, injected: Injected | None, **labels: Any) -> dict:
    """One case as the JSON keeps it: labels, the injections and their recovery, predict's record."""
    sites = injected.sites if injected is not None else np.zeros((0, 2))
    entry = {**labels, **{k: v for k, v in result.items() if k != "detections"}, **score(st, result, sites)}
    entry["detections"] = [{k: round(v, 3) for k, v in d.items()} for d in result.get("detections", [])]
    if injected is not None:
        entry.update(snr=injected.snr.tolist(), sites=np.round(injected.sites, 2).tolist(),
                     flux=np.round(injected.flux, 1).tolist(), filtered_noise=injected.noise)
    return entry


# ----------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------

def realisation_rng(scenario: str, k: int) -> np.random.Generator:
    """The generator of noise realisation `k` of a scenario: the same in the full and the quick run."""
    return np.random.default_rng([SEED, zlib.crc32(scenario.encode()), k])


def misregistration_scenario(probe: Probe, cases: Sequence[tuple[str, float]]) -> dict:
    """False detections per megapixel of pairs misregistered by a known, WCS-described transform."""
    st, frame = probe.st, probe.frame
    out = []
    for kind, amount in cases:
        affine = misregistration(frame.data.shape, kind, amount)
        clean = resample(frame.data, affine)
        name = f"misregistration-{kind}-{amount:g}"
        header_file = write_fits(case_dir(probe, name) / "science-noiseless.fits", clean, resampled_wcs(frame.wcs, affine))
        wcs = st.read_fits_image(header_file)[2]  # the WCS as a reader gets it from the header
        error = wcs_error(frame, clean, affine, wcs)
        if not error < WCS_TOLERANCE:
            msg = f"{name}: the science WCS misplaces a star by {error:.3f} px (tolerance {WCS_TOLERANCE})"
            raise RuntimeError(msg)
        rng = realisation_rng("misregistration", 0)  # one noise realisation for every case: only the transform differs
        science, reference = noisy(clean, frame.sigma, rng), noisy(frame.data, frame.sigma, rng)
        result = run_predict(probe, name, science, reference, science_wcs=wcs)
        out.append(case_entry(st, result, None, kind=kind, amount=amount, unit={"shift": "px", "rotation": "deg", "scale": "%"}[kind],
                              matrix=affine.matrix.round(6).tolist(), offset=affine.offset.round(4).tolist(), wcs_error_px=error))
    return dict(description="science epoch resampled (order 3, about the centre) with a WCS that describes it; nothing injected",
                shift_direction_deg=SHIFT_DIRECTION_DEG, cases=out)


def injection_cases(probe: Probe, scenario: str, snrs: Sequence, realisations: int, **options: Any) -> list[dict]:
    """One predict per noise realisation of a scenario, sources at `snrs` in each."""
    out = []
    for k in range(realisations):
        injected = injected_pair(probe.st, probe.frame, snrs, realisation_rng(scenario, k), **options)
        label = "-".join(f"{key}{value:g}" for key, value in options.items() if value)
        result = run_predict(probe, f"{scenario}-{label or 'plain'}-{k}", injected.science, injected.reference)
        out.append(case_entry(probe.st, result, injected, realisation=k, **options))
    return out


def gradient_scenario(probe: Probe, preset: Preset) -> dict:
    """Completeness and false detections with a sky ramp in the reference epoch."""
    snrs = np.repeat(GRADIENT_SNRS, preset.gradient_per_snr)
    by_ramp = []
    for amplitude in preset.ramps:
        cases = injection_cases(probe, "gradient", snrs, preset.gradient_realisations, reference_ramp=amplitude)
        by_ramp.append(dict(ramp_sigma=amplitude, **summarise(probe.st, cases), cases=cases))
    return dict(description="linear ramp, corner to corner, in sigma of the frame's noise, added to the reference; "
                            "the same noise and sources for every ramp", ramps=by_ramp)


def depth_scenario(probe: Probe, preset: Preset) -> dict:
    """Completeness per SNR and SNR50 on the plain pair."""
    cases = injection_cases(probe, "depth", np.repeat(DEPTH_SNRS, preset.depth_per_snr), preset.depth_realisations)
    summary = summarise(probe.st, cases)
    return dict(**summary, snr50=snr50(probe.st, summary["completeness"]), cases=cases)


def quantised_scenario(probe: Probe, preset: Preset) -> dict:
    """A pair rounded to steps of QUANTISATION_STEP sigma: one null pair and pairs with sources."""
    step = QUANTISATION_STEP * probe.frame.sigma
    null = injection_cases(probe, "quantised-null", (), 1, step=step)
    cases = null + injection_cases(probe, "quantised", np.repeat(QUANTISED_SNRS, preset.quantised_per_snr), preset.quantised_realisations, step=step)
    summary = summarise(probe.st, cases)
    return dict(step=step, step_sigma=QUANTISATION_STEP, **summary, null_false_detections=null[0]["false_detections"],
                sigma_difference=[c.get("record", {}).get("sigma_difference") for c in cases], cases=cases)


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------

def provenance(module: Path, started: float) -> dict:
    """Command line, date, commit, module checksum and machine."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], capture_output=True, cwd=REPO)
        return done.stdout.decode(errors="replace").strip() if done.returncode == 0 else ""

    source = module.read_bytes()
    committed = subprocess.run(["git", "show", "HEAD:standalone_training.py"], capture_output=True, cwd=REPO).stdout
    return dict(
        command=shlex.join([Path(sys.executable).name, *sys.argv]),
        date=datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=git("rev-parse", "--short", "HEAD"), module=str(module), module_sha256=hashlib.sha256(source).hexdigest(),
        module_is_committed=source == committed,
        machine=dict(platform=platform.platform(), python=platform.python_version(), cpu_count=os.cpu_count(), processor=platform.processor()),
    )


def fmt(value: float | None, spec: str = ".2f") -> str:
    """A number for the table, "-" for none."""
    return "-" if value is None else format(value, spec)


def curve_text(curve: list[dict]) -> str:
    """A completeness curve as SNR:recovered/total."""
    return "  ".join(f"{c['snr']:g}:{c['count']}/{c['total']}" for c in curve)


def print_table(report: dict) -> None:
    """The headline figures, one line per case or configuration."""
    s = report["scenarios"]
    if "misregistration" in s:
        print("misregistration (nothing injected)    WCS err px  detections  false/Mpix  flux ratio")
        for c in s["misregistration"]["cases"]:
            ratio = "error: " + c["error"] if "error" in c else f"{c['record']['flux_ratio']:.4f} ({c['record']['flux_ratio_source']})"
            print(f"  {c['kind']:8s} {c['amount']:5g} {c['unit']:3s}                 {c['wcs_error_px']:.4f}  {len(c['detections']):10d}  "
                  f"{fmt(c['false_per_mpix'], '10.1f')}  {ratio}")
    if "gradient" in s:
        print("gradient (ramp in the reference)     completeness per SNR (recovered/total)       false/Mpix")
        for r in s["gradient"]["ramps"]:
            print(f"  ramp {r['ramp_sigma']:4g} sigma   {curve_text(r['completeness']):45s}  {fmt(r['false_per_mpix'], '.1f'):10s}"
                  f"flux ratio given in {r['flux_ratio_given']}/{len(r['cases'])}")
    if "depth" in s:
        d = s["depth"]
        print(f"depth   {curve_text(d['completeness'])}")
        print(f"        SNR50 {fmt(d['snr50']['value'])} (read off the Wilson bounds: {fmt(d['snr50']['from_upper_bound'])} to {fmt(d['snr50']['from_lower_bound'])}), "
              f"false/Mpix {fmt(d['false_per_mpix'], '.1f')}")
    if "quantised" in s:
        q = s["quantised"]
        sig = ", ".join(fmt(v, ".3g") for v in q["sigma_difference"])
        print(f"quantised ({q['step_sigma']:g} sigma steps)  {curve_text(q['completeness'])}  false/Mpix {fmt(q['false_per_mpix'], '.1f')} "
              f"(null pair: {q['null_false_detections']}), flux ratio given in {q['flux_ratio_given']}/{len(q['cases'])}, sigma_difference {sig}")
    print(f"{report['predict_calls']} predict calls, {report['wall_seconds']:.0f} s")


def all_cases(scenarios: dict) -> list[dict]:
    """Every case of every scenario."""
    s = scenarios
    return [*s["misregistration"]["cases"], *(c for r in s["gradient"]["ramps"] for c in r["cases"]), *s["depth"]["cases"], *s["quantised"]["cases"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a subset of the cases (PRESETS['quick']), under 2 minutes")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks" / "real_pixel_probe.json")
    parser.add_argument("--module", type=Path, default=REPO / "standalone_training.py",
                        help="the standalone_training.py whose predict is probed (default: this checkout's)")
    parser.add_argument("--keep", type=Path, help="keep the FITS pairs and predict's outputs in this directory")
    args = parser.parse_args()
    started = time.time()
    preset = PRESETS["quick" if args.quick else "full"]
    module = args.module.resolve()
    st = load_module(module)
    frame = load_frame(st)
    with tempfile.TemporaryDirectory(prefix="real_pixel_probe-") as tmp:
        workdir = args.keep.resolve() if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        probe = Probe(st, module, frame, workdir)
        scenarios = dict(misregistration=misregistration_scenario(probe, preset.misregistrations), gradient=gradient_scenario(probe, preset),
                         depth=depth_scenario(probe, preset), quantised=quantised_scenario(probe, preset))
    report = dict(
        probe="real_pixel_probe", preset="quick" if args.quick else "full", **provenance(module, started),
        frame=dict(path=str(st.M13_FITS), columns=[COLUMNS.start, COLUMNS.stop], shape=list(frame.data.shape), background=frame.background,
                   sigma=frame.sigma, fwhm=frame.psf.fwhm, fwhm_stars=frame.fwhm_stars, beta=frame.psf.beta,
                   blank_fraction=float(frame.blank.mean())),
        snr_definition="peak of the PSF-filtered source (alone, unit-sum PSF) / 1.4826 MAD of the PSF-filtered science - reference "
                       "of the pair without the sources (and without the ramp)",
        scenarios=scenarios, predict_calls=sum(c["calls"] for c in all_cases(scenarios)), wall_seconds=time.time() - started,
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print_table(report)
    print(f"-> {args.output}")


if __name__ == "__main__":
    main()
