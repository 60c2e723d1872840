"""How fast AstrID trains on one device: prints one JSON object, measured in one run.

    python benchmarks/bench_training.py [--image-size 64] [--batch-size 8] [--device cpu]
                                        [--steps 30] [--warmup 5]

Every rate is the median over several timed chunks (never a mean: a shared machine
gives the odd slow chunk), and the JSON says so. What is measured, in data-flow order:

- ``synth_samples_per_s``: SyntheticAstronomicalDataset(cache=False), one process.
- ``train_samples_per_s``: StandaloneTrainer's own ``_train_epoch`` (its DataLoader,
  tqdm, gradient clipping and one-cycle schedule), set up as ``fit()`` sets it up, on
  samples already cached, so it measures the loop and not the simulator. No validation.
- ``bare_step_samples_per_s``: forward + loss + backward + AdamW step on pre-made
  tensors, same model, batch, size and threads. ``loop_efficiency`` = train / bare.
- ``step_gflops``: one forward + backward of one batch, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products only;
  norms and activations are not counted), and the rate it gives at the bare step's
  speed, next to a large fp32 matmul's rate on the same device and threads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import standalone_training as st  # noqa: E402

CHUNKS = 5  # timed chunks per rate; the median of five shrugs off two bad ones
SYNTH_PER_CHUNK = 8  # samples simulated per timed chunk
MATMUL_SIDE = 2048  # large enough to reach the BLAS's sustained rate
MATMUL_REPEATS = 5


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a timer measures work and not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_rate(run_chunk: Callable[[int], float], *, chunks: int, device: torch.device) -> dict:
    """Median and spread of `run_chunk(k)`'s items per second over `chunks` chunks.

    `run_chunk(k)` does chunk k's work and returns how many items it processed.
    """
    rates = []
    for k in range(chunks):
        synchronize(device)
        began = time.perf_counter()
        items = run_chunk(k)
        synchronize(device)
        rates.append(items / (time.perf_counter() - began))
    return dict(median=statistics.median(rates), min=min(rates), max=max(rates), chunks=chunks)


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


def loop_config(*, image_size: int, batch_size: int, device: str, steps_per_epoch: int, epochs: int) -> st.TrainConfig:
    """A config whose training split holds exactly `steps_per_epoch` full batches."""
    train = steps_per_epoch * batch_size
    cfg = st.TrainConfig(image_size=image_size, batch_size=batch_size, device=device, epochs=epochs, test_samples=1, mlflow=False, energy=False)
    samples = train + 1
    while samples - max(1, round(samples * cfg.val_fraction)) < train:
        samples += 1
    return dataclasses.replace(cfg, samples=samples)


def prepared_trainer(cfg: st.TrainConfig) -> st.StandaloneTrainer:
    """A StandaloneTrainer with what `_train_epoch` uses, built as `fit()` steps 1-3 build it.

    No MLflow, energy meter, output files or DDP: one process. Every training sample is
    rendered once here, so the timed epochs read the dataset's cache.
    """
    trainer = st.StandaloneTrainer(cfg)
    st.set_seed(cfg.seed)
    trainer.train_ds, trainer.val_ds, trainer.test_ds, trainer.data_info = st.build_datasets(cfg)
    model = st.StandaloneUNet(width=cfg.width).to(trainer.device)
    if trainer.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    trainer.model = model
    trainer.criterion = st.CombinedLoss(bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight)
    trainer.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(len(trainer.train_ds) / cfg.batch_size)
    trainer.scheduler = torch.optim.lr_scheduler.OneCycleLR(trainer.optimizer, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    trainer.autocast, trainer.scaler = st.autocast_context(trainer.device)
    trainer.stopper = st.EarlyStopping(patience=cfg.patience, min_delta=cfg.min_delta, mode=cfg.monitor_mode)
    for i in range(len(trainer.train_ds)):
        trainer.train_ds[i]
    return trainer


def train_loop_rate(trainer: st.StandaloneTrainer, *, warmup_epochs: int) -> dict:
    """Samples per second of `_train_epoch`, one timed chunk per epoch."""
    for epoch in range(warmup_epochs):
        trainer._train_epoch(epoch, 0, 0.0)

    def chunk(k: int) -> int:
        return trainer._train_epoch(warmup_epochs + k, 0, 0.0)[2]

    return median_rate(chunk, chunks=trainer.cfg.epochs - warmup_epochs, device=trainer.device)


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


def bare_step_rate(cfg: st.TrainConfig, inputs: torch.Tensor, masks: torch.Tensor, *, steps_per_chunk: int, warmup: int,
                   prepare: Callable[[torch.nn.Module], torch.nn.Module] = lambda m: m) -> dict:
    """Samples per second of `bare_step` on a fresh model; `prepare` may transform the model."""
    torch.manual_seed(cfg.seed)
    model = prepare(st.StandaloneUNet(width=cfg.width).to(inputs.device).train())
    criterion = st.CombinedLoss(bce_weight=cfg.bce_weight, dice_weight=cfg.dice_weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for _ in range(warmup):
        bare_step(model, criterion, optimizer, inputs, masks)

    def chunk(k: int) -> int:
        for _ in range(steps_per_chunk):
            bare_step(model, criterion, optimizer, inputs, masks)
        return steps_per_chunk * len(inputs)

    return median_rate(chunk, chunks=CHUNKS, device=inputs.device)


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

    # 2. The real loop on cached samples.
    trainer = prepared_trainer(cfg)
    train = train_loop_rate(trainer, warmup_epochs=warmup_epochs)

    # 3. The bare step on the same batch, and its FLOPs.
    inputs, masks = example_batch(trainer)
    bare = bare_step_rate(cfg, inputs, masks, steps_per_chunk=steps_per_chunk, warmup=warmup)
    flops = step_flops(cfg, inputs, masks)
    matmul = matmul_gflop_per_s(trainer.device)

    step_gflops = flops / 1e9
    achieved = step_gflops * bare["median"] / batch_size
    return {
        "statistic": f"median over {CHUNKS} timed chunks of {steps_per_chunk} steps ({SYNTH_PER_CHUNK} samples for synth, {MATMUL_REPEATS} products for matmul); spread gives min and max",
        "synth_samples_per_s": synth["median"],
        "train_samples_per_s": train["median"],
        "bare_step_samples_per_s": bare["median"],
        "loop_efficiency": train["median"] / bare["median"],
        "step_gflops": step_gflops,
        "step_gflops_per_sample": step_gflops / batch_size,
        "achieved_gflop_per_s": achieved,
        "machine_gflop_per_s": matmul["median"],
        "fraction_of_matmul_peak": achieved / matmul["median"],
        "peak_rss_mb": peak_rss_mb(),
        "spread": {"synth_samples_per_s": synth, "train_samples_per_s": train, "bare_step_samples_per_s": bare, "machine_gflop_per_s": matmul},
        "flop_counter": "torch.utils.flop_counter.FlopCounterMode, one forward + loss + backward of one batch (convolutions and matmuls only)",
        "machine_peak": f"fp32 {MATMUL_SIDE}x{MATMUL_SIDE} @ {MATMUL_SIDE}x{MATMUL_SIDE} matmul, same device and threads",
        "loop": {"steps_per_epoch": steps_per_chunk, "warmup_epochs": warmup_epochs, "train_samples": len(trainer.train_ds), "dataloader_workers": 0, "cached": True},
        "parameters": st.count_parameters(trainer.model),
        "image_size": image_size,
        "batch_size": batch_size,
        "steps": steps_per_chunk * CHUNKS,
        "warmup_steps": warmup,
        "device": str(trainer.device),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=64, help="px, a multiple of 16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | mps | auto")
    parser.add_argument("--steps", type=int, default=30, help=f"timed steps per rate, split into {CHUNKS} chunks")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before each rate")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    st.check_image_size(args.image_size)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        msg = "need batch-size >= 1, steps >= 1 and warmup >= 0"
        raise SystemExit(msg)
    report = benchmark(image_size=args.image_size, batch_size=args.batch_size, device=args.device, steps=args.steps, warmup=args.warmup)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
