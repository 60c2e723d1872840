"""README's picture of `predict`: docs/overlay.png, made from real pixels by the public command.

    python benchmarks/docs_overlay.py            # writes docs/overlay.png (about 15 s)

The pair is the whole M13 DSS cutout that astropy ships, built as the real-pixel probe
builds its pairs (benchmarks/real_pixel_probe.py: each epoch is the plate plus independent
noise at its own robust noise, the sources injected into the science epoch at a known
matched-filter SNR on blank-ish sky), with the plate's WCS in both headers. The sources
are at SNR 5, 7, 10, 15, 25 and 50; the script prints which of them `predict` found, so
that the picture is never taken on a lucky draw without saying so.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import real_pixel_probe as probe  # noqa: E402 -- the probe's pair-building helpers

SNRS = (5, 7, 10, 15, 25, 50)
SEED = 7


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(ROOT / "docs" / "overlay.png"), help="where the picture goes")
    args = parser.parse_args(argv)
    st = probe.load_module(ROOT / "standalone_training.py")
    data, _, wcs = st.read_fits_image(st.M13_FITS)
    background, sigma = st.robust_background(data)
    psf = st.PSF(st.measure_psf_fwhm(data).fwhm, st.ASSUMED_MOFFAT_BETA)
    blank = probe.ndimage.maximum_filter(data, size=2 * probe.BLANK_RADIUS + 1) < background + probe.BLANK_SIGMA * sigma
    frame = probe.Frame(data, wcs, background, sigma, psf, 0, blank)
    pair = probe.injected_pair(st, frame, SNRS, np.random.default_rng(SEED))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        probe.write_fits(work / "science.fits", pair.science, wcs)
        probe.write_fits(work / "reference.fits", pair.reference, wcs)
        command = [sys.executable, str(ROOT / "standalone_training.py"), "predict", "--science", "science.fits",
                   "--reference", "reference.fits", "--output-dir", "out"]
        result = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300, check=False)
        if result.returncode != 0:
            print(result.stderr[-2000:], file=sys.stderr)
            return 1
        rows = np.genfromtxt(work / "out" / "detections.csv", delimiter=",", names=True, dtype=None, encoding="utf-8", ndmin=1)
        shutil.copyfile(work / "out" / "overlay.png", args.output)
    found = [any(np.hypot(r["x"] - x, r["y"] - y) < 3 for r in rows) for x, y in pair.sites]
    for (x, y), snr, hit in sorted(zip(pair.sites, pair.snr, found), key=lambda t: t[1]):
        print(f"SNR {snr:4.0f} at ({x:6.1f}, {y:6.1f}): {'found' if hit else 'missed'}")
    print(f"{len(rows)} detections, {sum(found)} of {len(SNRS)} injected sources -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
