#!/usr/bin/env bash
# The GPU check of the Pallas depthwise convolution and the accelerator benchmarks,
# to run once on a machine with a GPU (about 5-7 minutes on an H100/H200; the
# steps' time limits add up to 8 minutes):
#
#   bash covid3d/bench/gpu_check.sh gpu_results.md
#
# 1. Pallas against lax at ConvNeXt-Tiny's first stage at 224^3, (1, 56, 56, 56, 96),
#    7^3 kernel: forward, input and kernel gradients, float32 and bfloat16, with
#    xla and fft timed at the same shape;
# 2. python -m covid3d.bench model --variant tiny --size 224 --impl all --torch
#    (every backend, forward+backward and an AdamW step, and PyTorch beside it);
# 3. python -m covid3d.bench train: the whole train step at 224^3 (augmentation,
#    forward, backward, AdamW, EMA) with peak device memory, with the fft
#    backend (auto would first time every backend at each stage's shape).
#
# Everything lands in one markdown table in the file given as argument, under a
# line with the device and the jax/jaxlib/torch versions. Each step has a time
# limit; a step that fails or runs out of time is a row of the table and the
# others still run (the model step appends each backend's row as it is measured,
# PyTorch first and shift last, so a time limit loses the slowest row only).
# The exit status is 1 if any step failed or was stopped (e.g. Pallas off
# against lax), 2 without a GPU.
set -euo pipefail

out_arg="${1:?usage: bash covid3d/bench/gpu_check.sh OUT.md}"
mkdir -p "$(dirname "$out_arg")"
out="$(cd "$(dirname "$out_arg")" && pwd)/$(basename "$out_arg")"
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

python - "$out" <<'EOF'
import platform
import sys

import jax
import jaxlib

try:
  import torch
  tv = f"torch {torch.__version__} (CUDA {torch.version.cuda}, available: {torch.cuda.is_available()})"
except ImportError:
  tv = "torch not installed"
dev = jax.devices()[0]
line = (f"device: {dev.platform} {dev.device_kind} x{len(jax.devices())}; jax {jax.__version__}, "
        f"jaxlib {jaxlib.__version__}; {tv}; python {platform.python_version()}")
print(line)
with open(sys.argv[1], "w") as f:
  f.write(f"GPU check ({line})\n\n")
if dev.platform != "gpu":
  print("gpu_check.sh: the default JAX backend is not a GPU; nothing to check here")
  sys.exit(2)
EOF

status=0
# run_step NAME SECONDS COMMAND...: a failure or a timeout is a row, not the end.
run_step() {
  local name="$1" limit="$2"
  shift 2
  echo "== $name (limit ${limit} s)"
  local start=$SECONDS rc=0
  timeout "$limit" "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    local why="exit $rc"
    [ "$rc" -eq 124 ] && why="stopped after ${limit} s"
    echo "| $name | FAILED | $why |" >> "$out"
    status=1
  fi
  echo "   $name: $((SECONDS - start)) s"
}

run_step "pallas vs lax, float32" 75 python -m covid3d.bench model --dwconv-check 1,56,56,56,96 --kernel-size 7 --dtype float32 --impl xla,fft,pallas --reps 5 --markdown "$out"
run_step "pallas vs lax, bfloat16" 75 python -m covid3d.bench model --dwconv-check 1,56,56,56,96 --kernel-size 7 --dtype bfloat16 --impl xla,fft,pallas --reps 5 --markdown "$out"
run_step "model tiny 224^3, every backend, PyTorch" 210 python -m covid3d.bench model --variant tiny --size 224 --impl all --torch --reps 3 --markdown "$out"
run_step "train step tiny 224^3, fft" 120 python -m covid3d.bench train --variant tiny --size 224 --batch-per-device 1 --impl fft --augment-only --steps 3 --markdown "$out"

echo
cat "$out"
exit "$status"
