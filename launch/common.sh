# Shell functions shared by the launch scripts; sourced, never run.
#
# Every command goes through `run`, which prints it as one shell-quoted line
# prefixed with "+ " and runs it unless dry-run mode is on (DRY_RUN=1 in the
# environment or --dry-run on a script's command line). The stage chain is
# data in covid3d/stages/chain.py; run_chain runs its steps, and where a
# stage's python runs is the hook `run_python`: here by default, on the TPU
# workers in tpu_pod.sh.
# shellcheck shell=bash
# shellcheck disable=SC2034  # OPT_* and CHAIN_* are read by the scripts

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$LAUNCH_DIR")
PROG=$(basename "$0")
PYTHON=${PYTHON:-python}
DRY_RUN=${DRY_RUN:-0}
# The chain's steps (covid3d/stages/chain.py), run by path with $PYTHON: it
# needs the standard library only, and so skips the package's imports.
CHAIN_PY=$REPO_DIR/covid3d/stages/chain.py

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

# A pod rehearsed on this machine (demo.sh --processes N): a step on 'all'
# hosts runs as LOCAL_PROCESSES JAX processes on 127.0.0.1, each with 2 CPU
# devices and its own cache under LOCAL_CACHE, as the hosts of a pod would.
# When one fails, the others are stopped (they would wait for it in their
# collectives), and the step fails.
LOCAL_PROCESSES=1
LOCAL_CACHE=
run_python_local_processes() {
  local workers=$1 port i status=0
  shift
  if [[ $workers != all ]]; then
    run "$PYTHON" "$@"
    return
  fi
  port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  local -a pids=() argv
  for ((i = 0; i < LOCAL_PROCESSES; i++)); do
    argv=(env XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu "$PYTHON" "$@"
      --config.train.distributed.initialize=True
      --config.train.distributed.coordinator_address="127.0.0.1:$port"
      --config.train.distributed.num_processes="$LOCAL_PROCESSES"
      --config.train.distributed.process_id="$i" --config.cache_dir="$LOCAL_CACHE/process$i")
    printf '+ %s\n' "$(quote_words "${argv[@]}")"
    is_dry_run || {
      "${argv[@]}" &
      pids+=($!)
    }
  done
  is_dry_run && return
  for ((i = 0; i < LOCAL_PROCESSES; i++)); do
    wait -n || {
      status=$?
      kill "${pids[@]}" 2>/dev/null || true
      wait
      break
    }
  done
  ((status == 0)) || fail "a process of this step failed (exit status $status); the others were stopped"
}

# True if the stage in workdir $1 has finished (its DONE marker exists). A
# gs:// marker is looked up with gcloud, except in dry-run mode; with a GCS
# emulator (STORAGE_EMULATOR_HOST set), which gcloud does not use, with Python.
stage_done() {
  case $1 in
    gs://*)
      if is_dry_run; then
        return 1
      elif [[ -n ${STORAGE_EMULATOR_HOST:-} ]]; then
        "$PYTHON" -c 'import sys, covid3d; from etils import epath
sys.exit(not epath.Path(sys.argv[1]).exists())' "$1/DONE"
      else
        gcloud storage ls "$1/DONE" >/dev/null 2>&1
      fi
      ;;
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
OPT_TARGETS=severity,detection
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
  --targets LIST     comma-separated fine-tuning targets (default severity,detection;
                     --tasks is its deprecated old name)
  --batch-size N     global batch of the 3-D stages (default: the configs')
  --cache DIR        cache root: preprocessed records, XLA programs (--config.cache_dir)"
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
    --targets) need_value "$@"; OPT_TARGETS=$2 ;;
    --tasks) need_value "$@"; deprecated_option --tasks --targets; OPT_TARGETS=$2 ;;
    --batch-size) need_value "$@"; OPT_BATCH_SIZE=$2 ;;
    --dry-run) DRY_RUN=1; OPT_SHIFT=1 ;;
    --) shift; OPT_EXTRA=("$@"); OPT_SHIFT=$(($# + 1)) ;;
    *) OPT_SHIFT=0 ;;
  esac
}

# parse_pipeline_args ARGS...: all of a script's arguments as pipeline options
# (-h/--help: the script's usage). With BARE_OVERRIDES=1 a --config.F=V is an
# override (OPT_EXTRA) without the "--" before it.
parse_pipeline_args() {
  split_option_values "$@"
  set -- "${ARGS[@]}"
  while (($#)); do
    case $1 in
      -h | --help) usage; exit 0 ;;
      --config.*)
        if [[ ${BARE_OVERRIDES:-0} == 1 ]]; then
          OPT_EXTRA+=("$1")
          shift
          continue
        fi
        ;;
    esac
    parse_pipeline_option "$@"
    ((OPT_SHIFT)) || usage_error "unknown option '$1'"
    shift "$OPT_SHIFT"
  done
}

