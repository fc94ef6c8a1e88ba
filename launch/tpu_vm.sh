#!/usr/bin/env bash
# Run a featdiv_jax sweep on a Cloud TPU VM, on ALL of its workers at once: a pod slice runs one
# process per worker, joined by jax.distributed. Cloud TPU VMs set no TPU_WORKER_* variables, so
# each worker's run command first reads its metadata server (agent-worker-number,
# worker-network-endpoints, accelerator-type) and exports FEATDIV_PROCESS_ID,
# FEATDIV_NUM_PROCESSES (> 1 makes featdiv_jax.main's --config.distributed=auto start
# jax.distributed, which finds the other workers itself) and FEATDIV_EXPECT_DEVICES (each run
# refuses to train on fewer devices), plus a shared JAX compilation cache.
#
# Usage: launch/tpu_vm.sh --name TPU --zone ZONE [options] -- SWEEP ARGS
#
# Steps (each a `gcloud compute tpus tpu-vm` command; --dry-run prints them and runs nothing):
#   1. copy:  pack this checkout (no .venv/.git/runs) and `tpu-vm scp` it to every worker
#             (or, with --repo URL, `git clone` it on every worker in step 2)
#   2. setup: unpack into --remote-dir, python3 -m venv .venv, pip install -e ".[tpu]"
#   3. data:  python -m featdiv_jax.sweep prepare (TFDS download_and_prepare of the grid's data
#             sets into --data-dir; on worker 0 only when it is a gs:// bucket, else on all)
#   4. run:   python -m featdiv_jax.sweep run SWEEP ARGS on all workers, in the background
#             (nohup, log in --remote-dir/sweep.log) unless --foreground, with the environment
#             above; only worker 0 (FEATDIV_PROCESS_ID=0) writes each run's results.json
#
# SWEEP ARGS are those of `python -m featdiv_jax.sweep run` (--sweep-dir, --datasets, --variants,
# --archs, --seeds, --extra, --main-flag, --keep-going). On a multi-worker slice --sweep-dir must
# be on a file system all workers share (e.g. a Filestore/NFS mount), so that every worker skips
# and resumes the same runs.
#
# Options:
#   --name TPU          TPU VM name (required)
#   --zone ZONE         its zone (required)
#   --project PROJECT   gcloud project (default: gcloud's configured one)
#   --data-dir DIR      TFDS data dir, e.g. gs://BUCKET/tfds (default: TFDS's ~/tensorflow_datasets)
#   --remote-dir DIR    checkout on the workers, relative to home (default: featdiv_jax)
#   --repo URL          git clone URL on the workers instead of copying this checkout
#   --ref REF           branch / tag / commit to check out with --repo (default: the default branch)
#   --steps LIST        comma-separated subset of copy,setup,data,run (default: all)
#   --compile-cache DIR JAX persistent compilation cache (default: SWEEP_DIR/.jax_cache, shared
#                       storage on a slice like the sweep dir; relative: under --remote-dir;
#                       none: no cache)
#   --expect-devices N  devices each run must see (default: from the accelerator type, e.g.
#                       v4-32: 16, v5litepod-16: 16, v6e-8: 8; unknown types: no check; 0: no check)
#   --foreground        keep the ssh session attached until the sweep ends
#   --dry-run           print the commands, run nothing
#   -h, --help          this help
#
# Examples:
#   launch/tpu_vm.sh --name v4-32 --zone us-central2-b --dry-run -- \
#     --sweep-dir /mnt/nfs/sweep --datasets cifar10,caltech101 --seeds 0,1,2
#   launch/tpu_vm.sh --name v4-8 --zone us-central2-b --data-dir gs://my-bucket/tfds -- \
#     --sweep-dir sweeps/c10 --datasets cifar10 --archs seresnet18,seresnet34
#   launch/tpu_vm.sh --name v4-8 --zone us-central2-b --steps run -- --sweep-dir sweeps/c10 --datasets cifar10
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# shellcheck source=_common.sh
source "$root/launch/_common.sh"

name="" zone="" project="" data_dir="" remote_dir="featdiv_jax" repo="" ref="" steps="copy,setup,data,run"
foreground=0 dry_run=0 compile_cache="" expect=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --name|--zone|--project|--data-dir|--remote-dir|--repo|--ref|--steps|--compile-cache|--expect-devices)
      [ "$#" -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --name) name=$2 ;; --zone) zone=$2 ;; --project) project=$2 ;; --data-dir) data_dir=$2 ;;
        --remote-dir) remote_dir=$2 ;; --repo) repo=$2 ;; --ref) ref=$2 ;; --steps) steps=$2 ;;
        --compile-cache) compile_cache=$2 ;; --expect-devices) expect=$2 ;;
      esac
      shift 2 ;;
    --foreground) foreground=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) die "unknown option '$1' (sweep arguments go after --)" ;;
  esac
done
[ -n "$name" ] || die "--name TPU is required"
[ -n "$zone" ] || die "--zone ZONE is required"
[ "$#" -gt 0 ] || die "no sweep arguments after -- (at least --sweep-dir DIR)"
for s in ${steps//,/ }; do
  case "$s" in copy|setup|data|run) ;; *) die "unknown step '$s' in --steps; valid: copy, setup, data, run" ;; esac
done
if [ -n "$expect" ]; then at_least --expect-devices "$expect" 0; fi
if [ "$dry_run" = 0 ] && ! command -v gcloud > /dev/null; then
  die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk) or use --dry-run"
