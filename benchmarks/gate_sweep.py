"""What the significance gate costs and buys: one run's weights at several gates.

    python benchmarks/gate_sweep.py runs/finetune-v3 3.5 4 4.5 5

For each gate: the operating threshold chosen on the run's own validation set (as the
trainer chooses it), then the documented evaluation (200 fresh 128x128 images of the test
stream, seed DEFAULT_EVAL_SEED) and the null battery (`null_frames()`), both through
`detect_changes` at that gate. Prints one JSON line per gate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import standalone_training as st  # noqa: E402  (this checkout's module, after the path is set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory (its best.pt and configuration)")
    parser.add_argument("gates", type=float, nargs="+")
    args = parser.parse_args()
    payload = st.load_checkpoint(args.run / "best.pt")
    model = st.model_from_checkpoint(payload)
    model.eval()
    cpu = torch.device("cpu")
    cfg = st.TrainConfig(**{k: v for k, v in payload["config"].items() if k in {f.name for f in dataclasses.fields(st.TrainConfig)}})
    _, val, _, _ = st.build_datasets(cfg)
    val_probs = st.predict_probabilities(model, torch.stack([val[i][0] for i in range(len(val))]), device=cpu)
    val_truths = [val.truth(i) for i in range(len(val))]
    val_significances = [st.raw_subtraction(val.raw(i)) for i in range(len(val))]
    test = st.SyntheticAstronomicalDataset(200, image_size=128, seed=st.DEFAULT_EVAL_SEED, stream="test")
    probs = st.predict_probabilities(model, torch.stack([test[i][0] for i in range(len(test))]), device=cpu)
    truths = [test.truth(i) for i in range(len(test))]
    significances = [st.raw_subtraction(test.raw(i)) for i in range(len(test))]
    frames = st.null_frames()
    for gate in args.gates:
        st.SIGNIFICANCE_GATE = gate  # what detect_changes, choose_threshold and the null battery read
        threshold, _ = st.choose_threshold(list(val_probs), val_truths, significances=val_significances)
        results = [st.match_objects(st.detect_changes(p, s, threshold=threshold), t) for p, s, t in zip(probs, significances, truths)]
        summary = st.summarise_objects(results, truths)
        null = st.null_battery(model, frames, threshold=threshold, device=cpu)["summary"]
        print(json.dumps(dict(
            gate=gate, threshold=threshold, completeness=summary["completeness"]["overall"]["value"], snr50=summary["snr50"]["overall"],
            snr50_by_type=summary["snr50"]["by_type"], point_snr_ge_10=summary["completeness_snr_ge_10"]["point"]["value"],
            trail_snr_ge_10=summary["completeness_snr_ge_10"]["trail"]["value"], false_per_image=summary["false_detections_per_image"]["value"],
            bogus_pass_rate=summary["bogus_pass_rate"]["overall"]["value"], null=null,
        )), flush=True)


if __name__ == "__main__":
    main()
