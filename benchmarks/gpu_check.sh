#!/usr/bin/env bash
# AstrID on one NVIDIA GPU: three checks of code paths the CPU test suite cannot reach.
#   1. one training epoch on CUDA through the runner, under the trainer's own autocast (bf16);
#   2. training under torchrun with a real nccl process group and DistributedDataParallel;
#   3. `predict` on a 4096x4096 pair on CUDA and on the CPU: the same detections, close maps.
# Each check prints one PASS/FAIL line. Exit 0: all passed; 1: any failed; 2: no CUDA device
# (a skip, deliberately not 0, so that a machine without a GPU is never read as a pass).
# Meant to take under 5 minutes on an H100/H200 with 16 cores. In the project's environment:
#   bash benchmarks/gpu_check.sh
# Logs and small outputs go to $OUT (a new temp dir if unset); bulky files (FITS, mask.fits,
# checkpoints) to a scratch dir, removed at exit unless GPU_CHECK_KEEP=1. Other knobs:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZE=1024   dry run without a GPU (CPU on both sides of check 3)
#   GPU_CHECK_MAX_DIFF (0.05), GPU_CHECK_POS_TOL (0.5 px)   check 3's tolerances
#   GPU_CHECK_TIMEOUT (300 s)   per command: a hung nccl rendezvous must end as a FAIL
# shellcheck disable=SC2317  # the check_* functions are called through check()
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE="${GPU_CHECK_DEVICE:-cuda}" SIZE="${GPU_CHECK_SIZE:-4096}" LIMIT="${GPU_CHECK_TIMEOUT:-300}"
export MAX_DIFF="${GPU_CHECK_MAX_DIFF:-0.05}" POS_TOL="${GPU_CHECK_POS_TOL:-0.5}"
RESULTS="${OUT:-$(mktemp -d)}" SCRATCH="$(mktemp -d)"
[ "${GPU_CHECK_KEEP:-0}" = 1 ] || trap 'rm -rf "$SCRATCH"' EXIT
exec > >(tee -a "$RESULTS/gpu_check.log") 2>&1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" MLFLOW_ENABLE_TELEMETRY=false DO_NOT_TRACK=1
cd "$SCRATCH"  # the CLI's defaults (mlflow.db, runs/) must never land in the repository
# Two commands reading a module that someone edits in between compare two versions (seen once).
MODULE_SUM="$(cksum <"$REPO/standalone_training.py")"
echo "gpu_check: device=$DEVICE size=$SIZE results=$RESULTS scratch=$SCRATCH"

python - "$DEVICE" <<'EOF' || { echo "gpu_check: no CUDA device visible to torch: nothing was checked (exit 2)"; exit 2; }
import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, nccl available {torch.distributed.is_nccl_available()}")
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit(1)
    print(f"GPU {torch.cuda.get_device_name(0)} (capability {torch.cuda.get_device_capability(0)}), bf16 supported {torch.cuda.is_bf16_supported()}")
EOF

FAILED=0
check() {  # check NAME FUNCTION: a subshell with errexit, which bash would ignore inside an `if`
  local t0=$SECONDS rc
  set +e; ( set -e; "$2" ); rc=$?; set -e
  if [ "$rc" = 0 ]; then echo "PASS  $1  ($((SECONDS - t0)) s)"; else echo "FAIL  $1  ($((SECONDS - t0)) s, logs in $RESULTS)"; FAILED=1; fi
}
logged() {  # logged LOGFILE COMMAND...: tqdm bars would drown the summary, so only a failure's tail shows
  local log="$RESULTS/$1"; shift
  echo "+ $*" >"$log"
  timeout "$LIMIT" "$@" >>"$log" 2>&1 || { echo "command failed (or ran past ${LIMIT} s), last lines of $log:"; tail -n 25 "$log"; return 1; }
}
assert_run() {  # the run finished its one epoch with finite losses; its small files come back
  mkdir -p "$RESULTS/${1##*/}"; cp "$1"/{metrics,history,config}.json "$RESULTS/${1##*/}/" 2>/dev/null || true
  python - "$1" <<'EOF'
import json, math, sys
m, h = (json.load(open(f"{sys.argv[1]}/{n}.json")) for n in ("metrics", "history"))
losses = [h[0]["train_loss"], h[0]["val_loss"], m["val"]["loss"]]
print(f"epochs_run {m['epochs_run']}, world_size {m['world_size']}, losses {losses}, stopped: {m['stopped_reason']}")
assert m["epochs_run"] == 1 and len(h) == 1 and all(math.isfinite(v) for v in losses)
EOF
}
TRAIN_FLAGS=(--samples 64 --epochs 1 --batch-size 16 --test-samples 16 --device "$DEVICE" --no-energy)

