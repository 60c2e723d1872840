"""How long the README's commands take, each as a whole process: prints one JSON object.

    python benchmarks/bench_commands.py [--repeats 3] [--commands quick demo help] [--output FILE]

Each command runs as a new Python process in a fresh temporary directory (so that nothing
from an earlier repeat is reused: no MLflow store, no run directory, no cache), `--repeats`
times, the commands taking turns repeat by repeat so that a change in the machine's load
touches them all alike. For each run it records the wall time, the exit status and the
1-minute load average just before it starts (``os.getloadavg``: above the core count, the
machine was busy with something else and the times are inflated). The summary gives the
median and the range of the wall times per command.

The commands are the ones a new user types:

- ``quick``: ``python run_standalone_training.py --mode quick`` (README's main command);
- ``demo``: ``python demo_standalone_training.py``;
- ``help``: ``python standalone_training.py --help`` (the import of torch, scipy, astropy
  and matplotlib is most of it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "quick": [sys.executable, str(ROOT / "run_standalone_training.py"), "--mode", "quick"],
    "demo": [sys.executable, str(ROOT / "demo_standalone_training.py")],
    "help": [sys.executable, str(ROOT / "standalone_training.py"), "--help"],
}


def run_once(command: list[str]) -> dict:
    """One run of `command` in a fresh directory: wall seconds, exit status, load before it."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="astrid-bench-") as workdir:
        env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=3600)
        seconds = time.perf_counter() - start
    return dict(seconds=round(seconds, 2), returncode=proc.returncode, load_before=round(load, 2),
                error=proc.stderr.strip().splitlines()[-1] if proc.returncode and proc.stderr.strip() else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each command (default 3)")
    parser.add_argument("--commands", nargs="+", choices=sorted(COMMANDS), default=["quick", "demo", "help"])
    parser.add_argument("--output", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    runs: dict[str, list[dict]] = {name: [] for name in args.commands}
    for _ in range(args.repeats):
        for name in args.commands:
            runs[name].append(run_once(COMMANDS[name]))
            print(f"{name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    summary = {}
    for name, results in runs.items():
        times = [r["seconds"] for r in results if r["returncode"] == 0]
        summary[name] = dict(command=" ".join(Path(c).name if k < 2 else c for k, c in enumerate(COMMANDS[name])),
                             median_s=statistics.median(times) if times else None, min_s=min(times, default=None),
                             max_s=max(times, default=None), failures=sum(r["returncode"] != 0 for r in results), runs=results)
    report = dict(machine=dict(cores=os.cpu_count(), python=platform.python_version(), platform=platform.platform()),
                  date=time.strftime("%Y-%m-%d"), repeats=args.repeats, commands=summary)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0 if all(s["failures"] == 0 for s in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
