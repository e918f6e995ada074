# Shell functions shared by the launch scripts; sourced, never run.
#
# Every command goes through `run`, which prints it as one shell-quoted line
# prefixed with "+ " and runs it unless dry-run mode is on (DRY_RUN=1 in the
# environment or --dry-run on a script's command line). The stage chain
# (run_chain) is written once here; where a stage's python runs is the hook
# `run_python`: here by default, on the TPU workers in tpu_pod.sh.
# shellcheck shell=bash
# shellcheck disable=SC2034  # OPT_* and CHAIN_* are read by the scripts

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$LAUNCH_DIR")
PROG=$(basename "$0")
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}

# ------------------------------------------------------------------ messages

usage_error() {
  echo "$PROG: $*" >&2
  echo "Run 'bash launch/$PROG --help' for the options." >&2
  exit 2
}

fail() {
  echo "$PROG: $*" >&2
  exit 1
}

# Seconds -> H:MM:SS.
duration() {
  printf '%d:%02d:%02d' $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60))
}

# ------------------------------------------------------------------ running

is_dry_run() {
  [[ -n $DRY_RUN && $DRY_RUN != 0 ]]
}

# Prints the words as one line a shell parses back into the same words:
# plain words bare, others in single quotes (of --flag=VALUE, the VALUE).
quote_words() {
  local word out=() plain='^[A-Za-z0-9_@%+=:,./-]+$'
  for word in "$@"; do
    if [[ $word =~ $plain ]]; then
      out+=("$word")
    elif [[ $word =~ ^(--[A-Za-z0-9_.-]+=)(.+)$ ]]; then
      out+=("${BASH_REMATCH[1]}'${BASH_REMATCH[2]//\'/\'\\\'\'}'")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  local IFS=' '
  printf '%s\n' "${out[*]}"
}

# run CMD ARGS...: prints "+ CMD ARGS..." and runs it, unless dry-run.
run() {
  printf '+ %s\n' "$(quote_words "$@")"
  is_dry_run || "$@"
}

# run_python WORKERS ARGS...: runs python with ARGS where the stages run.
# WORKERS is 'all' (every host of a multi-host run) or '0' (one host); here
# there is one host. tpu_pod.sh redefines this function.
run_python() {
  shift
  run "$PYTHON" "$@"
}

# True if the stage in workdir $1 has finished (its DONE marker exists). A
# gs:// marker is looked up with gcloud, except in dry-run mode.
stage_done() {
  case $1 in
    gs://*) ! is_dry_run && gcloud storage ls "$1/DONE" >/dev/null 2>&1 ;;
    *) [[ -f $1/DONE ]] ;;
  esac
}

# --------------------------------------------------------------- options

# Splits --option=value into two words (keeps --config.* overrides whole);
# the result is in the array ARGS.
split_option_values() {
  ARGS=()
  local arg
  while (($#)); do
    arg=$1
    shift
    if [[ $arg == -- ]]; then
      ARGS+=(-- "$@")
      return
    fi
    if [[ $arg == --*=* && $arg != --config.* ]]; then
      ARGS+=("${arg%%=*}" "${arg#*=}")
    else
      ARGS+=("$arg")
    fi
  done
}

need_value() {
  [[ $# -ge 2 && -n $2 && $2 != --* ]] || usage_error "$1 needs a value"
}

# The options of the real-data pipeline (pipeline.sh, tpu_pod.sh; gpu.sh
# forwards them to pipeline.sh).
OPT_COV19CTDB=
OPT_LESIONS=
OPT_STOIC=
OPT_IMAGENET=
OPT_INIT2D=
OPT_CACHE=
OPT_ROOT=
OPT_INFLATION=full
OPT_TASKS=severity,detection
OPT_BATCH_SIZE=
OPT_EXTRA=()

PIPELINE_OPTIONS_HELP="Data (all three required):
  --cov19ctdb DIR    COV19-CT-DB root (train/, validation/, test/, category CSVs)
  --lesions DIR      COVID-19-20 lesion set root (*_ct.nii.gz, *_seg.nii.gz)
  --stoic DIR        STOIC root (data/mha/, metadata/reference.csv)
2-D weights (one of the two):
  --imagenet DIR     TFDS manual dir of imagenet2012: run the pretrain2d stage
  --init2d FILE      2-D ConvNeXt checkpoint (.pth, .safetensors, .npz) to
                     inflate instead of pretraining
Chain:
  --inflation MODE   full, 1g or 2g (default full)
  --tasks LIST       comma-separated fine-tuning tasks (default severity,detection)
  --batch-size N     global batch of the 3-D stages (default: the configs')
  --cache DIR        preprocessed-record cache (--config.data.cache_dir)"
RUN_OPTIONS_HELP="  --dry-run          print the commands, run nothing (or DRY_RUN=1)
  -- OVERRIDES...    --config.FIELD=VALUE flags passed to every stage, last"

# parse_pipeline_option ARGS...: reads the pipeline option at $1 (and its
# value); sets OPT_SHIFT to the number of words used, 0 if $1 is none.
parse_pipeline_option() {
  OPT_SHIFT=2
  case $1 in
    --cov19ctdb) need_value "$@"; OPT_COV19CTDB=$2 ;;
    --lesions) need_value "$@"; OPT_LESIONS=$2 ;;
    --stoic) need_value "$@"; OPT_STOIC=$2 ;;
    --imagenet) need_value "$@"; OPT_IMAGENET=$2 ;;
    --init2d) need_value "$@"; OPT_INIT2D=$2 ;;
    --cache) need_value "$@"; OPT_CACHE=$2 ;;
    --root) need_value "$@"; OPT_ROOT=$2 ;;
    --inflation) need_value "$@"; OPT_INFLATION=$2 ;;
    --tasks) need_value "$@"; OPT_TASKS=$2 ;;
    --batch-size) need_value "$@"; OPT_BATCH_SIZE=$2 ;;
    --dry-run) DRY_RUN=1; OPT_SHIFT=1 ;;
    --) shift; OPT_EXTRA=("$@"); OPT_SHIFT=$(($# + 1)) ;;
    *) OPT_SHIFT=0 ;;
  esac
}

