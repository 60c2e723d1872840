"""Generation speed of this checkout against an older one, and proof that the data did not change.

    git worktree add /tmp/astrid-old <commit>
    python benchmarks/compare_generation.py /tmp/astrid-old/standalone_training.py

Prints one JSON object. For each image size:

- ``old`` and ``new``: samples/s of ``SyntheticAstronomicalDataset(cache=False)[i]``, the
  median of 7 chunks of distinct samples, old and new chunks alternating in one process
  so that machine noise hits both alike; ``ratio`` = new / old.
- ``stages``: seconds per sample spent inside each simulator stage (inclusive of what it
  calls), old and new, from a separate pass with timers around each stage.
- ``identical``: whether every input tensor and mask is bitwise equal between the two
  versions, and the largest relative difference in the truth tables (flux and SNR
  solved by iteration may differ in the last digits).

A speed-up that changes the data would need the shipped weights and every figure in
STANDALONE_TRAINING.md re-measured; this script says which kind a change is.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

import bench_training  # beside this file; its `st` is this checkout's module

CHUNKS = 7
SAMPLES_PER_CHUNK = {64: 40, 128: 15, 256: 4}
STAGES = ("moffat_stamps", "sersic_image", "convolve_psf", "inject_anomalies", "observe", "_static_residuals", "anomaly_mask", "normalize_pair")


def load(path: Path, name: str) -> ModuleType:
    """Import a standalone_training.py from `path` under its own module name."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def alternating_rates(modules: dict[str, ModuleType], size: int) -> dict[str, float]:
    """Median samples/s of each module, chunk k of every module before chunk k + 1 of any."""
    n = SAMPLES_PER_CHUNK[size]
    datasets = {name: m.SyntheticAstronomicalDataset(CHUNKS * n + 1, image_size=size, seed=11, cache=False) for name, m in modules.items()}
    for ds in datasets.values():
        ds[CHUNKS * n]  # first call pays for FFT plans and caches

    def runner(ds):
        def run_chunk(k: int) -> int:
            for i in range(k * n, (k + 1) * n):
                ds[i]
            return n
        return run_chunk

    rates = bench_training.median_rates({name: runner(ds) for name, ds in datasets.items()}, chunks=CHUNKS, device=torch.device("cpu"))
    return {name: rate["median"] for name, rate in rates.items()}


def stage_seconds(module: ModuleType, size: int) -> dict[str, float]:
    """Seconds per sample inside each stage the module has, timers wrapped around each."""
    spent = dict.fromkeys(STAGES, 0.0)
    originals = {name: getattr(module, name) for name in STAGES if hasattr(module, name)}

    def timed(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            began = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - began
        return wrapper

    n = CHUNKS * SAMPLES_PER_CHUNK[size]
    ds = module.SyntheticAstronomicalDataset(n, image_size=size, seed=12, cache=False)
    try:
        for name, fn in originals.items():
            setattr(module, name, timed(name, fn))
        for i in range(n):
            ds[i]
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
    return {name: spent[name] / n for name in originals}


def identical(old: ModuleType, new: ModuleType, size: int, count: int) -> dict:
    """Bitwise comparison of inputs and masks, and the truth tables' largest difference."""
    datasets = [m.SyntheticAstronomicalDataset(count, image_size=size, seed=13, cache=False) for m in (old, new)]
    same_pixels, worst = True, 0.0
    for i in range(count):
        (x_old, m_old), (x_new, m_new) = (ds[i] for ds in datasets)
        same_pixels &= bool(np.array_equal(x_old.numpy(), x_new.numpy()) and np.array_equal(m_old.numpy(), m_new.numpy()))
        t_old, t_new = (ds.truth(i) for ds in datasets)
        if len(t_old) != len(t_new) or any(a.keys() != b.keys() for a, b in zip(t_old, t_new)):
            return {"pixels": same_pixels, "truth_max_relative_difference": None, "samples": count}
        for a, b in zip(t_old, t_new):
            for key, value in a.items():
                if isinstance(value, str):
                    same_pixels &= value == b[key]
                else:
                    worst = max(worst, abs(value - b[key]) / max(abs(value), 1e-300))
    return {"pixels": same_pixels, "truth_max_relative_difference": worst, "samples": count}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="path to the older standalone_training.py")
    parser.add_argument("--sizes", type=int, nargs="+", default=sorted(SAMPLES_PER_CHUNK), choices=sorted(SAMPLES_PER_CHUNK))
    args = parser.parse_args(argv)
    if not args.old.is_file():
        parser.error(f"{args.old} is not a file")
    modules = {"old": load(args.old, "astrid_old"), "new": bench_training.st}
    report = {}
    for size in args.sizes:
        rates = alternating_rates(modules, size)
        stages = {name: stage_seconds(m, size) for name, m in modules.items()}
        report[size] = {
            "old": round(rates["old"], 1),
            "new": round(rates["new"], 1),
            "ratio": round(rates["new"] / rates["old"], 2),
            "stages_ms_per_sample": {stage: {name: round(1e3 * stages[name][stage], 3) for name in modules if stage in stages[name]} for stage in STAGES},
            "identical": identical(modules["old"], modules["new"], size, count=CHUNKS * SAMPLES_PER_CHUNK[size]),
        }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
