#!/usr/bin/env bash
# The pipeline on a Cloud TPU VM pod slice: creates the slice with gcloud,
# installs the project on every worker, copies gs:// data to the workers'
# disks, runs each stage of pipeline.sh's chain on all workers at once (one
# JAX process per host, jax.distributed initialised), workdirs on a gs://
# bucket; optionally deletes the slice at the end. Every command goes through
# `run`, so a dry run prints exactly what a real run does; only the read-only
# lookups (does the slice exist, does a stage's DONE exist) are not printed.
set -euo pipefail
# shellcheck source=launch/common.sh
. "$(dirname "$0")/common.sh"

usage() {
  cat <<EOF
Usage: bash launch/$PROG --bucket gs://BUCKET[/PREFIX] --cov19ctdb DIR --lesions DIR
         --stoic DIR (--imagenet DIR | --init2d CHECKPOINT) [options] [-- --config.FIELD=VALUE ...]

Workdirs are gs://BUCKET[/PREFIX]/<stage>, the report .../report.md; a stage
whose workdir holds a DONE file is skipped, so a rerun resumes. Data folders
and --init2d may be gs:// paths (copied to --worker-data on every worker) or
absolute paths that exist on every worker (e.g. a disk attached to all of them).
Needs gcloud, logged in, with TPU quota in the zone, and python here (\$PYTHON if
set, else 'python' on PATH; the standard library is enough) to list the stages.

TPU slice:
  --bucket gs://B[/P]     workdir root (required); the TPU service account must
                          be able to write it
  --name NAME             TPU name (default covid3d)
  --zone ZONE             (default us-central2-b)
  --project PROJECT       (default: gcloud's configured project)
  --accelerator-type T    (default v4-32: 4 hosts x 4 chips)
  --version V             TPU VM image (default tpu-ubuntu2204-base)
  --spot                  create a Spot slice (cheaper, may be preempted: rerun
                          the same command to resume)
  --repo URL              git clone URL of the project on the workers
                          (default: 'git archive' of this checkout, copied)
  --ref REF               branch or tag to clone / commit to archive (default HEAD)
  --worker-data DIR       absolute folder on every worker for copied data and
                          the record cache (default /tmp/covid3d_data)
  --skip-create           the slice exists already (else it must not)
  --skip-install          the project is installed on it already
  --delete                delete the slice at the end (also after a failure or
                          an interruption); without it the slice stays up, and
                          is billed, until you delete it

Pipeline options (as pipeline.sh; no --root, the root is --bucket; --cache is
an absolute path on the workers, default --worker-data/cache):
$PIPELINE_OPTIONS_HELP
$RUN_OPTIONS_HELP
EOF
}

name=covid3d
zone=us-central2-b
project=
accelerator=v4-32
version=tpu-ubuntu2204-base
bucket=
repo=
ref=
worker_data=/tmp/covid3d_data
create=1
install=1
delete=0
spot=0
split_option_values "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --bucket) need_value "$@"; bucket=${2%/}; shift 2 ;;
    --name) need_value "$@"; name=$2; shift 2 ;;
    --zone) need_value "$@"; zone=$2; shift 2 ;;
    --project) need_value "$@"; project=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; accelerator=$2; shift 2 ;;
    --version) need_value "$@"; version=$2; shift 2 ;;
    --repo) need_value "$@"; repo=$2; shift 2 ;;
    --ref) need_value "$@"; ref=$2; shift 2 ;;
    --worker-data) need_value "$@"; worker_data=${2%/}; shift 2 ;;
    --skip-create) create=0; shift ;;
    --skip-install) install=0; shift ;;
    --delete) delete=1; shift ;;
    --spot) spot=1; shift ;;
    *)
      parse_pipeline_option "$@"
      ((OPT_SHIFT)) || usage_error "unknown option '$1'"
      shift "$OPT_SHIFT"
      ;;
  esac
