#!/usr/bin/env bash
# pipeline.sh on one host with all its GPUs (those in CUDA_VISIBLE_DEVICES
# when set): the 3-D stages' global batch is GPUs x per-GPU batch, the model
# variant and compute dtype are set for GPU memory; JAX shards each batch
# over the GPUs itself.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "$0")/common.sh"

usage() {
  cat <<EOF
Usage: bash launch/$PROG [GPU options] PIPELINE OPTIONS [-- --config.FIELD=VALUE ...]

Needs JAX with CUDA: pip install -e '.[cuda]'.

GPU options:
  --gpus N            GPUs to use (default: the count in CUDA_VISIBLE_DEVICES,
                      else nvidia-smi's)
  --per-gpu-batch B   examples per GPU and step (default 1; the paper's global
                      batch is 4)
  --variant NAME      ConvNeXt variant of every stage (default tiny)
  --bf16              bfloat16 forward/backward (--config.train.compute_dtype)

Pipeline options (see pipeline.sh --help):
$PIPELINE_OPTIONS_HELP
  --root DIR         workdir root, local or gs:// (default ./covid3d_runs)
$RUN_OPTIONS_HELP
EOF
}

gpus=
per_gpu=1
variant=tiny
dtype=
forward=()
user_overrides=()
split_option_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --gpus) need_value "$@"; gpus=$2; shift 2 ;;
    --per-gpu-batch) need_value "$@"; per_gpu=$2; shift 2 ;;
    --variant) need_value "$@"; variant=$2; shift 2 ;;
    --bf16) dtype=bfloat16; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; user_overrides=("$@"); break ;;
    *)
      parse_pipeline_option "$@"
      ((OPT_SHIFT)) || usage_error "unknown option '$1'"
      # the deprecated --tasks goes on as --targets: warned about once, here
      [[ $1 != --tasks ]] || set -- --targets "${@:2}"
      forward+=("${@:1:OPT_SHIFT}")
      shift "$OPT_SHIFT"
      ;;
  esac
done
OPT_EXTRA=("${user_overrides[@]}")
check_pipeline_options
check_local_inputs

if [[ -z $gpus ]]; then
  if [[ -v CUDA_VISIBLE_DEVICES ]]; then
    IFS=, read -ra visible <<<"$CUDA_VISIBLE_DEVICES"
    gpus=${#visible[@]}
  elif command -v nvidia-smi >/dev/null; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  else
    usage_error "cannot count the GPUs (no CUDA_VISIBLE_DEVICES, no nvidia-smi): pass --gpus N"
  fi
fi
if [[ ! $gpus =~ ^[1-9][0-9]*$ ]]; then
  devices=
  [[ ! -v CUDA_VISIBLE_DEVICES ]] || devices=" (CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES')"
  usage_error "no GPU to use: --gpus is '$gpus'$devices"
fi
[[ $per_gpu =~ ^[1-9][0-9]*$ ]] || usage_error "--per-gpu-batch: '$per_gpu' is not a positive integer"

echo "== $gpus GPU(s), global batch $((gpus * per_gpu)) of the 3-D stages, variant $variant"
run "$PYTHON" -c "import jax, sys; n = jax.local_device_count() if jax.default_backend() == \"gpu\" else 0; print(f\"JAX sees {n} GPU(s)\"); sys.exit(n != $gpus)" ||
  fail "JAX does not see $gpus GPU(s): install its CUDA build (pip install -e '.[cuda]') or pass --gpus"

overrides=(--config.model.variant="$variant")
[[ -z $dtype ]] || overrides+=(--config.train.compute_dtype="$dtype")
export DRY_RUN PYTHON
# pipeline options given here come after --batch-size and so win over it
exec bash "$LAUNCH_DIR/pipeline.sh" --batch-size "$((gpus * per_gpu))" "${forward[@]}" \
  -- "${overrides[@]}" "${user_overrides[@]}"
