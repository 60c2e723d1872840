"""How fast AstrID trains on one device: prints one JSON object, measured in one run.

    python benchmarks/bench_training.py [--image-size 64] [--batch-size 8] [--device cpu]
                                        [--steps 30] [--warmup 5] [--threads 0]

Every rate is the median over several timed chunks (never a mean: a shared machine
gives the odd slow chunk), and the JSON says so. What is measured, in data-flow order:

- ``synth_samples_per_s``: SyntheticAstronomicalDataset(cache=False), one process.
- ``synth_floor_samples_per_s``: only the noise draws and the normalisation every
  simulated sample needs, however its scene is rendered: the ceiling on generation in
  one process. ``synth_over_train`` and ``synth_floor_over_train`` compare both with
  ``train_samples_per_s`` from the same run.
- ``train_samples_per_s``: StandaloneTrainer's own ``train_epoch`` (its DataLoader,
  tqdm, gradient clipping and one-cycle schedule), set up as ``fit()`` sets it up, on
  samples already cached, so it measures the loop and not the simulator. No validation.
- ``bare_step_samples_per_s``: forward + loss + backward + AdamW step on pre-made
  tensors, same model, batch, size and threads. ``loop_efficiency`` = train / bare.
- ``step_gflops``: one forward + backward of one batch, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products only;
  norms and activations are not counted), and the rate it gives at the bare step's
  speed, next to a large fp32 matmul's rate and a large 3x3 convolution's rate on the
  same device and threads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import standalone_training as st  # noqa: E402

CHUNKS = 5  # timed chunks per rate; the median of five shrugs off two bad ones
SYNTH_PER_CHUNK = 8  # samples simulated per timed chunk
MATMUL_SIDE = 2048  # large enough to reach the BLAS's sustained rate
MATMUL_REPEATS = 5  # also the repeats of the convolution reference


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timer measures work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_rates(runners: dict[str, Callable[[int], float]], *, chunks: int, device: torch.device) -> dict[str, dict]:
    """Median and spread of each runner's items per second over `chunks` chunks.

    `runner(k)` does chunk k's work and returns how many items it processed. Chunk k of
    every runner runs before chunk k + 1 of any, so a change in the machine's load hits
    all of them alike and their ratio stays meaningful.
    """
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for k in range(chunks):
        for name, run_chunk in runners.items():
            synchronize(device)
            began = time.perf_counter()
            items = run_chunk(k)
            synchronize(device)
            rates[name].append(items / (time.perf_counter() - began))
    return {name: dict(median=statistics.median(r), min=min(r), max=max(r), chunks=chunks) for name, r in rates.items()}


def median_rate(run_chunk: Callable[[int], float], *, chunks: int, device: torch.device) -> dict:
    """`median_rates` of one runner."""
    return median_rates({"only": run_chunk}, chunks=chunks, device=device)["only"]


# ----------------------------------------------------------------------------
# What is measured
# ----------------------------------------------------------------------------


def synthesis_rate(*, image_size: int, seed: int = 0) -> dict:
    """Samples per second simulated and normalised by one process, no cache."""
    ds = st.SyntheticAstronomicalDataset(CHUNKS * SYNTH_PER_CHUNK + 1, image_size=image_size, seed=seed, cache=False)
    ds[CHUNKS * SYNTH_PER_CHUNK]  # first call pays for imports and scipy's first FFT plans

    def chunk(k: int) -> int:
        for i in range(k * SYNTH_PER_CHUNK, (k + 1) * SYNTH_PER_CHUNK):
            ds[i]
        return SYNTH_PER_CHUNK

    return median_rate(chunk, chunks=CHUNKS, device=torch.device("cpu"))


def noise_floor_rate(*, image_size: int, seed: int = 0) -> dict:
    """Samples per second of the work no renderer can skip, on the simulator's own scenes.

    Per sample: the Poisson and read-noise draws of both epochs (`st.observe`) and the
    normalisation into network input. A simulator that rendered its scenes for free would
    still run no faster than this. Distinct scenes per call, as in `synthesis_rate`: the
    same arrays over and over would train the CPU's branch predictors on the medians.
    """
    sky = st.SkyConfig()
    ds = st.SyntheticAstronomicalDataset(CHUNKS * SYNTH_PER_CHUNK, image_size=image_size, seed=seed + 1, cache=False)
    scenes = [ds.simulate(i) for i in range(len(ds))]  # noisy pairs: close enough to the expected counts
    rng = np.random.default_rng(seed)

    def chunk(k: int) -> int:
        for scene in scenes[k * SYNTH_PER_CHUNK : (k + 1) * SYNTH_PER_CHUNK]:
            reference, science = st.observe(rng, scene.reference, scene.science, sky)
            st.normalize_pair(reference.astype(np.float32), science.astype(np.float32))
        return SYNTH_PER_CHUNK

    return median_rate(chunk, chunks=CHUNKS, device=torch.device("cpu"))


def loop_config(*, image_size: int, batch_size: int, device: str, steps_per_epoch: int, epochs: int) -> st.TrainConfig:
    """A config whose training split holds exactly `steps_per_epoch` full batches."""
    train = steps_per_epoch * batch_size
    cfg = st.TrainConfig(image_size=image_size, batch_size=batch_size, device=device, epochs=epochs, test_samples=1, mlflow=False, energy=False)
    samples = train + 1
    while samples - max(1, round(samples * cfg.val_fraction)) < train:
        samples += 1
    return dataclasses.replace(cfg, samples=samples)


def prepared_trainer(cfg: st.TrainConfig) -> st.StandaloneTrainer:
    """A StandaloneTrainer after its `setup()`: what `fit()` trains, without files or tracking.

    No MLflow, energy meter, output files or DDP: one process. Every training sample is
    rendered once here, so the timed epochs read the dataset's cache.
    """
    trainer = st.StandaloneTrainer(cfg)
    trainer.setup()
    for i in range(len(trainer.train_ds)):
        trainer.train_ds[i]
    return trainer


def train_loop_runner(trainer: st.StandaloneTrainer, *, warmup_epochs: int) -> Callable[[int], int]:
    """After `warmup_epochs` untimed epochs: chunk k is `train_epoch` of one more epoch."""
    for epoch in range(warmup_epochs):
        trainer.train_epoch(epoch, 0, 0.0)

    def chunk(k: int) -> int:
        return trainer.train_epoch(warmup_epochs + k, 0, 0.0)[2]

    return chunk


def example_batch(trainer: st.StandaloneTrainer) -> tuple[torch.Tensor, torch.Tensor]:
    """The first training batch, stacked once and moved to the device."""
    items = [trainer.train_ds[i] for i in range(trainer.cfg.batch_size)]
    inputs = torch.stack([x for x, _ in items]).to(trainer.device)
    return inputs, torch.stack([m for _, m in items]).to(trainer.device)


def bare_step(model: torch.nn.Module, criterion: torch.nn.Module, optimizer: torch.optim.Optimizer, inputs: torch.Tensor, masks: torch.Tensor) -> None:
    """forward => loss => backward => AdamW step: the work no loop can avoid."""
    loss = criterion(model(inputs), masks)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def memory_format(model: torch.nn.Module) -> torch.memory_format:
    """channels_last if the model's convolution weights are laid out that way, else contiguous."""
    weight = next(m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1)
    nhwc = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def bare_step_runner(cfg: st.TrainConfig, inputs: torch.Tensor, masks: torch.Tensor, *, steps_per_chunk: int, warmup: int,
                     layout: torch.memory_format = torch.contiguous_format) -> Callable[[int], int]:
    """After `warmup` untimed steps on a fresh model in `layout`: chunk k is `steps_per_chunk` bare steps."""
    torch.manual_seed(cfg.seed)
    model = st.StandaloneUNet(width=cfg.width).to(inputs.device, memory_format=layout).train()
    criterion = st.CombinedLoss(bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(warmup):
        bare_step(model, criterion, optimizer, inputs, masks)

    def chunk(_k: int) -> int:
        for _ in range(steps_per_chunk):
            bare_step(model, criterion, optimizer, inputs, masks)
        return steps_per_chunk * len(inputs)

    return chunk


def step_flops(cfg: st.TrainConfig, inputs: torch.Tensor, masks: torch.Tensor) -> int:
    """FLOPs of one forward + backward of one batch (FlopCounterMode: convs and matmuls)."""
    model = st.StandaloneUNet(width=cfg.width).to(inputs.device)
    criterion = st.CombinedLoss(bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight)
    with FlopCounterMode(display=False) as counter:
        criterion(model(inputs), masks).backward()
    return counter.get_total_flops()


def matmul_gflop_per_s(device: torch.device) -> dict:
    """Sustained fp32 GFLOP/s of one MATMUL_SIDE^3 matrix product: the device's ceiling here."""
    a = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device)
    b = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device=device)
    a @ b  # warm-up: BLAS thread pool and workspace
    flop = 2 * MATMUL_SIDE**3

    def chunk(_k: int) -> float:
        a @ b
        return flop / 1e9

    return median_rate(chunk, chunks=MATMUL_REPEATS, device=device)