# deprecated_option OLD NEW: one line on stderr; the option works as NEW.
deprecated_option() {
  echo "$PROG: $1 is deprecated, use $2" >&2
}

# check_targets LIST: a usage error unless covid3d/stages/chain.py takes LIST
# as --targets (it says why on stderr, exit status 2).
check_targets() {
  local error status=0
  error=$("$PYTHON" "$CHAIN_PY" --targets="$1" 2>&1 >/dev/null) || status=$?
  case $status in
    0) ;;
    2) usage_error "--targets: ${error#*: }" ;;
    *) fail "$PYTHON $CHAIN_PY failed (exit status $status): $error" ;;
  esac
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
  check_targets "$OPT_TARGETS"
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

# Set by the scripts before run_chain (the options of covid3d/stages/chain.py):
CHAIN_ROOT=           # workdir root R
CHAIN_CONFIGS=        # folder of the stage configs
CHAIN_SUFFIX=         # ':demo' or ''
CHAIN_INIT2D=         # 2-D checkpoint to inflate; empty: run pretrain2d
CHAIN_INFLATION=full
CHAIN_TARGETS=severity
CHAIN_FLAGS=()        # flags of every stage (data folders, distributed, ...)
CHAIN_FLAGS_3D=()     # flags of the 3-D stages only (batch size)
CHAIN_PLAN=()         # (--ablations): the steps of ablations.sh instead of the chain

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
  [[ -z $5 ]] || CHAIN_FLAGS+=(--config.cache_dir="$5")
  CHAIN_FLAGS_3D=()
  if [[ -n $OPT_BATCH_SIZE ]]; then
    CHAIN_FLAGS_3D=(--config.train.batch_size="$OPT_BATCH_SIZE"
      --config.train.eval_batch_size="$OPT_BATCH_SIZE")
  fi
  CHAIN_INFLATION=$OPT_INFLATION
  CHAIN_TARGETS=$OPT_TARGETS
}

# The whole chain (docs/launch.md) under CHAIN_ROOT, then the report: the
# steps covid3d/stages/chain.py prints, one a line, tab-separated fields
# KIND NAME OUTPUT HEADLINE PYTHON-ARGS... A "stage" step runs on every host
# unless OUTPUT/DONE exists; the "report" step runs on one host, always. (The
# locals are step_*: run_python, redefined by a script, sees them.)
run_chain() {
  local step_list step_line step_head step_start step_no=0
  local -a step_lines step_fields step_args
  step_list=$("$PYTHON" "$CHAIN_PY" --root="$CHAIN_ROOT" --targets="$CHAIN_TARGETS" \
    --init2d="$CHAIN_INIT2D" --inflation="$CHAIN_INFLATION" --configs="$CHAIN_CONFIGS" \
    --suffix="$CHAIN_SUFFIX" "${CHAIN_FLAGS_3D[@]/#/--flag-3d=}" \
    "${CHAIN_FLAGS[@]/#/--flag=}" "${OPT_EXTRA[@]/#/--flag=}" "${CHAIN_PLAN[@]}") ||
    fail "$PYTHON $CHAIN_PY could not list the chain"
  mapfile -t step_lines <<<"$step_list"
  for step_line in "${step_lines[@]}"; do
    IFS=$'\t' read -r -a step_fields <<<"$step_line"
    step_args=("${step_fields[@]:4}")
    step_no=$((step_no + 1))
    step_head="== [$step_no/${#step_lines[@]}] ${step_fields[1]}: ${step_fields[3]} -> ${step_fields[2]}"
    case ${step_fields[0]} in
      stage)
        if stage_done "${step_fields[2]}"; then
          echo "$step_head: skipped, ${step_fields[2]}/DONE exists"
          continue
        fi
        echo "$step_head"
        step_start=$SECONDS
        run_python all "${step_args[@]}"
        is_dry_run || echo "   ${step_fields[1]} took $(duration $((SECONDS - step_start)))"
        ;;
      report)
        echo "$step_head"
        # It prints the report too.
        run_python 0 "${step_args[@]}"
        ;;
      *) fail "$CHAIN_PY: unknown step kind '${step_fields[0]}'" ;;
    esac
  done
}

# The last line of a script (covid3d.report has printed the report).
print_total_time() {
  echo "== total wall time $(duration "$SECONDS")"
}
