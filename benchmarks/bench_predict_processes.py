"""`predict` at one size, each run in a process of its own: seconds and peak memory, this checkout against another.

    mkdir /tmp/astrid-old && git archive 4f49575 | tar -x -C /tmp/astrid-old
    python benchmarks/bench_predict_processes.py --size 4096 --repeats 2 \\
        --old /tmp/astrid-old/standalone_training.py --output docs/benchmarks/bench_predict_processes.json

`bench_predict.py` times both versions in one process, which is right for speed ratios but
mixes their memory: its peak RSS is the larger of the two. Here every run is a fresh
process (``python -c`` importing the module by path and calling `run_prediction` on the
same FITS pair, `bench_predict.star_field_pair`), so its peak RSS (``ru_maxrss``) is that
version's own. The versions alternate, repeat by repeat, so that both see the same load;
the JSON keeps every run and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from bench_predict import write_pair  # noqa: E402
from bench_training import machine  # noqa: E402

ONE_RUN = """
import importlib.util, json, resource, sys, time
spec = importlib.util.spec_from_file_location("standalone_training", sys.argv[1])
st = importlib.util.module_from_spec(spec)
sys.modules["standalone_training"] = st
spec.loader.exec_module(st)
began = time.perf_counter()
st.run_prediction(science=sys.argv[3], reference=sys.argv[2], reference_survey=None, output_dir=sys.argv[4], checkpoint=None,
                  threshold=None, device="cpu", max_pixels=st.DEFAULT_MAX_PIXELS)
print(json.dumps({"seconds": time.perf_counter() - began, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def one_run(module: Path, reference: Path, science: Path, out: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", ONE_RUN, str(module), str(reference), str(science), str(out)],
                            capture_output=True, text=True, timeout=1800, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{module}: {result.stderr[-1500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="px side of the pair")
    parser.add_argument("--repeats", type=int, default=2, help="runs per version, alternating")
    parser.add_argument("--old", default="", help="another version's standalone_training.py")
    parser.add_argument("--output", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    versions = {"this checkout": HERE.parent / "standalone_training.py"} | ({"old": Path(args.old).resolve()} if args.old else {})
    runs: dict[str, list[dict]] = {name: [] for name in versions}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        reference, science = write_pair(Path(tmp), "pair", args.size, seed=0)
        for k in range(args.repeats):
            for name, module in versions.items():
                runs[name].append(one_run(module, reference, science, Path(tmp) / f"out-{name.replace(' ', '_')}-{k}"))
    report = {
        "size": args.size, "repeats": args.repeats, "modules": {name: str(path) for name, path in versions.items()},
        "runs": runs, "load_average_before": load_before, "load_average_after": os.getloadavg(),
        "median": {name: {key: statistics.median(r[key] for r in rows) for key in ("seconds", "peak_rss_mb")} for name, rows in runs.items()},
        **machine(),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
