"""AstrID: find what changed in the sky between a reference and a science image.

One module, read top to bottom in the order data flows:

    configuration -> sky simulation -> normalisation -> datasets -> model
    -> loss and metrics -> object-level evaluation -> trainer -> prediction -> CLI

The science behind the simulator, the masks and the metrics is in SCIENCE.md of the
project's shared notes; STANDALONE_TRAINING.md documents every command and figure.

Run ``python standalone_training.py --help`` for the commands (train, evaluate,
predict, fetch).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import random
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage, signal as sp_signal

log = logging.getLogger("astrid")

ANOMALY_TYPES = ("transient", "variable_star", "supernova", "asteroid")
BOGUS_TYPES = ("cosmic_ray", "hot_pixel", "dipole")
POINT_TYPES = ("transient", "variable_star", "supernova")


class AstridError(Exception):
    """A refusal the user can act on: printed as one line, never as a traceback."""


# ----------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SkyConfig:
    """Physical parameters of the simulated sky (SCIENCE.md, section 2)."""

    sky_level: tuple[float, float] = (300.0, 3000.0)  # e-/px per exposure, log-uniform
    read_noise: float = 5.0  # e- rms per exposure
    reference_exposures: int = 4  # the reference is a mean coadd of this many exposures
    fwhm_reference: tuple[float, float] = (1.5, 3.0)  # px, seeing of the reference
    seeing_ratio: tuple[float, float] = (1.0, 1.5)  # FWHM_science / FWHM_reference
    moffat_beta: tuple[float, float] = (2.5, 4.8)  # 4.765 is Kolmogorov (Trujillo+ 2001)
    registration_error: float = 0.3  # px, max |shift| of science vs reference per axis
    star_density: tuple[float, float] = (0.002, 0.012)  # stars per px^2, log-uniform
    star_flux: tuple[float, float] = (300.0, 3e6)  # e-, power-law range
    star_flux_slope: float = 0.9  # N(>F) ~ F^-slope (1.5 is Euclidean; fields are bounded)
    saturation: float = 60000.0  # e-, full well: pixels clip here
    galaxy_density: float = 0.0005  # galaxies per px^2 (about 2 per 64x64 field)
    galaxy_flux: tuple[float, float] = (3e3, 3e5)  # e-, log-uniform
    galaxy_half_light_radius: tuple[float, float] = (1.5, 6.0)  # px
    snr_range: tuple[float, float] = (3.0, 100.0)  # anomaly SNR, log-uniform
    anomalies_per_field: float = 2.0  # mean anomalies per 64x64 area, when any
    empty_fraction: float = 0.2  # fraction of fields with no anomaly at all
    anomaly_mix: tuple[float, float, float, float] = (0.3, 0.25, 0.25, 0.2)  # ANOMALY_TYPES
    trail_length: tuple[float, float] = (6.0, 24.0)  # px = rate x exposure time
    cosmic_rays_per_field: float = 1.5  # mean per 64x64 area
    hot_pixels_per_field: float = 0.7  # mean per 64x64 area (bad columns included)
    bogus_snr_range: tuple[float, float] = (8.0, 300.0)  # cosmic rays and hot pixels

    def validate(self) -> None:
        lo, hi = self.snr_range
        if not 0 < lo < hi:
            msg = f"snr_range must satisfy 0 < min < max, got {self.snr_range}"
            raise ValueError(msg)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; written to config.json beside its outputs."""

    data: str = "synthetic"  # synthetic | mast | fits
    samples: int = 100  # samples generated (train + validation)
    image_size: int = 64  # px, a multiple of 16
    val_fraction: float = 0.2  # share of samples held out for validation
    test_samples: int = 32  # fresh samples (disjoint seed stream) for the final test
    epochs: int = 20
    batch_size: int = 8
    lr: float = 3e-3  # peak learning rate of the one-cycle schedule
    weight_decay: float = 1e-4
    grad_clip: float = 1.0  # max gradient L2 norm
    patience: int = 6  # epochs without improvement before stopping
    min_delta: float = 1e-4  # improvement must exceed this
    monitor: str = "val_loss"  # metric watched by early stopping and best.pt
    monitor_mode: str = "min"  # min | max
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    width: int = 16  # channels of the first U-Net level (16 -> 2.16M parameters)
    snr_min: float = 3.0  # anomaly SNR range of the synthetic sky
    snr_max: float = 100.0
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | mps
    deterministic: bool = False  # torch.use_deterministic_algorithms
    output_dir: str = ""  # "" -> runs/<timestamp>
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "astrid"
    mlflow: bool = True
    mlflow_optional: bool = False  # continue without MLflow if the server is unreachable
    energy: bool = True
    country: str = "USA"  # ISO 3166 alpha-3, for CodeCarbon's carbon intensity
    fits_dir: str = ""  # --data fits
    cache_dir: str = ""  # --data mast; "" -> ~/.cache/astrid
    fallback: bool = True  # --data mast may fall back to synthetic samples
    resume: str = ""  # checkpoint to resume from

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range."""
        positive = ("samples", "epochs", "batch_size", "test_samples", "width", "patience")
        for name in positive:
            if getattr(self, name) < 1:
                msg = f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                raise ValueError(msg)
        check_image_size(self.image_size)
        if not 0.0 < self.val_fraction < 1.0:
            msg = f"val-fraction must lie in (0, 1), got {self.val_fraction}"
            raise ValueError(msg)
        if self.lr <= 0:
            msg = f"lr must be > 0, got {self.lr}"
            raise ValueError(msg)
        if self.monitor_mode not in ("min", "max"):
            msg = f"monitor-mode must be 'min' or 'max', got {self.monitor_mode!r}"
            raise ValueError(msg)
        if self.data not in ("synthetic", "mast", "fits"):
            msg = f"data must be synthetic, mast or fits, got {self.data!r}"
            raise ValueError(msg)
        if self.data == "fits" and not self.fits_dir:
            msg = "--data fits needs --fits-dir DIR"
            raise ValueError(msg)
        if round(self.samples * self.val_fraction) < 1 or round(self.samples * (1 - self.val_fraction)) < 1:
            msg = f"{self.samples} samples cannot be split with val-fraction {self.val_fraction}"
            raise ValueError(msg)
        SkyConfig(snr_range=(self.snr_min, self.snr_max)).validate()


# Named presets are data; overrides go on top through dataclasses.replace.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(samples=20, epochs=3, batch_size=4),
    "full": dict(samples=100, epochs=20, batch_size=8),
}


def check_image_size(size: int) -> None:
    """The U-Net halves the image four times, so sizes are multiples of 16 (and >= 32)."""
    if size < 32 or size % 16:
        msg = f"image-size must be a multiple of 16 and >= 32, got {size}"
        raise ValueError(msg)


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch together."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------
# Sky simulation: PSFs, sources, noise (SCIENCE.md, sections 2-3)
# ----------------------------------------------------------------------------


def psf_oversampling(fwhm: float) -> int:
    """Sub-pixels per pixel side for integrating a PSF over its pixels.

    Sampling only pixel centres biases flux by ~10% at FWHM 1.5 px (SCIENCE.md); with
    about 6 sub-pixels per FWHM the midpoint rule's error on the peak pixel is < 1%.
    """
    return max(2, math.ceil(6.0 / fwhm))



def moffat_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width alpha for a given FWHM: FWHM = 2 alpha sqrt(2^(1/beta) - 1)."""
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def psf_radius(fwhm: float) -> int:
    """Stamp half-size in px: 3 FWHM holds > 98% of a beta >= 2.5 Moffat's flux."""
    return int(math.ceil(3.0 * fwhm)) + 1


