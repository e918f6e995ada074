#!/usr/bin/env bash
# The whole pipeline on the real datasets, on this machine (all its local
# devices): 2-D pretraining on ImageNet (or a given 2-D checkpoint),
# inflation, segmentation, pseudo-labels, segmia and multitask, 5-fold
# fine-tuning with fold-ensemble prediction per target, the report.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "$0")/common.sh"

usage() {
  cat <<EOF
Usage: bash launch/$PROG --cov19ctdb DIR --lesions DIR --stoic DIR
         (--imagenet DIR | --init2d CHECKPOINT) [options] [-- --config.FIELD=VALUE ...]

Runs the stages one after another with the full-size configs; workdirs
ROOT/<stage>, report ROOT/report.md. A stage whose workdir holds a DONE file
(written when the stage finished) is skipped, so a rerun resumes; delete the
workdir to rerun a stage.

$PIPELINE_OPTIONS_HELP
  --root DIR         workdir root, local or gs:// (default ./covid3d_runs)
$RUN_OPTIONS_HELP
Python: \$PYTHON if set, else 'python' on PATH.
EOF
}

parse_pipeline_args "$@"
check_pipeline_options
check_local_inputs

CHAIN_ROOT=${OPT_ROOT:-./covid3d_runs}
CHAIN_CONFIGS=$(local_configs)
CHAIN_INIT2D=$OPT_INIT2D
chain_flags_from_options "$OPT_COV19CTDB" "$OPT_LESIONS" "$OPT_STOIC" "$OPT_IMAGENET" "$OPT_CACHE"
echo "== covid3d pipeline under $CHAIN_ROOT (python: $PYTHON)"
run_chain
print_total_time
