"""Synthetic-sky generation throughput, one process: `python benchmarks/bench_generation.py`.

Prints one JSON object: samples/s at 64, 128 and 256 px (median of 5 timed chunks of fresh,
uncached samples), the machine and the date.
"""

import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import standalone_training as st  # noqa: E402

CHUNKS = 5
SAMPLES_PER_CHUNK = {64: 60, 128: 30, 256: 10}


def rate(size: int) -> float:
    """Median samples/s over CHUNKS chunks of never-seen samples."""
    n = SAMPLES_PER_CHUNK[size]
    ds = st.SyntheticAstronomicalDataset(CHUNKS * n + 1, image_size=size, seed=11, cache=False)
    ds[CHUNKS * n]  # the first call pays for imports and FFT plans
    rates = []
    for k in range(CHUNKS):
        start = time.perf_counter()
        for i in range(k * n, (k + 1) * n):
            ds[i]
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> int:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    result = {
        "synth_samples_per_s": {size: round(rate(size), 1) for size in SAMPLES_PER_CHUNK},
        "statistic": f"median of {CHUNKS} chunks, one process, cache=False",
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