def moffat_stamps(dx: np.ndarray, dy: np.ndarray, *, fwhm: float, beta: float, radius: int) -> np.ndarray:
    """Pixel-integrated, unit-sum Moffat stamps, one per sub-pixel offset.

    Parameters
    ----------
    dx, dy : arrays of shape (N,)
        Offsets of each source from its stamp's central pixel, in px.
    fwhm, beta : float
        Moffat FWHM (px) and power index.
    radius : int
        Stamp half-size; stamps are (2 radius + 1) px square.

    Returns
    -------
    ndarray of shape (N, 2 radius + 1, 2 radius + 1)
        Each stamp integrates the profile over its pixels (by oversampling and
        binning) and sums to one.
    """
    os_ = psf_oversampling(fwhm)
    size = 2 * radius + 1
    sub = ((np.arange(size * os_) + 0.5) / os_ - radius - 0.5).astype(np.float32)  # sub-pixel centres
    inv_alpha2 = np.float32(1.0 / moffat_alpha(fwhm, beta) ** 2)
    ddx2 = (sub[None, None, :] - np.asarray(dx, dtype=np.float32)[:, None, None]) ** 2
    ddy2 = (sub[None, :, None] - np.asarray(dy, dtype=np.float32)[:, None, None]) ** 2
    # (1 + r^2/alpha^2)^-beta, written with exp/log1p: float32 pow is several times slower.
    profile = np.exp(np.float32(-beta) * np.log1p((ddx2 + ddy2) * inv_alpha2))
    binned = profile.reshape(len(profile), size, os_, size, os_).sum(axis=(2, 4), dtype=np.float64)
    return binned / binned.sum(axis=(1, 2), keepdims=True)


@dataclass(frozen=True)
class PSF:
    """A Moffat PSF on the pixel grid of one epoch."""

    fwhm: float  # px
    beta: float

    @property
    def radius(self) -> int:
        return psf_radius(self.fwhm)

    def stamp(self) -> np.ndarray:
        """The centred unit-sum stamp, (2 radius + 1) px square."""
        return moffat_stamps(np.zeros(1), np.zeros(1), fwhm=self.fwhm, beta=self.beta, radius=self.radius)[0]


