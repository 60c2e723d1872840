"""How fast `predict` runs on one device: prints one JSON object, measured in one run.

    python benchmarks/bench_predict.py [--sizes 1024 4096] [--old /tmp/astrid-old/standalone_training.py]
                                       [--pairs 8 --pair-size 512] [--repeats 3] [--device cpu]

What is measured, in one process, on synthetic star fields written to FITS (stars, a flux
ratio of 1.2 between the epochs and a few new sources, so that every stage does real work):

- ``predict``: `run_prediction` end to end, per image size (FITS in, every output file out),
  in Mpix/s, and the seconds each stage took inside it (reading, PSF measurement, flux fit,
  pair statistics, probability map, significance, detection, catalogue, writing). Stages
  are timed by wrapping the module's own functions, so the path timed is predict's own.
- ``old_predict``: the previous release's `run_prediction` (``--old``, its shipped weights)
  on the same files, alternating with this one, repeat by repeat: the speed-up is a ratio
  measured under the same load.
- ``limit``: the model's forward GFLOP per window (torch.utils.flop_counter.FlopCounterMode:
  convolutions only) and the GFLOP/s its forward reaches on a batch of windows as
  `probability_map` batches them, on the same device and threads: the machine's
  convolution throughput on this model's own layer shapes. ``gflop_per_mpix`` counts the
  windows' overlap; ``fraction_of_limit`` is predict's Mpix/s times that, over the limit.
- ``pairs``: `run_pairs` over a list of `--pairs` pairs of `--pair-size` px, one model
  load, in pairs/s and Mpix/s.
- ``peak_rss_mb``: this process's peak resident memory, after all of the above.
- ``receptive_field`` (``--receptive-field``): why PREDICT_MARGIN is what it is
  (:func:`receptive_field`), measured after the peak RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from astropy.io import fits
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import standalone_training as st  # noqa: E402
from bench_training import machine, peak_rss_mb  # noqa: E402
from null_tests_before import load_module  # noqa: E402

STAGES = {  # stage -> the module functions whose time it is ("subtraction" holds registration, seeing, flux_ratio and zogy)
    "read": ("read_pair",),
    "subtraction": ("subtract_pair",),
    "registration": ("register_pair",),
    "seeing": ("measure_seeing",),
    "flux_ratio": ("pair_flux_ratio",),
    "zogy": ("zogy_subtraction",),
    "probability_map": ("probability_map",),
    "detect": ("detect_changes",),
    "catalogue": ("detection_catalog",),
    "write": ("write_detections_csv", "write_json", "write_detections_ecsv", "write_detections_ds9", "write_probability_fits", "save_overlay"),
}
FORWARD_REPEATS = 3


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------


def star_field_pair(size: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference, science) float32: one star per 1500 px, science = 1.2 x reference + 20 + new sources, fresh noise each."""
    rng = np.random.default_rng(seed)
    psf = st.PSF(2.5, st.ASSUMED_MOFFAT_BETA)
    n = size * size // 1500
    stars = st.render_points((size, size), rng.uniform(0, size, n), rng.uniform(0, size, n), 10 ** rng.uniform(2, 4.5, n), psf)
    k = max(1, n // 100)
    new = st.render_points((size, size), rng.uniform(0, size, k), rng.uniform(0, size, k), np.full(k, 1500.0), psf)
    reference = stars + 100 + rng.normal(0, 5, (size, size))
    science = 1.2 * (stars + new) + 120 + rng.normal(0, 6, (size, size))
    return reference.astype(np.float32), science.astype(np.float32)


def write_pair(directory: Path, name: str, size: int, *, seed: int) -> tuple[Path, Path]:
    reference, science = star_field_pair(size, seed=seed)
    paths = directory / f"{name}_ref.fits", directory / f"{name}_sci.fits"
    for path, data in zip(paths, (reference, science)):
        fits.PrimaryHDU(data).writeto(path)
    return paths


# ----------------------------------------------------------------------------
# What is measured
# ----------------------------------------------------------------------------


class StageTimer:
    """Wraps module functions to add their wall time to a stage, while the context is open."""

    def __init__(self, module) -> None:
        self.module, self.seconds, self.saved = module, {}, {}

    def __enter__(self) -> "StageTimer":
        for stage, names in STAGES.items():
            for name in names:
                self.saved[name] = getattr(self.module, name)
                setattr(self.module, name, self._timed(stage, self.saved[name]))
        return self

    def _timed(self, stage: str, function):
        def timed(*args, **kwargs):
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - began

        return timed

    def __exit__(self, *exc) -> None:
        for name, function in self.saved.items():
            setattr(self.module, name, function)


def predict_once(module, reference: Path, science: Path, out: Path, *, device: str, timer: bool) -> tuple[float, dict]:
    """Seconds of one `run_prediction` of `module`, and its stages' seconds (this checkout only)."""
    kwargs = dict(science=str(science), reference=str(reference), reference_survey=None, output_dir=str(out), checkpoint=None,
                  threshold=None, device=device, max_pixels=st.DEFAULT_MAX_PIXELS)
    stages = StageTimer(module) if timer else None
    began = time.perf_counter()
    if stages:
        with stages:
            module.run_prediction(**kwargs, overwrite=True)
    else:
        module.run_prediction(**kwargs)
    return time.perf_counter() - began, (stages.seconds if stages else {})


def predict_rates(sizes: list[int], *, old, device: str, repeats: int, workdir: Path) -> dict:
    """Per size: this checkout's and the old release's seconds per image, alternating, repeat by repeat."""
    result = {}
    for size in sizes:
        reference, science = write_pair(workdir, f"p{size}", size, seed=size)
        reps = repeats if size <= 2048 else 1  # a 4096 px image takes a minute a pass on a 2-core CPU
        new_s, old_s, stage_runs = [], [], []
        for k in range(reps):
            seconds, stages = predict_once(st, reference, science, workdir / f"new{size}", device=device, timer=True)
            new_s.append(seconds)
            stage_runs.append(stages)
            if old is not None:
                old_s.append(predict_once(old, reference, science, workdir / f"old{size}_{k}", device=device, timer=False)[0])
        mpix = size * size / 1e6
        new = statistics.median(new_s)
        entry = dict(mpix=mpix, repeats=reps, seconds=new_s, mpix_per_s=mpix / new,
                     stage_seconds={s: statistics.median(r.get(s, 0.0) for r in stage_runs) for s in STAGES})
        if old_s:
            entry.update(old_seconds=old_s, old_mpix_per_s=mpix / statistics.median(old_s), speedup=statistics.median(old_s) / new)
        result[str(size)] = entry
    return result


def window_gflop_per_mpix(size: int, gflop_per_window_px: float) -> float:
    """Forward GFLOP per Mpix of a size x size image, counting every window's overlap (convolutions scale with pixels)."""
    window, cores = st._windows(size)
    return len(cores) ** 2 * window * window * gflop_per_window_px * 1e6 / (size * size)


def forward_limit(model: torch.nn.Module, device: torch.device) -> dict:
    """The machine's convolution throughput on this model: GFLOP/s of its forward on batches as `probability_map` sends them.

    Measured on two window shapes: a batch of 256 px windows and one PREDICT_TILE window.
    The limit is the faster of the two; FLOPs are counted on each, per window pixel.
    """
    ctx, _ = st.autocast_context(device)
    shapes = {}
    for tile in (256, st.PREDICT_TILE):
        per_batch = max(1, st.PREDICT_BATCH_PIXELS // (tile * tile))
        x = torch.randn(per_batch, 3, tile, tile, device=device).contiguous(memory_format=torch.channels_last)
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(x)
        gflop = counter.get_total_flops() / 1e9
        seconds = []
        with torch.inference_mode(), ctx:
            model(x)  # warm-up: oneDNN primitive creation
            for _ in range(FORWARD_REPEATS):
                began = time.perf_counter()
                model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds.append(time.perf_counter() - began)
        shapes[f"{per_batch}x{tile}px"] = dict(gflop=gflop, gflop_per_window_px=gflop / (per_batch * tile * tile), seconds=seconds, gflop_per_s=gflop / statistics.median(seconds))
    best = max(shapes.values(), key=lambda v: v["gflop_per_s"])
    return dict(limit_gflop_per_s=best["gflop_per_s"], gflop_per_window_px=best["gflop_per_window_px"], shapes=shapes)


def receptive_field(model: torch.nn.Module, device: torch.device, *, size: int = 2048) -> dict:
    """Why PREDICT_MARGIN: how far a pixel's output looks, and what seams cost against one whole-image pass.

    - ``gradient_within_px``: the share of |d output / d input| of the centre pixel of a
      320 px star-field window that lies within R px of it (Chebyshev distance): median and
      least over eight windows spread over the field.
    - ``seams``: the probability map of a `size` px star field through windows against one
      pass over the whole image: the largest change in probability, and the pixels changed
      by more than 0.01. Windows of PREDICT_TILE px and PREDICT_MARGIN, of 768 px with
      PREDICT_MARGIN (small enough that the margin alone separates a core from a seam),
      and the former 256 px windows with 32 px margins.
    """
    reference, science = star_field_pair(size, seed=7)
    statistics_ = st.pair_statistics(reference, science, flux_ratio=1.2, fwhm_reference=2.5, fwhm_science=2.5)
    half, probes = 160, 8  # 320 px windows: room beyond the 130 px the field can reach
    shares = []
    for k in range(probes):
        y0, x0 = (k * 613) % (size - 2 * half), (k * 997) % (size - 2 * half)  # spread over the field
        sy, sx = slice(y0, y0 + 2 * half), slice(x0, x0 + 2 * half)
        x = torch.from_numpy(st.normalize_pair(reference[sy, sx], science[sy, sx], statistics=statistics_))[None].to(device).requires_grad_(True)
        model(x)[0, 0, half, half].backward()
        grad = x.grad[0].abs().sum(0).cpu().numpy()
        yy, xx = np.indices(grad.shape)
        distance = np.maximum(abs(yy - half), abs(xx - half))
        shares.append([grad[distance <= r].sum() / grad.sum() for r in (16, 32, 64, 96, 130)])
    within = {str(r): dict(median=float(m), min=float(lo)) for r, m, lo in zip((16, 32, 64, 96, 130), np.median(shares, axis=0), np.min(shares, axis=0))}
    whole = st.probability_map(model, reference, science, statistics=statistics_, device=device, tile=size)
    seams = {}
    for tile, margin in ((256, 32), (768, st.PREDICT_MARGIN), (st.PREDICT_TILE, st.PREDICT_MARGIN)):
        change = np.abs(st.probability_map(model, reference, science, statistics=statistics_, device=device, tile=tile, margin=margin) - whole)
        seams[f"{tile}/{margin}"] = dict(max_abs_change=float(change.max()), pixels_changed_over_0_01=int((change > 0.01).sum()))
    return dict(image_px=size, gradient_within_px=within, seams=seams)


def pairs_rate(*, count: int, size: int, device: str, workdir: Path) -> dict:
    """`run_pairs` over `count` fresh pairs: one model load, everything written."""
    lines = ["name,science,reference"]
    for i in range(count):
        reference, science = write_pair(workdir, f"list{i}", size, seed=1000 + i)
        lines.append(f"pair{i},{science.name},{reference.name}")
    (workdir / "pairs.csv").write_text("\n".join(lines) + "\n")
    began = time.perf_counter()
    summary = st.run_pairs(pairs=str(workdir / "pairs.csv"), output_dir=str(workdir / "pairs_out"), checkpoint=None, threshold=None, device=device, max_pixels=st.DEFAULT_MAX_PIXELS)
    seconds = time.perf_counter() - began
    return dict(pairs=count, pair_px=size, done=len(summary["done"]), seconds=seconds, pairs_per_s=count / seconds, mpix_per_s=count * size * size / 1e6 / seconds)


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------


def benchmark(*, sizes: list[int], old_module: Path | None, device: str, repeats: int, pairs: int, pair_size: int, field: bool) -> dict:
    dev = st.resolve_device(device)
    old = load_module(old_module) if old_module else None
    model = st.load_predictor(checkpoint=None, threshold=None, device=device).model
    limit = forward_limit(model, dev)
    # predict's own lines go to stderr: stdout is the JSON report.
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp, contextlib.redirect_stdout(sys.stderr):
        work = Path(tmp)
        rates = predict_rates(sizes, old=old, device=device, repeats=repeats, workdir=work)
        listed = pairs_rate(count=pairs, size=pair_size, device=device, workdir=work)
    for size, entry in rates.items():
        entry["gflop_per_mpix"] = window_gflop_per_mpix(int(size), limit["gflop_per_window_px"])
        entry["fraction_of_limit"] = entry["mpix_per_s"] * entry["gflop_per_mpix"] / limit["limit_gflop_per_s"]
        entry["probability_map_fraction_of_limit"] = entry["mpix"] * entry["gflop_per_mpix"] / entry["stage_seconds"]["probability_map"] / limit["limit_gflop_per_s"]
    return {
        "statistic": f"median over repeats (sizes up to 2048 px: {repeats}; larger: 1), this checkout and --old alternating",
        "predict": rates,
        "limit": limit,
        "pairs": listed,
        "peak_rss_mb": peak_rss_mb(),
        "receptive_field": receptive_field(model, dev) if field else None,
        "old_module": str(old_module) if old_module else None,
        "predict_tile": st.PREDICT_TILE,
        "predict_margin": st.PREDICT_MARGIN,
        "device": str(dev),
        "autocast": "none (fp32)" if dev.type != "cuda" else "bf16/fp16 autocast",
        "threads": torch.get_num_threads(),
        **machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096], help="px sides of the single images")
    parser.add_argument("--old", type=Path, help="standalone_training.py of the previous release, timed on the same files")
    parser.add_argument("--repeats", type=int, default=3, help="passes per size up to 2048 px (larger sizes: one)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs in the list")
    parser.add_argument("--pair-size", type=int, default=512, help="px side of each listed pair")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--receptive-field", action="store_true", help="also measure how far the model looks (after peak RSS: it holds a whole 2048 px map)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    st.configure_logging()
    report = benchmark(sizes=args.sizes, old_module=args.old, device=args.device, repeats=args.repeats, pairs=args.pairs, pair_size=args.pair_size, field=args.receptive_field)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
