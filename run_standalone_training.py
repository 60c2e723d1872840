"""Train AstrID in one command: `python run_standalone_training.py --mode quick`.

Modes are presets (standalone_training.PRESETS); any flag overrides them, so
`--mode full --epochs 5` works. All training logic lives in standalone_training.py.
The defaults shown below are a run's without a preset: --mode sets --samples,
--epochs and --batch-size first.

example:
  python run_standalone_training.py --mode quick
  python run_standalone_training.py --mode custom --samples 3000 --epochs 30 --batch-size 16 --patience 8
"""

import argparse
import sys

import standalone_training as st


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=st.HelpFormatter)
    parser.add_argument(
        "--mode",
        choices=["quick", "full", "custom"],
        default="quick",
        help="quick: 20 samples, 3 epochs, batch 4; full: 100, 20, 8; custom: your flags",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    st.add_training_flags(parser)
    args = parser.parse_args(argv)
    if args.mode == "custom":
        missing = [flag for flag in ("samples", "epochs", "batch_size") if getattr(args, flag) is None]
        if missing:
            print(
                "run_standalone_training.py: error: --mode custom needs "
                + ", ".join("--" + m.replace("_", "-") for m in missing),
                file=sys.stderr,
            )
            return 2
    st.configure_logging(debug=args.debug)
    preset = st.PRESETS.get(args.mode, {})
    return st.cli(
        lambda: st.run_training(st.config_from_args(args, preset), given=st.given_flags(args)), debug=args.debug
    )


if __name__ == "__main__":
    sys.exit(main())