done
[[ -n $bucket ]] || usage_error "missing --bucket gs://BUCKET[/PREFIX] (the workdir root)"
[[ $bucket == gs://?* ]] || usage_error "--bucket $bucket: not a gs:// path"
[[ -z $OPT_ROOT ]] || usage_error "--root: the workdir root of a pod run is --bucket"
check_pipeline_options
# The stages run in ~/covid3d on the workers, the copies in ~: only an absolute
# path names the same folder for both. The record cache is written by every
# host on its own disk, never on the bucket.
[[ $worker_data == /* ]] || usage_error "--worker-data $worker_data: not an absolute path"
[[ -z $OPT_CACHE || $OPT_CACHE == /* ]] ||
  usage_error "--cache $OPT_CACHE: not an absolute path on the workers (a gs:// cache is not supported)"
for flag in cov19ctdb lesions stoic imagenet init2d; do
  var=OPT_${flag^^}
  [[ -z ${!var} || ${!var} == gs://?* || ${!var} == /* ]] ||
    usage_error "--$flag ${!var}: give a gs:// path or an absolute path on the workers"
done

gcloud_args=(--zone="$zone")
[[ -z $project ]] || gcloud_args+=(--project="$project")
delete_cmd=(gcloud compute tpus tpu-vm delete "$name" "${gcloud_args[@]}" --quiet)

# on_workers WORKERS COMMAND: runs the shell COMMAND on the workers ('all' or an index).
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_args[@]}" --worker="$1" --command="$2"
}

# The stages' python runs in the project folder on the workers.
run_python() {
  local workers=$1
  shift
  on_workers "$workers" "cd covid3d && .venv/bin/python $(quote_words "$@")"
}

# On exit (success, failure or interruption): with --delete, deletes the slice
# and keeps the exit status (1 if the deletion failed); else says how to.
finish() {
  local status=$?
  if ((delete)); then
    echo "== deleting the TPU slice $name"
    if ! run "${delete_cmd[@]}"; then
      echo "$PROG: could not delete the TPU slice $name; it is billed while it exists." >&2
      echo "Check with: $(quote_words gcloud compute tpus tpu-vm list "${gcloud_args[@]}")" >&2
      ((status)) || status=1
    fi
  else
    echo "== the TPU slice $name is not deleted (no --delete) and is billed while it exists;"
    echo "   delete it with: $(quote_words "${delete_cmd[@]}")"
  fi
  exit "$status"
}

# stage_input dir|file SOURCE NAME: a gs:// SOURCE is copied to
# WORKER_DATA/NAME on every worker; sets STAGED to the path the stages read.
stage_input() {
  local kind=$1 source=$2 dest=$worker_data/$3
  STAGED=$source
  [[ $source == gs://* ]] || return 0
  echo "== copying $source to $dest on every worker"
  local folder=$dest copy=(gcloud storage rsync --recursive "$source" "$dest")
  if [[ $kind == file ]]; then
    folder=$(dirname "$dest")
    copy=(gcloud storage cp "$source" "$dest")
  fi
  on_workers all "mkdir -p $(quote_words "$folder") && $(quote_words "${copy[@]}")"
  STAGED=$dest
}

install_project() {
  echo "== installing the project on every worker"
  if [[ -n $repo ]]; then
    local clone=(git clone --depth=1)
    [[ -z $ref ]] || clone+=(--branch="$ref")
    on_workers all "rm -rf covid3d && $(quote_words "${clone[@]}" "$repo" covid3d)"
  else
    local tarball=${TMPDIR:-/tmp}/covid3d-$name.tar.gz
    run git -C "$REPO_DIR" archive --format=tar.gz --output="$tarball" "${ref:-HEAD}"
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:covid3d.tar.gz" "${gcloud_args[@]}" --worker=all
    on_workers all "rm -rf covid3d && mkdir covid3d && tar -xzf covid3d.tar.gz -C covid3d"
  fi
  # Reading a PyTorch checkpoint needs torch; .safetensors and .npz do not.
  local extras=tpu
  case $OPT_INIT2D in
    *.pth | *.pt | *.bin | *.ckpt) extras=tpu,torch ;;
  esac
  # The image's python is 3.10; the project needs 3.11 or newer.
  local apt='sudo DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=600'
  on_workers all "$apt update && $apt install -y python3.11 python3.11-venv && cd covid3d && python3.11 -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e \".[$extras]\""
}

echo "== covid3d on TPU slice $name ($accelerator, $zone), workdirs under $bucket"
# A slice of that name that exists already (an earlier run's, someone else's)
# is neither created over nor, with --delete, deleted.
if ((create)) && ! is_dry_run &&
  gcloud compute tpus tpu-vm describe "$name" "${gcloud_args[@]}" >/dev/null 2>&1; then
  fail "a TPU slice $name exists already in $zone. To run on it, add --skip-create (and
--skip-install if the project is installed on it); to replace it (e.g. a preempted Spot
slice), delete it first: $(quote_words "${delete_cmd[@]}"); or choose another --name."
fi
trap finish EXIT
if ((create)); then
  echo "== creating the TPU slice $name"
  create_flags=(--accelerator-type="$accelerator" --version="$version")
  ((spot == 0)) || create_flags+=(--spot)
  run gcloud compute tpus tpu-vm create "$name" "${gcloud_args[@]}" "${create_flags[@]}"
fi
if ((install)); then
  install_project
fi

stage_input dir "$OPT_COV19CTDB" cov19ctdb
cov19ctdb=$STAGED
stage_input dir "$OPT_LESIONS" lesions
lesions=$STAGED
stage_input dir "$OPT_STOIC" stoic
stoic=$STAGED
imagenet=
if [[ -n $OPT_IMAGENET ]]; then
  stage_input dir "$OPT_IMAGENET" imagenet
  imagenet=$STAGED
fi
if [[ -n $OPT_INIT2D ]]; then
  stage_input file "$OPT_INIT2D" "init2d/$(basename "$OPT_INIT2D")"
  CHAIN_INIT2D=$STAGED
fi

CHAIN_ROOT=$bucket
CHAIN_CONFIGS=configs
chain_flags_from_options "$cov19ctdb" "$lesions" "$stoic" "$imagenet" "${OPT_CACHE:-$worker_data/cache}"
CHAIN_FLAGS+=(--config.train.distributed.initialize=True)
run_chain
print_total_time
