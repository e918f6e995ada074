#!/usr/bin/env bash
# The paper's severity ablation rows in one command: the pretraining chain
# (as demo.sh, or as pipeline.sh on the real data), then one 5-fold severity
# run per row, each a preset of configs/severity.py predicting with the fold
# ensemble, then the report with the paper's figures beside ours.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "$0")/common.sh"

# Random init; ImageNet full, 1G, 2G; segmentation, segmia, multitask; plain
# CE; segmentation with quarter turns (docs/method.md, "Presets").
ABLATION_ROWS=(table3_random authors1 table2_1g table2_2g authors2 authors3 authors4 table1_ce
  authors5)
# The rows that start from the 2-D weights (with --init2d: that checkpoint).
FROM_2D=" authors1 table2_1g table2_2g table1_ce "

usage() {
  cat <<EOF
Usage: bash launch/$PROG [--dry-run] [--root DIR] [--config.FIELD=VALUE ...]
         (the phantom at demo sizes)
       bash launch/$PROG --cov19ctdb DIR --lesions DIR --stoic DIR
         (--imagenet DIR | --init2d CHECKPOINT) [options] [-- --config.FIELD=VALUE ...]

Runs the stage chain (skipping finished stages), then one severity run per row
of the paper's ablations in ROOT/ablation_<preset>: ${ABLATION_ROWS[*]}.
Report: ROOT/report.md, with the paper's CV macro F1 beside each row. At demo
sizes on 2 CPU cores the chain takes about 11 min and each row about 2 min.

  --root DIR         workdir root (default ./covid3d_ablations)
Real data (the options of pipeline.sh):
$PIPELINE_OPTIONS_HELP
$RUN_OPTIONS_HELP
Python: \$PYTHON if set, else 'python' on PATH.
EOF
}

BARE_OVERRIDES=1 parse_pipeline_args "$@"

CHAIN_ROOT=${OPT_ROOT:-./covid3d_ablations}
CHAIN_CONFIGS=$(local_configs)
CHAIN_TARGETS=severity
if [[ -n $OPT_COV19CTDB$OPT_LESIONS$OPT_STOIC$OPT_IMAGENET$OPT_INIT2D ]]; then
  check_pipeline_options
  check_local_inputs
  CHAIN_INIT2D=$OPT_INIT2D
  chain_flags_from_options "$OPT_COV19CTDB" "$OPT_LESIONS" "$OPT_STOIC" "$OPT_IMAGENET" "$OPT_CACHE"
  CHAIN_TARGETS=severity
  suffix=
else
  check_overrides "${OPT_EXTRA[@]}"
  CHAIN_SUFFIX=:demo
  CHAIN_FLAGS=(--config.data.phantom_dir="$CHAIN_ROOT/data" --config.cache_dir="$CHAIN_ROOT/cache")
  suffix=,demo
fi
echo "== covid3d ablations under $CHAIN_ROOT (python: $PYTHON)"
run_chain
for row in "${ABLATION_ROWS[@]}"; do
  workdir=$CHAIN_ROOT/ablation_$row
  if stage_done "$workdir"; then
    echo "== $row: skipped, $workdir/DONE exists"
    continue
  fi
  echo "== $row -> $workdir"
  row_start=$SECONDS
  init=()
  [[ -z $CHAIN_INIT2D || $FROM_2D != *" $row "* ]] || init=(--config.init_from="$CHAIN_INIT2D")
  run_python all -m covid3d.main --config="$CHAIN_CONFIGS/severity.py:$row$suffix" \
    --workdir="$workdir" "${init[@]}" "${CHAIN_FLAGS_3D[@]}" "${CHAIN_FLAGS[@]}" \
    --config.predict.folds= "${OPT_EXTRA[@]}"
  is_dry_run || echo "   $row took $(duration $((SECONDS - row_start)))"
done
echo "== report -> $CHAIN_ROOT/report.md"
run_python 0 -m covid3d.report "$CHAIN_ROOT"
print_total_time