check_train() {
  # The trainer's autocast comes from autocast_context: on CUDA it must be bf16 with the grad
  # scaler off (fp16 with a scaler is only the fallback for cards without bf16).
  python - "$DEVICE" <<'EOF'
import sys, torch, standalone_training as st
dev = st.resolve_device(sys.argv[1])
ctx, scaler = st.autocast_context(dev)
with ctx:
    y = st.place_model(st.StandaloneUNet(width=16), dev)(torch.randn(2, 3, 64, 64, device=dev))
want = torch.bfloat16 if dev.type == "cuda" else torch.float32
print(f"autocast on {dev}: forward dtype {y.dtype}, grad scaler enabled {scaler.is_enabled()}")
assert y.dtype == want and not scaler.is_enabled(), f"expected {want} without a grad scaler"
EOF
  # MLflow into SQLite in the scratch dir: the real tracking path (log_model of a CUDA model
  # included) with no server and no network.
  logged train.log python "$REPO/run_standalone_training.py" --mode custom "${TRAIN_FLAGS[@]}" \
    --output-dir "$SCRATCH/train" --tracking-uri "sqlite:///$SCRATCH/mlflow.db"
  grep -q "device ${DEVICE}.* x 1 process" "$RESULTS/train.log"
  grep -q "MLflow run: [0-9a-f]\{32\}" "$RESULTS/train.log"  # tracked, not silently dropped
  assert_run "$SCRATCH/train"
}

check_ddp() {
  # With one process WORLD_SIZE is 1 and the trainer (rightly) forms no process group, so a
  # plain `torchrun --nproc_per_node=1` never touches nccl; two ranks cannot share one GPU
  # under nccl either. This wrapper makes the trainer treat world size 1 as distributed: its
  # own _init_distributed (nccl on CUDA), DDP, all_reduce and all_gather_object then run.
  cat >"$SCRATCH/ddp_train.py" <<'EOF'
import os, sys, torch, torch.distributed as td, standalone_training as st
st.DistInfo.enabled = property(lambda self: "RANK" in os.environ)  # torchrun sets RANK
init, ddp_init = td.init_process_group, torch.nn.parallel.DistributedDataParallel.__init__
def traced_init(*a, **k):
    init(*a, **k)
    print(f"gpu_check: process group backend={td.get_backend()} world_size={td.get_world_size()}", flush=True)
def traced_ddp(self, *a, **k):
    ddp_init(self, *a, **k)
    print("gpu_check: model wrapped in DistributedDataParallel", flush=True)
td.init_process_group, torch.nn.parallel.DistributedDataParallel.__init__ = traced_init, traced_ddp
sys.exit(st.main(sys.argv[1:]))
EOF
  local backend=gloo; [ "$DEVICE" = cuda ] && backend=nccl
  logged ddp.log torchrun --standalone --nproc_per_node=1 "$SCRATCH/ddp_train.py" train "${TRAIN_FLAGS[@]}" \
    --output-dir "$SCRATCH/ddp" --no-mlflow
  grep -h "^gpu_check:" "$RESULTS/ddp.log"
  grep -q "backend=$backend world_size=1" "$RESULTS/ddp.log" && grep -q "wrapped in DistributedDataParallel" "$RESULTS/ddp.log"
  assert_run "$SCRATCH/ddp"
}