def conv_gflop_per_s(device: torch.device) -> dict:
    """Sustained fp32 GFLOP/s of one large 3x3 convolution, the U-Net's own kind of work.

    A second ceiling beside the matmul: on AMD CPUs MKL's sgemm takes its AVX2 path while
    oneDNN's convolutions use AVX-512, so the matmul alone can understate the machine.
    """
    x = torch.randn(8, 128, 64, 64, device=device)
    w = torch.randn(128, 128, 3, 3, device=device)
    torch.nn.functional.conv2d(x, w, padding=1)  # warm-up: oneDNN primitive creation
    flop = 2 * 9 * 128 * 128 * 64 * 64 * 8

    def chunk(_k: int) -> float:
        torch.nn.functional.conv2d(x, w, padding=1)
        return flop / 1e9

    return median_rate(chunk, chunks=MATMUL_REPEATS, device=device)


def machine() -> dict:
    """Where and when a benchmark ran: threads, cores, versions, CPU model, UTC date."""
    return {
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def emit(report: dict, output: str | None, *, indent: int = 2) -> None:
    """Print a benchmark's JSON report, and write it to `output` too when one is given."""
    text = json.dumps(report, indent=indent)
    print(text)
    if output:
        Path(output).write_text(text + "\n")


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo, or platform's guess elsewhere."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


# ----------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------


def benchmark(*, image_size: int, batch_size: int, device: str, steps: int, warmup: int) -> dict:
    """Every number in the report, measured in this process."""
    steps_per_chunk = max(1, math.ceil(steps / CHUNKS))
    warmup_epochs = max(1, math.ceil(warmup / steps_per_chunk))
    cfg = loop_config(image_size=image_size, batch_size=batch_size, device=device, steps_per_epoch=steps_per_chunk, epochs=warmup_epochs + CHUNKS)

    # 1. The simulator alone.
    synth = synthesis_rate(image_size=image_size)
    floor = noise_floor_rate(image_size=image_size)

    # 2. The real loop on cached samples and the bare step on its first batch, chunk by chunk.
    trainer = prepared_trainer(cfg)
    inputs, masks = example_batch(trainer)
    runners = {
        "train": train_loop_runner(trainer, warmup_epochs=warmup_epochs),
        "bare": bare_step_runner(cfg, inputs, masks, steps_per_chunk=steps_per_chunk, warmup=warmup, layout=memory_format(trainer.model)),
    }
    rates = median_rates(runners, chunks=CHUNKS, device=trainer.device)
    train, bare = rates["train"], rates["bare"]

    # 3. What one step costs, and what the device can do.
    flops = step_flops(cfg, inputs, masks)
    matmul = matmul_gflop_per_s(trainer.device)
    conv = conv_gflop_per_s(trainer.device)

    step_gflops = flops / 1e9
    achieved = step_gflops * bare["median"] / batch_size
    return {
        "statistic": f"median over {CHUNKS} timed chunks of {steps_per_chunk} steps, train and bare chunks alternating ({SYNTH_PER_CHUNK} samples for synth, {MATMUL_REPEATS} calls for matmul and conv); spread gives min and max",
        "synth_samples_per_s": synth["median"],
        "synth_floor_samples_per_s": floor["median"],
        "train_samples_per_s": train["median"],
        "bare_step_samples_per_s": bare["median"],
        "loop_efficiency": train["median"] / bare["median"],
        "synth_over_train": synth["median"] / train["median"],
        "synth_floor_over_train": floor["median"] / train["median"],
        "step_gflops": step_gflops,
        "step_gflops_per_sample": step_gflops / batch_size,
        "achieved_gflop_per_s": achieved,
        "machine_gflop_per_s": matmul["median"],
        "fraction_of_matmul_peak": achieved / matmul["median"],
        "conv_reference_gflop_per_s": conv["median"],
        "fraction_of_conv_reference": achieved / conv["median"],
        "peak_rss_mb": peak_rss_mb(),
        "spread": {"synth_samples_per_s": synth, "synth_floor_samples_per_s": floor, "train_samples_per_s": train, "bare_step_samples_per_s": bare, "machine_gflop_per_s": matmul, "conv_reference_gflop_per_s": conv},
        "flop_counter": "torch.utils.flop_counter.FlopCounterMode, one forward + loss + backward of one batch (convolutions and matmuls only)",
        "machine_peak": f"fp32 {MATMUL_SIDE}x{MATMUL_SIDE} @ {MATMUL_SIDE}x{MATMUL_SIDE} matmul, same device and threads",
        "conv_reference": "fp32 3x3 convolution, 8x128x64x64 input, 128 filters, same device and threads",
        "loop": {"steps_per_epoch": steps_per_chunk, "warmup_epochs": warmup_epochs, "train_samples": len(trainer.train_ds), "dataloader_workers": 0, "cached": True},
        "parameters": st.count_parameters(trainer.model),
        "memory_format": str(memory_format(trainer.model)).removeprefix("torch."),
        "image_size": image_size,
        "batch_size": batch_size,
        "steps": steps_per_chunk * CHUNKS,
        "warmup_steps": warmup,
        "device": str(trainer.device),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        **machine(),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64, help="px, a multiple of 16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto")
    parser.add_argument("--steps", type=int, default=30, help=f"timed steps per rate, split into {CHUNKS} chunks")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each rate")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default, one per core)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    st.check_image_size(args.image_size)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        msg = "need batch-size >= 1, steps >= 1 and warmup >= 0"
        raise SystemExit(msg)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = benchmark(image_size=args.image_size, batch_size=args.batch_size, device=args.device, steps=args.steps, warmup=args.warmup)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
