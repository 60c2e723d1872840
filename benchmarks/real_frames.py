"""Injection-recovery on real frames of other telescopes, one report per frame: `evaluate`'s real-pixel test on frames
the project never trained on nor was tuned for.

    python benchmarks/real_frames.py [--pairs 24] [--output FILE] [FITS ...]

Without FITS paths the frames are the two real frames that the dependencies ship with their
tests:
- the 256x256 r-band CCD thumbnail in astroquery's astrometry.net tests (a 90 s exposure of
  2018, sky 2773 ADU, noise 3 ADU): undersampled, its stars are about one pixel wide, so
  their FWHM is below MIN_STAR_FWHM and no seeing can be measured on it;
- when ccdproc is installed (`pip install ccdproc`), the raw 150 s frame of the SAAO 1.0 m
  telescope in its tests, trimmed to 512x512 and cleaned of its cosmic rays by L.A.Cosmic
  (`bench_real_cosmic_rays.saao_frame`; the rays themselves are that benchmark's subject):
  stars 7 px wide, a handful of them.

Each frame makes `--pairs` pairs as `evaluate` makes them from M13 (`real_pixel_evaluation`:
independent noise at the frame's own level in both epochs, a seeing change up to 1.5x, a
shift up to half a pixel, a gradient of 0-20 sigma in the reference, ten point sources at
matched-filter SNR 3-60). Reported per frame, for the network and its three peers:
completeness, SNR at 50%, completeness at SNR >= 10, false detections per Mpix, pairs
refused. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import astroquery

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import standalone_training as st  # noqa: E402
from bench_real_cosmic_rays import saao_frame  # noqa: E402
from bench_training import emit, machine  # noqa: E402

THUMBNAIL = Path(astroquery.__file__).parent / "astrometry_net" / "tests" / "data" / "thumbnail-image.fit.gz"


def default_frames() -> list[st.NullFrame]:
    """The astrometry.net thumbnail, and the cleaned SAAO frame where ccdproc is installed."""
    frames = [st.NullFrame("astrometry.net test thumbnail (r, 90 s CCD, 256x256)", st.read_fits_image(THUMBNAIL)[0])]
    try:
        clean = saao_frame()[1]
    except ImportError:
        print("skipping the SAAO frame: it needs ccdproc (pip install ccdproc)", file=sys.stderr)
    else:
        frames.append(st.NullFrame("SAAO 1.0 m raw frame, cosmic rays cleaned (ccdproc's tests, 512x512)", clean))
    return frames


def summary(block: dict | None) -> dict | None:
    """The figures of one detector on one frame, from `real_pixel_evaluation`'s block."""
    if block is None:
        return None
    overall = block["completeness"]["overall"]
    at_10 = block["completeness_snr_ge_10"]["point"]
    return {
        "completeness": [overall["count"], overall["total"]],
        "snr50": block["snr50"]["overall"],
        "snr50_interval": block["snr50_interval"]["overall"],
        "snr_ge_10": [at_10["count"], at_10["total"]],
        "false_per_megapixel": block["false_per_megapixel"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("fits", nargs="*", help="FITS frames (default: the two the dependencies ship)")
    parser.add_argument("--pairs", type=int, default=st.REAL_PIXEL_PAIRS, help="pairs per frame")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    frames = (
        [st.NullFrame(Path(p).name, st.read_fits_image(p)[0]) for p in args.fits] if args.fits else default_frames()
    )
    predictor = st.load_predictor(checkpoint=None, threshold=None, device="cpu")
    report = {"command": "python benchmarks/real_frames.py " + " ".join(sys.argv[1:]), "machine": machine()}
    for frame in frames:
        psf = st.measure_psf_fwhm(frame.data)
        found = st.real_pixel_evaluation(
            predictor.model, [frame], threshold=predictor.threshold, device=predictor.device, pairs=args.pairs
        )
        report[frame.name] = {
            "shape": list(frame.data.shape),
            "fwhm_px": psf.fwhm,
            "fwhm_measured": psf.measured,
            "pairs": found["pairs"],
            "refused": sum("refused" in case for case in found["cases"]),
            "megapixels": found["megapixels"],
            **{name: summary(found[name]) for name in ("network", "significance_alone", "baseline", "sextractor")},
        }
    emit(report, args.output)


if __name__ == "__main__":
    main()