def render_points(shape: tuple[int, int], x: np.ndarray, y: np.ndarray, flux: np.ndarray, psf: PSF) -> np.ndarray:
    """Image of point sources at (x, y) (x = column, 0-based) with the given fluxes.

    Each source is stamped locally; sources off the frame contribute only what falls on it.
    """
    x, y, flux = (np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in (x, y, flux))
    r = psf.radius
    pad = 2 * r  # a source up to r px off the frame still spills onto it
    image = np.zeros((shape[0] + 2 * pad, shape[1] + 2 * pad))
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    inside = (ix >= -r) & (ix < shape[1] + r) & (iy >= -r) & (iy < shape[0] + r)
    if inside.any():
        x, y, flux, ix, iy = x[inside], y[inside], flux[inside], ix[inside], iy[inside]
        stamps = moffat_stamps(x - ix, y - iy, fwhm=psf.fwhm, beta=psf.beta, radius=r) * flux[:, None, None]
        for stamp, cx, cy in zip(stamps, ix + pad - r, iy + pad - r):
            image[cy : cy + 2 * r + 1, cx : cx + 2 * r + 1] += stamp
    return image[pad:-pad, pad:-pad]


def trail_points(x1: float, y1: float, x2: float, y2: float, *, step: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Points every `step` px along a segment: summed PSFs there make the trailed PSF."""
    n = max(2, int(math.ceil(math.hypot(x2 - x1, y2 - y1) / step)) + 1)
    t = np.linspace(0.0, 1.0, n)
    return x1 + t * (x2 - x1), y1 + t * (y2 - y1)


def sersic_image(shape: tuple[int, int], galaxies: Sequence[dict], *, offset: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
    """Intrinsic (not yet PSF-convolved) Sersic galaxies, each with a 3x-oversampled core.

    Each galaxy dict has x, y (px), flux (e-), half_light_radius (px), n (Sersic index),
    axis_ratio and angle (rad); `offset` shifts them all (the misregistration).
    """
    image = np.zeros(shape)
    os_ = 3
    for g in galaxies:
        x, y = g["x"] + offset[0], g["y"] + offset[1]
        n, r_e = g["n"], g["half_light_radius"]
        b_n = 2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n)  # Ciotti & Bertin (1999)
        half = int(math.ceil(5.0 * r_e))
        ix, iy = int(round(x)), int(round(y))
        sub = (np.arange((2 * half + 1) * os_) + 0.5) / os_ - half - 0.5
        u, v = sub[None, :] - (x - ix), sub[:, None] - (y - iy)
        c, s = math.cos(g["angle"]), math.sin(g["angle"])
        r = np.hypot(u * c + v * s, (-u * s + v * c) / g["axis_ratio"]) / r_e
        size = 2 * half + 1
        stamp = np.exp(-b_n * (r ** (1.0 / n) - 1.0)).reshape(size, os_, size, os_).sum(axis=(1, 3))
        stamp *= g["flux"] / stamp.sum()
        # Clip the stamp to the frame: galaxy centres lie on it, their outskirts may not.
        y0, x0 = iy - half, ix - half
        ys, xs = slice(max(0, y0), min(shape[0], y0 + size)), slice(max(0, x0), min(shape[1], x0 + size))
        image[ys, xs] += stamp[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    return image


def convolve_psf(image: np.ndarray, psf: PSF) -> np.ndarray:
    """Convolve an intrinsic image with a PSF's pixel-integrated stamp."""
    return sp_signal.fftconvolve(image, psf.stamp(), mode="same")


def matched_filter_snr(flux: float, profile: np.ndarray, variance: np.ndarray) -> float:
    """Optimal SNR of a flux change: |dF| sqrt(sum P^2 / var) (SCIENCE.md, section 3)."""
    return float(abs(flux) * math.sqrt(np.sum(profile**2 / variance)))


def flux_for_snr(snr: float, profile: np.ndarray, base_variance: np.ndarray, *, sign: float = 1.0) -> float:
    """Signed flux change whose matched-filter SNR is `snr`, counting its own shot noise.

    The variance of the difference includes the injected flux itself, so the flux solves
    snr = |dF| sqrt(sum P^2 / (var0 + dF P)); the fixed-point iteration converges in a
    few steps because the right side changes slowly with dF.
    """
    flux = sign * snr / math.sqrt(np.sum(profile**2 / base_variance))
    for _ in range(6):
        variance = np.maximum(base_variance + flux * profile, 1e-6)
        flux = sign * snr / math.sqrt(np.sum(profile**2 / variance))
    return float(flux)


def disc_mask(shape: tuple[int, int], x: float, y: float, radius: float) -> np.ndarray:
    """Boolean disc of `radius` px around (x, y)."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (xx - x) ** 2 + (yy - y) ** 2 <= radius**2


def segment_distance(px: np.ndarray, py: np.ndarray, x1: float, y1: float, x2: float, y2: float) -> np.ndarray:
    """Distance from points (px, py) to the segment (x1, y1)-(x2, y2)."""
    dx, dy = x2 - x1, y2 - y1
    length2 = dx * dx + dy * dy
    t = np.clip(((px - x1) * dx + (py - y1) * dy) / length2, 0.0, 1.0) if length2 > 0 else 0.0
    return np.hypot(px - (x1 + t * dx), py - (y1 + t * dy))


def anomaly_mask(shape: tuple[int, int], truth: Sequence[dict], fwhm_science: float) -> np.ndarray:
    """The label: discs of radius max(1.5 px, FWHM) on point anomalies, FWHM bands on trails.

    Bogus entries never enter the mask (SCIENCE.md, section 3).
    """
    mask = np.zeros(shape, dtype=bool)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for obj in truth:
        if obj["type"] == "asteroid":
            mask |= segment_distance(xx, yy, obj["x1"], obj["y1"], obj["x2"], obj["y2"]) <= fwhm_science
        elif obj["type"] in POINT_TYPES:
            mask |= disc_mask(shape, obj["x"], obj["y"], max(1.5, fwhm_science))
    return mask


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, size: int | None = None) -> Any:
    return np.exp(rng.uniform(math.log(lo), math.log(hi), size))


def _power_law(rng: np.random.Generator, lo: float, hi: float, slope: float, size: int) -> np.ndarray:
    """Fluxes with N(>F) ~ F^-slope between lo and hi (inverse-CDF draw)."""
    u = rng.uniform((hi / lo) ** -slope, 1.0, size)
    return lo * u ** (-1.0 / slope)


class SkySample(NamedTuple):
    """One simulated pair with everything derived from it."""

    reference: np.ndarray  # e-, (H, W) float32
    science: np.ndarray  # e-, (H, W) float32
    variance: np.ndarray  # e-^2, true variance of science - reference
    mask: np.ndarray  # (H, W) bool
    truth: list[dict]
    psf_reference: PSF
    psf_science: PSF


def simulate_sky(rng: np.random.Generator, *, image_size: int, sky: SkyConfig) -> SkySample:
    """Simulate one registered (reference, science) pair with labelled anomalies and bogus.

    Steps: draw the two epochs' seeing and sky; lay out the static scene (stars,
    Sersic galaxies); inject anomalies at SNRs drawn log-uniformly; draw Poisson and
    read noise (the reference is a coadd); add bogus; label the anomalies.
    """
    shape = (image_size, image_size)
    area = image_size * image_size / 64.0**2  # rates are quoted per 64x64 field

    # 1. The two epochs: the reference is usually sharper and deeper.
    fwhm_ref = rng.uniform(*sky.fwhm_reference)
    psf_ref = PSF(fwhm_ref, rng.uniform(*sky.moffat_beta))
    psf_sci = PSF(fwhm_ref * rng.uniform(*sky.seeing_ratio), rng.uniform(*sky.moffat_beta))
    sky_level = _log_uniform(rng, *sky.sky_level)
    n_ref = sky.reference_exposures
    shift = rng.uniform(-sky.registration_error, sky.registration_error, 2)  # science vs reference

    # 2. Static scene: stars (power-law fluxes) and galaxies, seen through each epoch's PSF.
    margin = 4
    n_stars = rng.poisson(_log_uniform(rng, *sky.star_density) * (image_size + 2 * margin) ** 2)
    sx = rng.uniform(-margin, image_size + margin, n_stars)
    sy = rng.uniform(-margin, image_size + margin, n_stars)
    sflux = _power_law(rng, *sky.star_flux, sky.star_flux_slope, n_stars)
    n_gal = rng.poisson(sky.galaxy_density * image_size**2)
    counts = _draw_anomaly_counts(rng, sky, area)
    n_gal = max(n_gal, int(counts["supernova"] > 0))  # a supernova needs a host
    galaxies = [
        dict(
            x=rng.uniform(0, image_size),
            y=rng.uniform(0, image_size),
            flux=_log_uniform(rng, *sky.galaxy_flux),
            half_light_radius=rng.uniform(*sky.galaxy_half_light_radius),
            n=rng.uniform(1.0, 4.0),  # exponential disc to de Vaucouleurs
            axis_ratio=rng.uniform(0.4, 1.0),
            angle=rng.uniform(0, math.pi),
        )
        for _ in range(n_gal)
    ]

    def static_scene(psf: PSF, offset: np.ndarray) -> np.ndarray:
        galaxy_light = convolve_psf(sersic_image(shape, galaxies, offset=offset), psf) if galaxies else 0.0
        return render_points(shape, sx + offset[0], sy + offset[1], sflux, psf) + galaxy_light

    static_ref = static_scene(psf_ref, np.zeros(2))
    static_sci = static_scene(psf_sci, shift)

    # Expected counts and the true variance of each epoch and of their difference.
    model_ref = sky_level + static_ref
    model_sci = sky_level + static_sci
    var_ref = (model_ref + sky.read_noise**2) / n_ref  # mean of n_ref exposures
    base_variance = var_ref + model_sci + sky.read_noise**2

    # 3. Anomalies: flux changes set by their matched-filter SNR in the difference image.
    truth: list[dict] = []
    profiles: list[np.ndarray] = []
    variable_candidates = list(rng.permutation(np.flatnonzero((sx >= 2) & (sx < image_size - 2) & (sy >= 2) & (sy < image_size - 2))))
    for kind in ANOMALY_TYPES:
        for _ in range(counts[kind]):
            snr = float(_log_uniform(rng, *sky.snr_range))
            obj = _place_anomaly(rng, kind, image_size, shift, sx, sy, sflux, galaxies, variable_candidates, sky)
            if obj is None:
                continue
            profile = _anomaly_profile(obj, shape, psf_sci)
            flux = flux_for_snr(snr, profile, base_variance, sign=obj.pop("sign", 1.0))
            if kind == "variable_star" and flux < -0.95 * obj["reference_flux"]:
                flux = flux_for_snr(snr, profile, base_variance)  # too faint to fade that much: it brightens
            model_sci = model_sci + flux * profile
            base_variance = base_variance + flux * profile
            obj.update(snr=snr, flux=flux)
            truth.append(obj)
            profiles.append(profile)
    # Later injections add shot noise to earlier ones: record the SNR with the final variance.
    for obj, profile in zip(truth, profiles):
        obj["snr"] = matched_filter_snr(obj["flux"], profile, base_variance)

    # 4. Noise: Poisson on sky + sources, Gaussian read noise; the reference is a coadd.
    science = rng.poisson(np.maximum(model_sci, 0)) + rng.normal(0, sky.read_noise, shape)
    reference = (rng.poisson(np.maximum(model_ref, 0) * n_ref) + rng.normal(0, sky.read_noise * math.sqrt(n_ref), shape)) / n_ref

    # 5. Bogus: what went wrong in the camera or the subtraction; never labelled.
    truth += _add_detector_bogus(rng, science, reference, base_variance, sky, area, n_ref)
    truth += _static_residuals(static_sci - static_ref, base_variance, sx, sy, sflux, galaxies, shift, psf_ref, truth)
    np.minimum(science, sky.saturation, out=science)
    np.minimum(reference, sky.saturation, out=reference)

    mask = anomaly_mask(shape, truth, psf_sci.fwhm)
    return SkySample(
        reference.astype(np.float32), science.astype(np.float32), base_variance.astype(np.float32), mask, truth, psf_ref, psf_sci
    )


def _draw_anomaly_counts(rng: np.random.Generator, sky: SkyConfig, area: float) -> dict[str, int]:
    """How many anomalies of each type a field holds: none in `empty_fraction` of fields."""
    if rng.random() < sky.empty_fraction:
        total = 0
    else:
        total = max(1, rng.poisson(sky.anomalies_per_field * area))
    mix = np.asarray(sky.anomaly_mix) / np.sum(sky.anomaly_mix)
    return dict(zip(ANOMALY_TYPES, (int(c) for c in rng.multinomial(total, mix))))


def _place_anomaly(rng, kind, size, shift, sx, sy, sflux, galaxies, variable_candidates, sky) -> dict | None:
    """Position (in science-frame pixels) and geometry of one anomaly."""
    edge = 3.0  # keep anomalies where the network sees their whole PSF core
    if kind == "transient":
        return dict(type=kind, x=rng.uniform(edge, size - edge), y=rng.uniform(edge, size - edge))
    if kind == "variable_star":
        if not variable_candidates:
            return None
        star = variable_candidates.pop()
        # Brighter or fainter; flux_for_snr's caller stops a fade at 95% of the star.
        sign = -1.0 if rng.random() < 0.5 else 1.0
        return dict(
            type=kind, x=float(sx[star] + shift[0]), y=float(sy[star] + shift[1]), reference_flux=float(sflux[star]), sign=sign
        )
    if kind == "supernova":
        host = galaxies[rng.integers(len(galaxies))]
        radius = 1.5 * host["half_light_radius"] * rng.uniform()
        theta = rng.uniform(0, 2 * math.pi)
        x = float(np.clip(host["x"] + shift[0] + radius * math.cos(theta), edge, size - edge))
        y = float(np.clip(host["y"] + shift[1] + radius * math.sin(theta), edge, size - edge))
        return dict(type=kind, x=x, y=y, host_x=host["x"] + shift[0], host_y=host["y"] + shift[1])
    length = rng.uniform(*sky.trail_length)
    angle = rng.uniform(0, math.pi)
    cx, cy = rng.uniform(edge, size - edge, 2)
    half = np.array([math.cos(angle), math.sin(angle)]) * length / 2
    x1, y1 = np.clip([cx - half[0], cy - half[1]], 0, size - 1)
    x2, y2 = np.clip([cx + half[0], cy + half[1]], 0, size - 1)
    return dict(type=kind, x=float((x1 + x2) / 2), y=float((y1 + y2) / 2), x1=float(x1), y1=float(y1), x2=float(x2), y2=float(y2))


def _anomaly_profile(obj: dict, shape: tuple[int, int], psf: PSF) -> np.ndarray:
    """Unit-flux science-epoch profile of an anomaly: its PSF, or its trailed PSF."""
    if obj["type"] == "asteroid":
        tx, ty = trail_points(obj["x1"], obj["y1"], obj["x2"], obj["y2"])
        return render_points(shape, tx, ty, np.full(len(tx), 1.0 / len(tx)), psf)
    return render_points(shape, [obj["x"]], [obj["y"]], [1.0], psf)


def _add_detector_bogus(rng, science, reference, variance, sky, area, n_ref) -> list[dict]:
    """Cosmic rays (1-3 px, one epoch) and hot pixels / bad columns, added in place."""
    shape = science.shape
    bogus = []
    for _ in range(rng.poisson(sky.cosmic_rays_per_field * area)):
        # Sharper than any PSF: 1-3 adjacent pixels. Coadds reject most hits, so mostly science.
        x, y = rng.integers(1, shape[1] - 1), rng.integers(1, shape[0] - 1)
        n_pix = rng.integers(1, 4)
        direction = [(0, 1), (1, 0), (1, 1)][rng.integers(3)]
        pixels = [(y + k * direction[0], x + k * direction[1]) for k in range(n_pix)]
        pixels = [(py, px) for py, px in pixels if py < shape[0] and px < shape[1]]
        in_science = rng.random() < 0.75
        snr = float(_log_uniform(rng, *sky.bogus_snr_range))
        # Amplitude per pixel set so the hit's own peak significance is `snr`.
        amplitude = snr * math.sqrt(float(variance[y, x]))
        target = science if in_science else reference
        for py, px in pixels:
            target[py, px] += amplitude * rng.uniform(0.5, 1.0)
        bogus.append(dict(type="cosmic_ray", x=float(np.mean([p[1] for p in pixels])), y=float(np.mean([p[0] for p in pixels])), snr=snr, epoch="science" if in_science else "reference", n_pixels=len(pixels)))
    for _ in range(rng.poisson(sky.hot_pixels_per_field * area)):
        x, y = int(rng.integers(0, shape[1])), int(rng.integers(0, shape[0]))
        snr = float(_log_uniform(rng, *sky.bogus_snr_range))
        amplitude = snr * math.sqrt(float(variance[y, x]))
        target = science if rng.random() < 0.5 else reference
        if rng.random() < 0.2:
            # A bad column segment: a charge-transfer defect, a few sigma over many rows.
            y0, y1 = sorted(rng.integers(0, shape[0], 2))
            y1 = max(y1, y0 + 4)
            target[y0:y1, x] += amplitude * 0.3
            bogus.append(dict(type="hot_pixel", x=float(x), y=float((y0 + min(y1, shape[0]) - 1) / 2), snr=snr * 0.3, shape="column", y1=int(y0), y2=int(min(y1, shape[0]) - 1)))
        else:
            target[y, x] += amplitude
            bogus.append(dict(type="hot_pixel", x=float(x), y=float(y), snr=snr, shape="pixel"))
    return bogus


def _static_residuals(residual, variance, sx, sy, sflux, galaxies, shift, psf_ref, truth) -> list[dict]:
    """Dipoles and rings: static sources that leave a >= 5 sigma residual in the difference.

    The residual (science minus reference of the static scene, noise-free) comes from the
    sub-pixel misregistration and the seeing mismatch: the classic bogus of difference
    imaging. A source is listed when the residual peaks at >= 5 sigma within 2 px of it
    and it is bright enough to have caused that itself (flux x PSF peak >= 5 sigma), so a
    faint star beside a bright one is not blamed for its neighbour's ring.
    """
    sigma = np.sqrt(variance)
    significance = ndimage.maximum_filter(np.abs(residual) / sigma, size=5)
    h, w = residual.shape
    peak_psf = float(psf_ref.stamp().max())
    variables = [(o["x"], o["y"]) for o in truth if o["type"] == "variable_star"]
    sources = [(x + shift[0], y + shift[1], f, "star") for x, y, f in zip(sx, sy, sflux)]
    sources += [(g["x"] + shift[0], g["y"] + shift[1], 0.0, "galaxy") for g in galaxies]
    residuals = []
    for x, y, flux, kind in sources:
        ix, iy = int(round(x)), int(round(y))
        if not (0 <= ix < w and 0 <= iy < h) or any(abs(x - vx) < 0.5 and abs(y - vy) < 0.5 for vx, vy in variables):
            continue  # off the frame, or it is the variable star (an anomaly, not bogus)
        snr = float(significance[iy, ix])
        if snr >= 5.0 and (kind == "galaxy" or flux * peak_psf >= 5.0 * sigma[iy, ix]):
            residuals.append(dict(type="dipole", x=float(x), y=float(y), snr=snr, source=kind))
    return residuals


# ----------------------------------------------------------------------------
# Normalisation: one function for training, evaluation and prediction (SCIENCE.md, sec. 4)
# ----------------------------------------------------------------------------

MAD_TO_SIGMA = 1.4826  # sigma of a Gaussian per unit median absolute deviation


def robust_background(image: np.ndarray) -> tuple[float, float]:
    """Median background and robust noise (1.4826 MAD) of the finite pixels."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        msg = "image has no finite pixels"
        raise ValueError(msg)
    median = float(np.median(finite))
    sigma = MAD_TO_SIGMA * float(np.median(np.abs(finite - median)))
    if not sigma > 0:
        # A flat or mostly constant frame: fall back to the standard deviation.
        sigma = float(np.std(finite))
    if not sigma > 0:
        msg = "image is constant: its noise cannot be measured"
        raise ValueError(msg)
    return median, sigma