check_predict() {
  # A static star field (Gaussian PSF, FWHM 2.5 px; both epochs with their own noise and sky
  # level) and 8 bright new point sources in the science epoch only.
  python - "$SIZE" <<'EOF'
import json, sys, numpy as np
from astropy.io import fits
size, rng, s = int(sys.argv[1]), np.random.default_rng(4096), 2.5 / 2.355
yy, xx = np.mgrid[-7:8, -7:8]
def paint(img, xs, ys, fluxes):
    for x, y, f in zip(xs, ys, fluxes):
        ix, iy = int(round(x)), int(round(y))
        img[iy - 7:iy + 8, ix - 7:ix + 8] += f * np.exp(-((xx - x + ix) ** 2 + (yy - y + iy) ** 2) / (2 * s * s)) / (2 * np.pi * s * s)
n, stars = size * size // 1500, np.zeros((size, size))
paint(stars, rng.uniform(8, size - 8, n), rng.uniform(8, size - 8, n), 10 ** rng.uniform(2, 4.5, n))
new, xs, ys = np.zeros_like(stars), (np.arange(8) % 4 + 0.5) * size / 4 + 0.3, (np.arange(8) // 4 + 0.5) * size / 2 + 0.6
paint(new, xs, ys, np.full(8, 3000.0))
fits.PrimaryHDU((stars + 100 + rng.normal(0, 5, stars.shape)).astype(np.float32)).writeto("ref.fits")
fits.PrimaryHDU((stars + new + 120 + rng.normal(0, 6, stars.shape)).astype(np.float32)).writeto("sci.fits")
json.dump(dict(x=list(xs), y=list(ys)), open("injected.json", "w"))
EOF
  local run name dev t0
  for run in "dev:$DEVICE" "cpu:cpu"; do  # dev: the device under test; cpu: the fp32 reference
    name=${run%%:*} dev=${run#*:} t0=$(date +%s.%N)  # wall time of the whole command: imports, model load
    logged "predict_$name.log" python "$REPO/standalone_training.py" predict --science sci.fits --reference ref.fits \
      --output-dir "pred_$name" --device "$dev"
    echo "predict ${SIZE}x${SIZE} on $dev: $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s wall"
    mkdir -p "$RESULTS/pred_$name" && cp "pred_$name"/detections.{csv,json} "$RESULTS/pred_$name/"
  done
  # bf16 on the GPU against fp32 on the CPU: the maps cannot agree bit for bit, but no
  # detection may move, appear or vanish.
  python - "$DEVICE" <<'EOF'
import csv, json, os, sys, numpy as np
from astropy.io import fits
from scipy.optimize import linear_sum_assignment
tol, sides = float(os.environ["POS_TOL"]), ("dev", "cpu")
rows = {s: list(csv.DictReader(open(f"pred_{s}/detections.csv"))) for s in sides}
xy = {s: np.array([[float(r["x"]), float(r["y"])] for r in rows[s]]).reshape(-1, 2) for s in sides}
inj = json.load(open("injected.json"))
found = {s: sum(len(xy[s]) > 0 and np.hypot(*(xy[s] - (x, y)).T).min() < 2 for x, y in zip(inj["x"], inj["y"])) for s in sides}
print(f"detections: {len(xy['dev'])} on {sys.argv[1]}, {len(xy['cpu'])} on cpu; injected sources found: {found['dev']}/8 and {found['cpu']}/8")
moved = np.inf
if len(xy["dev"]) == len(xy["cpu"]) > 0:  # the one-to-one pairing of least total distance, then its worst pair
    dist = np.hypot(*(xy["dev"][:, None] - xy["cpu"][None]).transpose(2, 0, 1))
    moved = dist[linear_sum_assignment(dist)].max()
    print(f"largest position difference {moved:.3f} px (tolerance {tol})")
for s, o in (sides, sides[::-1]):  # what a failure needs: the detections without a partner (10 at most)
    alone = [r for r, p in zip(rows[s], xy[s]) if len(xy[o]) == 0 or np.hypot(*(xy[o] - p).T).min() > tol]
    for r in alone[:10]:
        print(f"  only on {s}: x {r['x']} y {r['y']} score {r['score']} significance {r['significance']}")
diff = np.abs(fits.getdata("pred_dev/mask.fits").astype(np.float64) - fits.getdata("pred_cpu/mask.fits"))
print(f"probability maps: max |diff| {diff.max():.4g} (tolerance {os.environ['MAX_DIFF']}), fraction of pixels over 0.01: {(diff > 0.01).mean():.3e}")
assert len(xy["dev"]) == len(xy["cpu"]) > 0, "detection counts differ (or there are none to compare)"
assert moved <= tol, "a detection moved"
assert diff.max() <= float(os.environ["MAX_DIFF"]), "probability maps differ beyond the tolerance"
EOF
}

check "1 train one epoch on $DEVICE (runner, autocast, MLflow sqlite)" check_train
check "2 torchrun 1 process, DDP on $DEVICE" check_ddp
check "3 predict ${SIZE}x${SIZE}: $DEVICE vs cpu" check_predict
if [ "$(cksum <"$REPO/standalone_training.py")" != "$MODULE_SUM" ]; then
  echo "FAIL  standalone_training.py changed during the run: the checks mixed two versions; rerun"; FAILED=1
fi
echo "gpu_check: $([ "$FAILED" = 0 ] && echo 'all checks passed' || echo 'some checks FAILED'); logs in $RESULTS"
exit "$FAILED"