check_tasks() {
  local task tasks
  IFS=, read -ra tasks <<<"$1"
  ((${#tasks[@]})) || usage_error "--tasks is empty"
  for task in "${tasks[@]}"; do
    [[ $task == severity || $task == detection ]] ||
      usage_error "--tasks: '$task' is not severity or detection"
  done
}

# Checks the parsed pipeline options (not the folders: where they live
# depends on the script).
check_pipeline_options() {
  local flag
  for flag in cov19ctdb lesions stoic; do
    local var=OPT_${flag^^}
    [[ -n ${!var} ]] || usage_error "missing --$flag DIR"
  done
  if [[ -z $OPT_IMAGENET && -z $OPT_INIT2D ]]; then
    usage_error "missing --imagenet DIR (to pretrain) or --init2d CHECKPOINT (to inflate)"
  fi
  if [[ -n $OPT_IMAGENET && -n $OPT_INIT2D ]]; then
    usage_error "give --imagenet or --init2d, not both"
  fi
  [[ $OPT_INFLATION =~ ^(full|1g|2g)$ ]] ||
    usage_error "--inflation: '$OPT_INFLATION' is not full, 1g or 2g"
  check_tasks "$OPT_TASKS"
  if [[ -n $OPT_BATCH_SIZE && ! $OPT_BATCH_SIZE =~ ^[1-9][0-9]*$ ]]; then
    usage_error "--batch-size: '$OPT_BATCH_SIZE' is not a positive integer"
  fi
  check_overrides "${OPT_EXTRA[@]}"
}

# The data folders and the 2-D checkpoint exist here (a gs:// checkpoint is
# not looked up).
check_local_inputs() {
  local flag var
  for flag in cov19ctdb lesions stoic imagenet; do
    var=OPT_${flag^^}
    [[ -z ${!var} || -d ${!var} ]] || usage_error "--$flag ${!var}: no such directory"
  done
  [[ -z $OPT_INIT2D || $OPT_INIT2D == gs://* || -f $OPT_INIT2D ]] ||
    usage_error "--init2d $OPT_INIT2D: no such file"
}

# Every stage override must look like --config.FIELD=VALUE.
check_overrides() {
  local flag
  for flag in "$@"; do
    [[ $flag == --config.*=* ]] || usage_error "'$flag' is not a --config.FIELD=VALUE override"
  done
}

# ------------------------------------------------------------------ chain

# Set by the scripts before run_chain:
CHAIN_ROOT=           # workdir root R
CHAIN_CONFIGS=        # folder of the stage configs
CHAIN_SUFFIX=         # ':demo' or ''
CHAIN_INIT2D=         # 2-D checkpoint to inflate; empty: run pretrain2d
CHAIN_INFLATION=full
CHAIN_TASKS=severity
CHAIN_FLAGS=()        # flags of every stage (data folders, distributed, ...)
CHAIN_FLAGS_3D=()     # flags of the 3-D stages only (batch size)

# The configs folder, relative when run from the repository root.
local_configs() {
  if [[ $PWD -ef $REPO_DIR ]]; then
    echo configs
  else
    echo "$REPO_DIR/configs"
  fi
}

# Sets CHAIN_FLAGS and CHAIN_FLAGS_3D from the pipeline options; data paths
# are the arguments (they may differ from the options, see tpu_pod.sh):
# chain_flags_from_options COV19CTDB LESIONS STOIC IMAGENET CACHE.
chain_flags_from_options() {
  CHAIN_FLAGS=(--config.data.cov19ctdb_dir="$1" --config.data.lesions_dir="$2"
    --config.data.stoic_dir="$3")
  [[ -z $4 ]] || CHAIN_FLAGS+=(--config.data.imagenet_dir="$4")
  [[ -z $5 ]] || CHAIN_FLAGS+=(--config.data.cache_dir="$5")
  CHAIN_FLAGS_3D=()
  if [[ -n $OPT_BATCH_SIZE ]]; then
    CHAIN_FLAGS_3D=(--config.train.batch_size="$OPT_BATCH_SIZE"
      --config.train.eval_batch_size="$OPT_BATCH_SIZE")
  fi
  CHAIN_INFLATION=$OPT_INFLATION
  CHAIN_TASKS=$OPT_TASKS
}

STAGE_NO=0
STAGE_COUNT=0

# stage CONFIG WORKDIR WHAT [FLAGS...]: one `python -m covid3d.main` stage,
# skipped when WORKDIR/DONE exists.
stage() {
  local config=$1 workdir=$2 what=$3
  shift 3
  STAGE_NO=$((STAGE_NO + 1))
  local head="== [$STAGE_NO/$STAGE_COUNT] $config: $what -> $workdir"
  if stage_done "$workdir"; then
    echo "$head: skipped, $workdir/DONE exists"
    return
  fi
  echo "$head"
  local start=$SECONDS
  run_python all -m covid3d.main --config="$CHAIN_CONFIGS/$config.py$CHAIN_SUFFIX" \
    --workdir="$workdir" "$@" "${CHAIN_FLAGS[@]}" "${OPT_EXTRA[@]}"
  is_dry_run || echo "   $config took $(duration $((SECONDS - start)))"
}

# The whole chain (docs/launch.md) under CHAIN_ROOT, then the report.
run_chain() {
  local root=$CHAIN_ROOT init2d=$CHAIN_INIT2D task init tasks
  local inflate=(--config.inflation.mode="$CHAIN_INFLATION")
  IFS=, read -ra tasks <<<"$CHAIN_TASKS"
  STAGE_COUNT=$((5 + 3 * ${#tasks[@]}))
  if [[ -z $init2d ]]; then
    STAGE_COUNT=$((STAGE_COUNT + 1))
    init2d=$root/pretrain2d
    stage pretrain2d "$init2d" "2-D grayscale ConvNeXt pretraining"
  fi
  stage segmentation "$root/segmentation" \
    "lesion segmentation, weights inflated ($CHAIN_INFLATION) from $init2d" \
    --config.init_from="$init2d" "${inflate[@]}" "${CHAIN_FLAGS_3D[@]}"
  stage pseudolabel "$root/pseudolabel" \
    "the segmentation model writes lesion masks of COV19-CT-DB and STOIC" \
    --config.init_from="$root/segmentation" "${CHAIN_FLAGS_3D[@]}"
  stage segmia "$root/segmia" "segmentation of the pseudo-labels, from $init2d" \
    --config.init_from="$init2d" --config.pseudo_labels="$root/pseudolabel" \
    "${inflate[@]}" "${CHAIN_FLAGS_3D[@]}"
  stage multitask "$root/multitask" \
    "STOIC severity + pseudo-label segmentation, from $init2d" \
    --config.init_from="$init2d" --config.pseudo_labels="$root/pseudolabel" \
    "${inflate[@]}" "${CHAIN_FLAGS_3D[@]}"
  for task in "${tasks[@]}"; do
    for init in segmia multitask random; do
      local from=$root/$init
      [[ $init != random ]] || from=random
      stage "$task" "$root/${task}_$init" \
        "5-fold CV fine-tuning from $init, then the fold ensemble predicts" \
        --config.init_from="$from" "${CHAIN_FLAGS_3D[@]}"
    done
  done
  echo "== [$STAGE_COUNT/$STAGE_COUNT] report: CV macro F1 of the fine-tuning runs -> $root/report.md"
  # It prints the report too.
  run_python 0 -m covid3d.report "$root"
}

# The last line of a script (covid3d.report has printed the report).
print_total_time() {
  echo "== total wall time $(duration "$SECONDS")"
}