def normalize_pair(reference: np.ndarray, science: np.ndarray) -> np.ndarray:
    """Network input from a registered pair in any pixel units: (3, H, W) float32.

    Channels are reference, science and difference. Each epoch has its median
    subtracted and is divided by its robust noise; the difference is science minus
    reference in the images' own units, divided by sqrt(sigma_s^2 + sigma_r^2). An
    asinh stretch then keeps the noise linear (|x| < 1) while compressing bright stars
    logarithmically, so counts, ADU and photographic densities all land on one scale.
    Non-finite pixels become 0 (background) in every channel.
    """
    reference = np.asarray(reference, dtype=np.float64)
    science = np.asarray(science, dtype=np.float64)
    if reference.shape != science.shape:
        msg = f"reference {reference.shape} and science {science.shape} differ in shape"
        raise ValueError(msg)
    bg_r, sig_r = robust_background(reference)
    bg_s, sig_s = robust_background(science)
    channels = np.stack(
        [
            (reference - bg_r) / sig_r,
            (science - bg_s) / sig_s,
            ((science - bg_s) - (reference - bg_r)) / math.hypot(sig_s, sig_r),
        ]
    )
    channels = np.arcsinh(channels)
    channels[~np.isfinite(channels)] = 0.0
    return channels.astype(np.float32)


