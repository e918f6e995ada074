#!/usr/bin/env bash
# Every preset in one command: the authors' submissions and the paper's rows
# (covid3d/stages/chain.py), each after the pretrainings it starts from, of the
# inflation it names (the 2G detection rows start from ROOT/<stage>_2g), then
# the report with the paper's figures beside ours.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "$0")/common.sh"

usage() {
  cat <<EOF_USAGE
Usage: bash launch/$PROG [--dry-run] [--root DIR] [--targets LIST] [--config.FIELD=VALUE ...]
         (the phantom at demo sizes)
       bash launch/$PROG --cov19ctdb DIR --lesions DIR --stoic DIR
         (--imagenet DIR | --init2d CHECKPOINT) [options] [-- --config.FIELD=VALUE ...]

Runs the pretrainings the presets start from (skipping finished stages; those
of another inflation than full in ROOT/<stage>_<inflation>), then one run per
preset of each target in ROOT/<target>_<preset>, predicting with the fold
ensemble, then ROOT/report.md with the paper's CV macro F1 beside each row.
The presets and their rows: docs/method.md; the plan: --dry-run.

  --root DIR         workdir root (default ./covid3d_ablations)
Real data (the options of pipeline.sh; --inflation is the presets'):
$PIPELINE_OPTIONS_HELP
$RUN_OPTIONS_HELP
Python: \$PYTHON if set, else 'python' on PATH.
EOF_USAGE
}

BARE_OVERRIDES=1 parse_pipeline_args "$@"
[[ $OPT_INFLATION == full ]] ||
  usage_error "--inflation: each preset names its own inflation (docs/method.md)"

CHAIN_ROOT=${OPT_ROOT:-./covid3d_ablations}
CHAIN_CONFIGS=$(local_configs)
if [[ -n $OPT_COV19CTDB$OPT_LESIONS$OPT_STOIC$OPT_IMAGENET$OPT_INIT2D ]]; then
  check_pipeline_options
  check_local_inputs
  CHAIN_INIT2D=$OPT_INIT2D
  chain_flags_from_options "$OPT_COV19CTDB" "$OPT_LESIONS" "$OPT_STOIC" "$OPT_IMAGENET" "$OPT_CACHE"
else
  check_overrides "${OPT_EXTRA[@]}"
  check_targets "$OPT_TARGETS"
  CHAIN_TARGETS=$OPT_TARGETS
  CHAIN_SUFFIX=:demo
  CHAIN_FLAGS=(--config.data.phantom_dir="$CHAIN_ROOT/data" --config.cache_dir="$CHAIN_ROOT/cache")
fi
CHAIN_PLAN=(--ablations)
echo "== covid3d ablations under $CHAIN_ROOT (python: $PYTHON)"
run_chain
print_total_time
