"""The network's windows on a large pair: around the candidates alone against the whole image's, in one run.

    python benchmarks/bench_scoring_windows.py [--size 4096] [--repeats 2] [--output FILE]

On the star field of `bench_predict.star_field_pair` (subtracted as `predict` does), times
`probability_map` with the candidates' boxes (`regions`: what `find_changes` passes) and
without them (every pixel's window), alternating, and checks what the shortcut may not
change: the probability on the candidates' pixels and 2 px around them (largest difference)
and `detect_changes`' detections (equal or not). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import scipy.ndimage
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import standalone_training as st  # noqa: E402
from bench_predict import star_field_pair  # noqa: E402
from bench_training import emit, machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="px side of the pair")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each kind, alternating")
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args()
    reference, science = star_field_pair(args.size, seed=1)
    sub = st.subtract_pair(reference, science)
    found = st.change_candidates(sub.subtraction, valid=sub.subtraction.valid)
    boxes = scipy.ndimage.find_objects(found.segments)
    predictor = st.load_predictor(checkpoint=None, threshold=None, device="cpu")
    height, width, windows = st.scoring_windows(
        args.size, args.size, tile=st.PREDICT_TILE, margin=st.PREDICT_MARGIN, regions=boxes
    )
    full_h, full_w, full_windows = st.scoring_windows(args.size, args.size, tile=st.PREDICT_TILE, margin=st.PREDICT_MARGIN)
    seconds: dict[str, list[float]] = {"candidates": [], "every pixel": []}
    maps = {}
    for _ in range(args.repeats):
        for kind, regions in (("candidates", boxes), ("every pixel", None)):
            start = time.perf_counter()
            maps[kind] = st.probability_map(
                predictor.model,
                sub.reference,
                sub.science,
                statistics=sub.statistics,
                device=torch.device("cpu"),
                types=True,
                regions=regions,
            )[0]
            seconds[kind].append(time.perf_counter() - start)
    near = scipy.ndimage.binary_dilation(found.segments > 0, iterations=2)
    detections = {
        kind: st.detect_changes(prob, sub.subtraction, threshold=predictor.threshold, candidates=found)
        for kind, prob in maps.items()
    }
    result = dict(
        size=args.size,
        candidates=len(found.every),
        windows={
            "candidates": dict(count=len(windows), px=height, mpix=len(windows) * height * width / 1e6),
            "every pixel": dict(count=len(full_windows), px=full_h, mpix=len(full_windows) * full_h * full_w / 1e6),
        },
        seconds=seconds,
        median_seconds={kind: statistics.median(v) for kind, v in seconds.items()},
        max_probability_difference_near_candidates=float(
            np.abs(maps["candidates"][near] - maps["every pixel"][near]).max()
        ),
        detections={kind: len(d) for kind, d in detections.items()},
        same_detections=detections["candidates"] == detections["every pixel"],
        **machine(),
    )
    emit(result, args.output, indent=1)


if __name__ == "__main__":
    main()