fi

sweep_args=("$@")
if [ -n "$data_dir" ]; then
  sweep_args+=("--main-flag=--config.dataset.data_dir=$data_dir")
fi
where=(--zone "$zone")
if [ -n "$project" ]; then where+=(--project "$project"); fi
tpu=(gcloud compute tpus tpu-vm)
tarball="${TMPDIR:-/tmp}/featdiv_jax-src.tar.gz"
# Check the sweep arguments here first (when this checkout's Python can), and list the runs.
local_py=${PYTHON:-$root/.venv/bin/python}
[ -x "$local_py" ] || local_py=python3
runs=""
if (cd "$root" && "$local_py" -c 'import featdiv_jax.sweep' 2> /dev/null); then
  runs=$(cd "$root" && "$local_py" -m featdiv_jax.sweep commands --python .venv/bin/python "${sweep_args[@]}") || exit 2
fi

if [ "$dry_run" = 1 ]; then echo "# launch/tpu_vm.sh --dry-run: nothing is run"; fi
if wants copy && [ -z "$repo" ]; then
  step tar -C "$root" -czf "$tarball" --exclude=./.venv --exclude=./.git --exclude=./runs \
    --exclude=__pycache__ --exclude='*.egg-info' .
  step "${tpu[@]}" scp "$tarball" "$name:featdiv_jax-src.tar.gz" --worker=all "${where[@]}"
fi
if wants setup; then
  if [ -n "$repo" ]; then
    fetch="{ [ -d $(quote "$remote_dir")/.git ] || git clone $(quote "$repo") $(quote "$remote_dir"); }"
    if [ -n "$ref" ]; then
      fetch+=" && git -C $(quote "$remote_dir") fetch -q origin && git -C $(quote "$remote_dir") checkout -q $(quote "$ref")"
    fi
  else
    fetch="mkdir -p $(quote "$remote_dir") && tar -xzf featdiv_jax-src.tar.gz -C $(quote "$remote_dir")"
  fi
  setup="set -e; $fetch && cd $(quote "$remote_dir") && { [ -x .venv/bin/python ] || python3 -m venv .venv; } && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[tpu]'"
  step "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" --command "$setup"
fi
if wants data; then
  data_workers=all
  if [[ $data_dir == gs://* ]]; then data_workers=0; fi
  prep="$(show .venv/bin/python -m featdiv_jax.sweep prepare --data-dir "$data_dir" "${sweep_args[@]}")"
  step "${tpu[@]}" ssh "$name" --worker="$data_workers" "${where[@]}" --command "cd $(quote "$remote_dir") && $prep"
fi
if wants run; then
  # Each worker's environment, from its own metadata server (one command for all workers).
  md_url=http://metadata.google.internal/computeMetadata/v1/instance/attributes
  env="md() { curl -sf -H Metadata-Flavor:Google $md_url/\$1; }"
  env+="; FEATDIV_PROCESS_ID=\$(md agent-worker-number)"
  env+="; FEATDIV_NUM_PROCESSES=\$(md worker-network-endpoints | awk -F, '{print NF}')"
  if [ -z "$expect" ]; then
    # jax devices per accelerator-type count: v2/v3 (TensorCores), v5e/v6e (chips): the count;
    # v4/v5p count TensorCores, two per chip, and jax sees one device per chip.
    env+="; t=\$(md accelerator-type); n=\${t##*-}; case \$n in ''|*[!0-9]*) t=unknown ;; esac"
    env+="; case \$t in v4-*|v5p-*) n=\$((n / 2)) ;; v2-*|v3-*|v5litepod-*|v5e-*|v6e-*) ;; *) n= ;; esac"
    env+="; export FEATDIV_EXPECT_DEVICES=\$n"
  elif [ "$expect" -gt 0 ]; then
    env+="; export FEATDIV_EXPECT_DEVICES=$expect"
  fi
  env+="; export FEATDIV_PROCESS_ID FEATDIV_NUM_PROCESSES"
  cache=$(compile_cache_of "$compile_cache" "${sweep_args[@]}")
  if [ -n "$cache" ]; then
    if [[ $cache == /* ]]; then env+="; export JAX_COMPILATION_CACHE_DIR=$(quote "$cache")"
    else env+="; export JAX_COMPILATION_CACHE_DIR=\"\$PWD\"/$(quote "$cache")"; fi
  fi
  sweep="$(show .venv/bin/python -m featdiv_jax.sweep run "${sweep_args[@]}")"
  if [ "$foreground" = 1 ]; then
    remote="cd $(quote "$remote_dir") || exit 1; $env; $sweep"
  else
    remote="cd $(quote "$remote_dir") || exit 1; $env; nohup $sweep > sweep.log 2>&1 < /dev/null & echo \"sweep started on \$(hostname) (worker \$FEATDIV_PROCESS_ID of \$FEATDIV_NUM_PROCESSES): tail -f $remote_dir/sweep.log\""
  fi
  step "${tpu[@]}" ssh "$name" --worker=all "${where[@]}" --command "$remote"
  if [ "$dry_run" = 1 ] && [ -n "$runs" ]; then
    # What each worker's sweep then runs, one run after another (for reading only).
    echo "# each worker's sweep then runs, skipping finished runs (from ~/$remote_dir):"
    while IFS= read -r line; do echo "#   $line"; done <<< "$runs"
  fi
fi
