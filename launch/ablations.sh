#!/usr/bin/env bash
# The paper's severity ablation rows in one command: the pretraining chain
# (as demo.sh, or as pipeline.sh on the real data), then one 5-fold severity
# run per row, each a preset of configs/severity.py predicting with the fold
# ensemble, then the report with the paper's figures beside ours.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "$0")/common.sh"

# The paper's severity rows: each preset of configs/severity.py that carries a
# figure of the paper (covid3d/stages/chain.py), and the stage it starts from.
ABLATION_ROWS=()
declare -A ROW_INIT=()
read_ablation_rows() {
  local rows name init
  rows=$("$PYTHON" "$CHAIN_PY" --paper-rows=severity) ||
    fail "$PYTHON $CHAIN_PY could not list the ablation rows"
  while IFS=$'\t' read -r name init; do
    ABLATION_ROWS+=("$name")
    ROW_INIT[$name]=$init
  done <<<"$rows"
}

usage() {
  read_ablation_rows
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
read_ablation_rows
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
  # A row that starts from the 2-D weights takes the --init2d checkpoint.
  [[ -z $CHAIN_INIT2D || ${ROW_INIT[$row]} != pretrain2d ]] ||
    init=(--config.init_from="$CHAIN_INIT2D")
  run_python all -m covid3d.main --config="$CHAIN_CONFIGS/severity.py:$row$suffix" \
    --workdir="$workdir" "${init[@]}" "${CHAIN_FLAGS_3D[@]}" "${CHAIN_FLAGS[@]}" \
    --config.predict.folds= "${OPT_EXTRA[@]}"
  is_dry_run || echo "   $row took $(duration $((SECONDS - row_start)))"
done
echo "== report -> $CHAIN_ROOT/report.md"
run_python 0 -m covid3d.report "$CHAIN_ROOT"
print_total_time