# ----------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------

# Independent seed streams: a test set never shares a sample with training or validation.
SEED_STREAMS = {"train": 0, "test": 1, "demo": 2}


class RawPair(NamedTuple):
    """Un-normalised pair (e-) and each epoch's PSF FWHM (px)."""

    reference: np.ndarray
    science: np.ndarray
    fwhm_reference: float
    fwhm_science: float


class SyntheticAstronomicalDataset(torch.utils.data.Dataset):
    """Simulated (reference, science) pairs with anomaly masks and truth tables.

    ``ds[i]`` is ``(inputs, mask)``: inputs (3, H, W) float32 from :func:`normalize_pair`,
    mask (1, H, W) float32 in {0, 1}. ``ds.truth(i)`` lists every injected anomaly and
    bogus artifact; ``ds.raw(i)`` gives the pair in e- and the two FWHMs. Sample ``i``
    depends only on ``(seed, stream, i)``.

    Parameters
    ----------
    num_samples : int
        Number of samples (>= 1).
    image_size : int
        Side in px, a multiple of 16 and >= 32.
    seed : int
        Seed of the sky; different seeds give different skies.
    stream : {"train", "test", "demo"}
        Independent seed stream, so test sets never overlap training for any seed.
    snr_range : (float, float), optional
        Anomaly SNR range (log-uniform); defaults to the sky's (3, 100).
    sky : SkyConfig, optional
        Physical parameters.
    cache : bool
        Keep rendered tensors in memory: each sample is simulated once per run.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        image_size: int = 64,
        seed: int = 0,
        stream: str = "train",
        snr_range: tuple[float, float] | None = None,
        sky: SkyConfig | None = None,
        cache: bool = True,
    ) -> None:
        if num_samples < 1:
            msg = f"num_samples must be >= 1, got {num_samples}"
            raise ValueError(msg)
        check_image_size(image_size)
        if stream not in SEED_STREAMS:
            msg = f"stream must be one of {sorted(SEED_STREAMS)}, got {stream!r}"
            raise ValueError(msg)
        sky = sky or SkyConfig()
        if snr_range is not None:
            sky = dataclasses.replace(sky, snr_range=tuple(snr_range))
        sky.validate()
        self.num_samples, self.image_size, self.seed, self.stream, self.sky = num_samples, image_size, seed, stream, sky
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.num_samples

    def _index(self, i: int) -> int:
        if not -self.num_samples <= i < self.num_samples:
            msg = f"index {i} out of range for {self.num_samples} samples"
            raise IndexError(msg)
        return i % self.num_samples

    def simulate(self, i: int) -> SkySample:
        """Render sample i from scratch (deterministic in seed, stream and i)."""
        rng = np.random.default_rng([self.seed, SEED_STREAMS[self.stream], self._index(i)])
        return simulate_sky(rng, image_size=self.image_size, sky=self.sky)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._index(i)
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        sample = self.simulate(i)
        item = (torch.from_numpy(normalize_pair(sample.reference, sample.science)), torch.from_numpy(sample.mask[None].astype(np.float32)))
        if self._cache is not None:
            self._cache[i] = item
        return item

    def truth(self, i: int) -> list[dict]:
        return self.simulate(i).truth

    def raw(self, i: int) -> RawPair:
        s = self.simulate(i)
        return RawPair(s.reference, s.science, s.psf_reference.fwhm, s.psf_science.fwhm)


# ----------------------------------------------------------------------------
# Pictures of the sky
# ----------------------------------------------------------------------------

TYPE_COLOURS = {
    "transient": "tab:red",
    "variable_star": "tab:orange",
    "supernova": "tab:purple",
    "asteroid": "tab:cyan",
    "cosmic_ray": "white",
    "hot_pixel": "yellow",
    "dipole": "lime",
}


def _pyplot():
    """matplotlib with the file-only backend: galleries work on headless machines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mark_truth(ax, truth: Sequence[dict]) -> None:
    """Anomalies as coloured circles (trails as lines), bogus as crosses."""
    for obj in truth:
        colour = TYPE_COLOURS[obj["type"]]
        if obj["type"] == "asteroid":
            ax.plot([obj["x1"], obj["x2"]], [obj["y1"], obj["y2"]], color=colour, lw=1.0, alpha=0.8)
        elif obj["type"] in ANOMALY_TYPES:
            ax.scatter(obj["x"], obj["y"], s=90, facecolors="none", edgecolors=colour, linewidths=1.2)
        else:
            ax.scatter(obj["x"], obj["y"], s=30, marker="x", color=colour, linewidths=1.0)


