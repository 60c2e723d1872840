"""Another instrument's real cosmic rays as bogus: how many pass AstrID, beside S_corr alone, on pairs where nothing
changed.

    pip install ccdproc    # ships the frame, and brings astroscrappy (L.A.Cosmic)
    python benchmarks/bench_real_cosmic_rays.py [--pairs 24] [--output FILE]

The frame is the raw 150 s exposure of the SAAO 1.0 m telescope that ccdproc ships with its
tests (`a8280271.fits`, STE3 CCD, gain 1.9 e-/ADU, read noise 5 e-), trimmed to its 512x512
illuminated pixels. Its cosmic rays come from the detector, not from any simulator:
L.A.Cosmic (astroscrappy, with the header's gain and read noise) finds them, and its cleaned
frame is the static sky.

Each pair is made as `evaluate`'s real-pixel pairs are (`_real_pixel_pair`, with no source
injected): both epochs are the cleaned frame plus independent noise at its own level; the
science epoch is blurred to 1-1.5x the seeing and shifted by up to half a pixel; the
reference gets a sky gradient of 0, 2, 5 or 20 sigma. Then the science epoch gets the
cosmic rays back, on the pixels where the detector recorded them (after the blur and shift,
as a detector would). Nothing changed on the sky, so every detection is false: one within
MATCH_RADIUS of a cosmic ray is a cosmic ray passed; the rest are counted per megapixel.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.ndimage
import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import standalone_training as st  # noqa: E402
from bench_training import emit, machine  # noqa: E402


def saao_frame() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The trimmed raw frame, its L.A.Cosmic-cleaned copy, and the cosmic rays' mask (ImportError without ccdproc)."""
    import astroscrappy  # ccdproc's dependency: an optional install for the benchmarks that read this frame
    import ccdproc

    path = Path(ccdproc.__file__).parent / "tests" / "data" / "a8280271.fits"
    data, header = st.read_fits_image(path)[:2]
    # TRIMSEC is [17:528, 1:520]; rows 513-520 are dark too (a median of 217 ADU against 300).
    raw = np.asarray(data, dtype=np.float64)[:512, 16:528]
    mask, clean = astroscrappy.detect_cosmics(
        raw, gain=float(header["GAIN"]), readnoise=float(header["RDNOISE"]), sigclip=4.5
    )
    return raw, np.asarray(clean, dtype=np.float64), np.asarray(mask, dtype=bool)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=24, help="pairs, each with its own noise, seeing, shift, gradient")
    parser.add_argument("--seed", type=int, default=st.DEFAULT_EVAL_SEED)
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    try:
        raw, clean, mask = saao_frame()
    except ImportError:
        sys.exit("this benchmark needs ccdproc (its test frame) and astroscrappy: pip install ccdproc")
    rays = raw - clean  # the cosmic rays' own counts, zero off the mask
    rays[~mask] = 0.0
    groups, n_rays = scipy.ndimage.label(mask, structure=np.ones((3, 3)))
    centres = np.array(scipy.ndimage.center_of_mass(rays, groups, range(1, n_rays + 1)))  # (row, col)
    sigma = st.robust_background(clean)[1]
    psf = st.measure_psf_fwhm(clean)
    predictor = st.load_predictor(checkpoint=None, threshold=None, device="cpu")
    counts = {name: {"passed": 0, "elsewhere": 0, "rays": set()} for name in ("network", "significance_alone")}
    megapixels, refused = 0.0, []
    for r in range(args.pairs):
        rng = np.random.default_rng([args.seed, 7, r])
        gradient = st.REAL_PIXEL_GRADIENTS[r % len(st.REAL_PIXEL_GRADIENTS)]
        reference, science, _, case = st._real_pixel_pair(
            clean, rng, sigma=sigma, fwhm=psf.fwhm, gradient=gradient, sources=0
        )
        science = science + rays
        try:
            found = st.find_changes(
                predictor.model, reference, science, threshold=predictor.threshold, device=predictor.device
            )
        except st.DataError as exc:
            refused.append(dict(case, refused=st._one_line(exc)))
            continue
        megapixels += float(found.valid.sum()) / 1e6
        for name, detections in (
            ("network", found.detections),
            ("significance_alone", st.significance_detections(found.pair.subtraction)),
        ):
            if not detections:
                continue
            points = np.array([[d["x"], d["y"]] for d in detections])
            near = np.hypot(points[:, None, 0] - centres[None, :, 1], points[:, None, 1] - centres[None, :, 0])
            at_ray = near.min(axis=1) <= st.MATCH_RADIUS
            passed = np.flatnonzero(near.min(axis=0) <= st.MATCH_RADIUS)
            counts[name]["passed"] += len(passed)
            counts[name]["rays"].update(int(k) for k in passed)
            counts[name]["elsewhere"] += int(np.sum(~at_ray))
    pairs_run = args.pairs - len(refused)
    report = {
        "command": "python benchmarks/bench_real_cosmic_rays.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "frame": "ccdproc tests/data/a8280271.fits: SAAO 1.0 m, STE3 CCD, raw 150 s, trimmed to 512x512",
        "cosmic_rays": n_rays,
        "cosmic_ray_pixels": int(mask.sum()),
        "frame_noise_adu": sigma,
        "frame_fwhm_px": psf.fwhm,
        "fwhm_measured": psf.measured,
        "pairs": pairs_run,
        "refused": refused,
        "megapixels": megapixels,
        "rays": [
            dict(
                x=round(float(c[1]), 1),
                y=round(float(c[0]), 1),
                pixels=int(np.sum(groups == k + 1)),
                peak_sigma=round(float(rays[groups == k + 1].max() / sigma), 1),
            )
            for k, c in enumerate(centres)
        ],
    }
    total = n_rays * pairs_run
    for name, c in counts.items():
        low, high = scipy.stats.binomtest(c["passed"], total).proportion_ci(method="wilson") if total else (None, None)
        report[name] = dict(
            passed=c["passed"],
            cosmic_rays_shown=total,
            pass_rate=c["passed"] / total if total else None,
            interval=[float(low), float(high)] if total else None,
            distinct_rays_passed=sorted(c["rays"]),  # indices into "rays"
            false_elsewhere=c["elsewhere"],
            false_elsewhere_per_megapixel=c["elsewhere"] / megapixels if megapixels else None,
        )
    emit(report, args.output)


if __name__ == "__main__":
    main()
