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
Usage: bash launch/$PROG [--dry-run] [--targets LIST] [ROOT] [--config.FIELD=VALUE ...]

Runs every stage on the phantom (generated on first use under ROOT/data);
workdirs ROOT/<stage>, report ROOT/report.md. A stage whose workdir holds a
DONE file is skipped (delete the workdir to rerun it).

  ROOT               workdir root (default ./covid3d_demo)
  --targets LIST     comma-separated fine-tuning targets (default severity;
                     severity,detection runs both; --tasks is its deprecated old name)
  --config.F=V       override passed to every stage, e.g. --config.train.num_steps=20
  --dry-run          print the commands, run nothing (or DRY_RUN=1)
Python: \$PYTHON if set, else 'python' on PATH.
EOF
}

root=
demo_targets=severity
split_option_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --targets) need_value "$@"; demo_targets=$2; shift 2 ;;
    --tasks) need_value "$@"; deprecated_option --tasks --targets; demo_targets=$2; shift 2 ;;
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

CHAIN_ROOT=${root:-./covid3d_demo}
CHAIN_CONFIGS=$(local_configs)
CHAIN_SUFFIX=:demo
CHAIN_TARGETS=$demo_targets
CHAIN_FLAGS=(--config.data.phantom_dir="$CHAIN_ROOT/data" --config.cache_dir="$CHAIN_ROOT/cache")
echo "== covid3d demo under $CHAIN_ROOT (python: $PYTHON)"
run_chain
print_total_time