def save_sample_gallery(rows: Sequence[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """A PNG grid, one row per sample: reference, science, difference, truth mask[, prediction].

    Each row is a dict with ``inputs`` (3, H, W), ``mask`` (H, W), ``truth`` and optionally
    ``prediction`` (H, W) probabilities and a ``label``.
    """
    plt = _pyplot()
    with_prediction = any("prediction" in r for r in rows)
    columns = ["reference", "science", "difference", "truth mask"] + (["prediction"] if with_prediction else [])
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(2.3 * len(columns), 2.3 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        panels = [row["inputs"][0], row["inputs"][1], row["inputs"][2], row["mask"]] + ([row.get("prediction", np.zeros_like(row["mask"]))] if with_prediction else [])
        for c, (ax, image) in enumerate(zip(axes[r], panels)):
            if c < 3:
                lim = 3.0 if c == 2 else None
                ax.imshow(image, cmap="gray" if c < 2 else "coolwarm", origin="lower", vmin=-lim if lim else None, vmax=lim)
            else:
                ax.imshow(image, cmap="magma", origin="lower", vmin=0, vmax=1)
            if c in (1, 2, 3):
                _mark_truth(ax, row["truth"])
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlim(-0.5, image.shape[1] - 0.5)
            ax.set_ylim(-0.5, image.shape[0] - 0.5)
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
        axes[r][0].set_ylabel(row.get("label", f"sample {r}"), fontsize=8)
    handles = [plt.Line2D([], [], color=colour, marker="o" if t in ANOMALY_TYPES else "x", ls="", label=t.replace("_", " ")) for t, colour in TYPE_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dataset_gallery(dataset: SyntheticAstronomicalDataset, path: str | os.PathLike, *, count: int = 8) -> Path:
    """Gallery of the first `count` samples of a dataset, with their truth markers."""
    rows = []
    for i in range(min(count, len(dataset))):
        inputs, mask = dataset[i]
        truth = dataset.truth(i)
        kinds = sorted({o["type"] for o in truth if o["type"] in ANOMALY_TYPES})
        rows.append(dict(inputs=inputs.numpy(), mask=mask[0].numpy(), truth=truth, label=", ".join(k.replace("_", " ") for k in kinds) or "no anomaly"))
    return save_sample_gallery(rows, path, title="AstrID synthetic sky: circles = anomalies, crosses = bogus")
