"""The null battery through an older checkout's `predict` path: the "before" of the null tests.

    git worktree add /tmp/astrid-old 757000a
    python benchmarks/null_tests_before.py /tmp/astrid-old/standalone_training.py

The null pairs are this checkout's (`null_frames`, `null_pairs`, same seeds), so both
versions see exactly the same pixels; each pair then goes the way the older `predict` took it:
its `probability_map` with its shipped weights and its operating threshold, and the
components of that map, without a flux-ratio fit or a significance gate. Prints one JSON
object: per frame, detections on the identical pair and false detections per megapixel
(worst and mean over the noise pairs, worst over the flux-ratio pairs and over the
seeing-mismatch pairs).

``diagnosis`` holds what was measured to find the cause, on M13:

- ``ablation``: the older model's detections on three M13 pairs (identical, fresh noise at the
  frame's own level, science at 3x the flux) with all channels, with the difference channel
  zeroed, and with the two epoch channels zeroed: which input the detections come from;
- ``noise``: the frame's robust noise (1.4826 MAD, what the older normalisation divided by)
  against its pixel noise (from differences of neighbouring pixels) and the noise of an
  empty corner;
- ``inputs``: percentiles of each network channel on training samples and on M13 with fresh
  noise, under the older normalisation and under this checkout's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import standalone_training as st  # noqa: E402  (this checkout's module, after the path is set)


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location("astrid_old", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["astrid_old"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old_module", type=Path, help="standalone_training.py of the older checkout")
    args = parser.parse_args()
    old = load_module(args.old_module)
    payload = old.load_checkpoint(old.DEFAULT_WEIGHTS)  # the weights that shipped with it
    model = old.model_from_checkpoint(payload)
    model.eval()
    threshold = payload["threshold"]
    report = {}
    for k, frame in enumerate(st.null_frames()):
        rng = np.random.default_rng([st.DEFAULT_NULL_SEED, k])  # as st.null_battery seeds frame k
        cases = []
        for case, reference, science in st.null_pairs(frame.data, rng):
            prob = old.probability_map(model, reference, science, device=torch.device("cpu"))
            n = len(old.find_components(prob, threshold=threshold))
            cases.append({**case, "detections": n, "per_megapixel": n / (reference.size / 1e6)})
        noise = [c["per_megapixel"] for c in cases if c["kind"] == "noise"]
        flux = [c["per_megapixel"] for c in cases if c["kind"] == "flux"]
        seeing = [c["per_megapixel"] for c in cases if c["kind"] == "seeing"]
        report[frame.name] = dict(identical_detections=cases[0]["detections"], noise_per_megapixel_max=max(noise),
                                  noise_per_megapixel_mean=float(np.mean(noise)), flux_per_megapixel_max=max(flux),
                                  seeing_per_megapixel_max=max(seeing), cases=cases)
    print(json.dumps(dict(module=str(args.old_module), threshold=threshold, frames=report, diagnosis=diagnose(old, model, threshold)), indent=1))


def diagnose(old, model, threshold: float) -> dict:
    """Which channel the older model's false detections come from, and why (see the docstring)."""
    frame = st.read_fits_image(st.M13_FITS)[0]
    rng = np.random.default_rng(0)
    sigma = st.robust_sigma(frame)
    noisy = (frame + rng.normal(0, sigma, frame.shape), frame + rng.normal(0, sigma, frame.shape))
    pairs = {"identical": (frame, frame), "fresh noise": noisy, "science x3": (frame, 3 * frame)}
    side = 16 * (frame.shape[0] // 16)  # one window, a multiple of 16

    def detections(reference, science, zero):
        inputs = old.normalize_pair(reference, science)[:, :side, :side]
        inputs[list(zero)] = 0.0
        with torch.no_grad():
            prob = torch.sigmoid(model(torch.from_numpy(inputs[None]))).numpy()[0, 0]
        return len(old.find_components(prob, threshold=threshold))

    ablation = {name: {"all channels": detections(*pair, ()), "difference zeroed": detections(*pair, (2,)), "epochs zeroed": detections(*pair, (0, 1))}
                for name, pair in pairs.items()}
    noise = {"robust_sigma_of_frame": sigma, "pixel_noise": st.robust_sigma(np.diff(frame, axis=1)) / np.sqrt(2),
             "robust_sigma_of_empty_corner": st.robust_sigma(frame[:60, :60])}
    training = st.SyntheticAstronomicalDataset(50, image_size=64, sky=st.TRAINING_SKY)
    inputs = {
        "training, this checkout": np.stack([training[i][0].numpy() for i in range(50)]),
        "training, older": np.stack([old.normalize_pair(*(lambda s: (s.reference, s.science))(training.simulate(i))) for i in range(50)]),
        "M13 with fresh noise, this checkout": st.normalize_pair(*noisy)[None],
        "M13 with fresh noise, older": old.normalize_pair(*noisy)[None],
    }
    percentiles = {name: {channel: np.percentile(x[:, c], [1, 50, 99]).round(2).tolist() for c, channel in enumerate(("reference", "science", "difference"))}
                   for name, x in inputs.items()}
    return dict(ablation=ablation, noise=noise, inputs=percentiles)


if __name__ == "__main__":
    main()
