#!/usr/bin/env bash
# The whole pipeline on the synthetic phantom with the ':demo' configs (nano
# model, small volumes, few steps): 2-D pretraining on phantom slices (the
# stand-in for ImageNet), inflation, segmentation, pseudo-labels, segmia and
# multitask, 5-fold fine-tuning with fold-ensemble prediction, the report.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "$0")/common.sh"

usage() {
  cat <<EOF
Usage: bash launch/$PROG [--dry-run] [--targets LIST] [--processes N [--local DIR]] [ROOT]
                        [--config.FIELD=VALUE ...]

Runs every stage on the phantom (generated on first use under ROOT/data);
workdirs ROOT/<stage>, report ROOT/report.md. A stage whose workdir holds a
DONE file is skipped (delete the workdir to rerun it).

  ROOT               workdir root (default ./covid3d_demo); may be gs://BUCKET/PATH
                     (with --local; a GCS emulator: set STORAGE_EMULATOR_HOST)
  --targets LIST     comma-separated fine-tuning targets (default severity;
                     severity,detection runs both; --tasks is its deprecated old name)
  --processes N      a pod rehearsed on this machine: every stage as N JAX processes
                     on 127.0.0.1 (jax.distributed), 2 CPU devices each, each with its
                     own cache (LOCAL/cache/process<i>), as the hosts of a pod
  --local DIR        the phantom and the caches (default ROOT, which must then be local)
  --config.F=V       override passed to every stage, e.g. --config.train.num_steps=20
  --dry-run          print the commands, run nothing (or DRY_RUN=1)
Python: \$PYTHON if set, else 'python' on PATH.
EOF
}

root=
local_dir=
demo_targets=severity
processes=1
split_option_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --targets) need_value "$@"; demo_targets=$2; shift 2 ;;
    --tasks) need_value "$@"; deprecated_option --tasks --targets; demo_targets=$2; shift 2 ;;
    --processes) need_value "$@"; processes=$2; shift 2 ;;
    --local) need_value "$@"; local_dir=$2; shift 2 ;;
    --config.*) OPT_EXTRA+=("$1"); shift ;;
    -*) usage_error "unknown option $1" ;;
    *)
      [[ -z $root ]] || usage_error "one ROOT only (got '$root' and '$1')"
      root=$1
      shift
      ;;
  esac
done
check_targets "$demo_targets"
check_overrides "${OPT_EXTRA[@]}"
[[ $processes =~ ^[1-9][0-9]*$ ]] || usage_error "--processes: '$processes' is not a positive integer"

CHAIN_ROOT=${root:-./covid3d_demo}
local_dir=${local_dir:-$CHAIN_ROOT}
[[ $local_dir != *://* ]] || usage_error "ROOT $CHAIN_ROOT is a bucket: give --local DIR for the phantom and the caches"
CHAIN_CONFIGS=$(local_configs)
CHAIN_SUFFIX=:demo
CHAIN_TARGETS=$demo_targets
CHAIN_FLAGS=(--config.data.phantom_dir="$local_dir/data" --config.cache_dir="$local_dir/cache")
if ((processes > 1)); then
  LOCAL_PROCESSES=$processes
  LOCAL_CACHE=$local_dir/cache
  run_python() { run_python_local_processes "$@"; }
fi
pod=
((processes == 1)) || pod=", $processes processes"
echo "== covid3d demo under $CHAIN_ROOT (python: $PYTHON$pod)"
run_chain
# Where to look next: the report, and the ensemble predicting one scan (a phantom's here).
scans=("$local_dir"/data/stoic/data/mha/*.mha)
scan=${scans[0]}
[[ -e $scan ]] || scan=SCAN
echo "== results: $CHAIN_ROOT/report.md, plotted in $CHAIN_ROOT/report.png"
echo "== predict a scan with the ${demo_targets%%,*} ensemble (docs/inference.md):"
echo "   $(quote_words "$PYTHON" -m covid3d.infer --model="$CHAIN_ROOT/${demo_targets%%,*}_segmia" \
  --out="$local_dir/infer" --lesions="$CHAIN_ROOT/segmentation" --saliency "$scan")"
print_total_time
