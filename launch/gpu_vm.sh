#!/usr/bin/env bash
# Run a featdiv_jax sweep on a GPU VM over ssh: copy this checkout there, install it with CUDA
# jax, prepare the data and start the sweep in the background (it survives the ssh session).
#
# Usage: launch/gpu_vm.sh --host USER@HOST [options] -- SWEEP ARGS
#
# Steps (--dry-run prints them and runs nothing):
#   1. copy:  rsync this checkout (no .venv/.git/runs) to HOST:--remote-dir
#   2. setup: python3 -m venv .venv, pip install -e ".[cuda12]" (see --extras)
#   3. data:  python -m featdiv_jax.sweep prepare (TFDS data of the grid's data sets, --data-dir)
#   4. run:   nohup python -m featdiv_jax.sweep run SWEEP ARGS > sweep.log (in --remote-dir);
#             re-running this step resumes: finished runs are skipped, interrupted ones resume.
#             It exports FEATDIV_EXPECT_DEVICES (the GPUs nvidia-smi lists: a run that sees
#             fewer, e.g. a jax without CUDA falling back to the CPU, refuses to train) and a
#             JAX compilation cache shared by all runs, seeds and restarts
#
# SWEEP ARGS are those of `python -m featdiv_jax.sweep run` (--sweep-dir, --datasets, --variants,
# --archs, --seeds, --extra, --main-flag, --keep-going); a relative --sweep-dir is under
# --remote-dir. All the VM's GPUs train each run together (the batch is split over them).
#
# Options:
#   --host USER@HOST    ssh destination (required)
#   --remote-dir DIR    checkout on the VM, relative to home (default: featdiv_jax)
#   --extras LIST       pip extras to install (default: cuda12; e.g. cuda13)
#   --data-dir DIR      TFDS data dir on the VM (default: TFDS's ~/tensorflow_datasets)
#   --ssh-option OPT    extra ssh option, e.g. --ssh-option=-p2222 (repeatable)
#   --steps LIST        comma-separated subset of copy,setup,data,run (default: all)
#   --compile-cache DIR JAX persistent compilation cache (default: SWEEP_DIR/.jax_cache;
#                       relative: under --remote-dir; none: no cache)
#   --expect-devices N  devices each run must see (default: the GPUs nvidia-smi -L lists on the
#                       VM; 0: no check)
#   --foreground        keep the ssh session attached until the sweep ends
#   --dry-run           print the commands, run nothing
#   -h, --help          this help
#
# Examples:
#   launch/gpu_vm.sh --host me@gpu-vm --dry-run -- --sweep-dir runs/sweep --datasets cifar10 --seeds 0,1,2
#   launch/gpu_vm.sh --host me@gpu-vm -- --sweep-dir runs/sweep --datasets digits,cifar10
#   ssh me@gpu-vm 'tail -f featdiv_jax/sweep.log'                                  # follow it
#   launch/gpu_vm.sh --host me@gpu-vm --steps run -- --sweep-dir runs/sweep --datasets cifar10  # resume
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# shellcheck source=_common.sh
source "$root/launch/_common.sh"

host="" remote_dir="featdiv_jax" extras="cuda12" data_dir="" steps="copy,setup,data,run"
foreground=0 dry_run=0 ssh_opts=() compile_cache="" expect=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --host|--remote-dir|--extras|--data-dir|--steps|--ssh-option|--compile-cache|--expect-devices)
      [ "$#" -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --host) host=$2 ;; --remote-dir) remote_dir=$2 ;; --extras) extras=$2 ;;
        --data-dir) data_dir=$2 ;; --steps) steps=$2 ;; --ssh-option) ssh_opts+=("$2") ;;
        --compile-cache) compile_cache=$2 ;; --expect-devices) expect=$2 ;;
      esac
      shift 2 ;;
    --ssh-option=*) ssh_opts+=("${1#--ssh-option=}"); shift ;;
    --foreground) foreground=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) die "unknown option '$1' (sweep arguments go after --)" ;;
  esac
done
[ -n "$host" ] || die "--host USER@HOST is required"
[ "$#" -gt 0 ] || die "no sweep arguments after -- (at least --sweep-dir DIR)"
for s in ${steps//,/ }; do
  case "$s" in copy|setup|data|run) ;; *) die "unknown step '$s' in --steps; valid: copy, setup, data, run" ;; esac
done
if [ -n "$expect" ]; then at_least --expect-devices "$expect" 0; fi
if [ "$dry_run" = 0 ]; then
  for tool in ssh rsync; do
    command -v "$tool" > /dev/null || die "$tool not found: install it (e.g. apt-get install openssh-client rsync) or use --dry-run"
  done
fi

sweep_args=("$@")
if [ -n "$data_dir" ]; then
  sweep_args+=("--main-flag=--config.dataset.data_dir=$data_dir")
fi
# Check the sweep arguments here first (when this checkout's Python can), and list the runs.
local_py=${PYTHON:-$root/.venv/bin/python}
[ -x "$local_py" ] || local_py=python3
runs=""
if (cd "$root" && "$local_py" -c 'import featdiv_jax.sweep' 2> /dev/null); then
  runs=$(cd "$root" && "$local_py" -m featdiv_jax.sweep commands --python .venv/bin/python "${sweep_args[@]}") || exit 2
fi
ssh_cmd=(ssh "${ssh_opts[@]}")
rdir=$(quote "$remote_dir")

if [ "$dry_run" = 1 ]; then echo "# launch/gpu_vm.sh --dry-run: nothing is run"; fi
if wants copy; then
  step "${ssh_cmd[@]}" "$host" "mkdir -p $rdir"
  step rsync -az -e "$(show "${ssh_cmd[@]}")" --exclude=/.venv --exclude=/.git --exclude=/runs \
    --exclude=__pycache__ --exclude='*.egg-info' "$root/" "$host:$remote_dir/"
fi
if wants setup; then
  step "${ssh_cmd[@]}" "$host" "set -e; cd $rdir && { [ -x .venv/bin/python ] || python3 -m venv .venv; } && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e $(quote ".[$extras]")"
fi
if wants data; then
  step "${ssh_cmd[@]}" "$host" "cd $rdir && $(show .venv/bin/python -m featdiv_jax.sweep prepare --data-dir "$data_dir" "${sweep_args[@]}")"
fi
if wants run; then
  # One process trains on all the VM's GPUs: it must see as many as nvidia-smi lists.
  if [ -z "$expect" ]; then
    env="n=\$(nvidia-smi -L 2> /dev/null | grep -c '^GPU'); [ \"\$n\" -gt 0 ] || n="
    env+="; export FEATDIV_EXPECT_DEVICES=\$n"
  elif [ "$expect" -gt 0 ]; then
    env="export FEATDIV_EXPECT_DEVICES=$expect"
  else
    env="unset FEATDIV_EXPECT_DEVICES"
  fi
  cache=$(compile_cache_of "$compile_cache" "${sweep_args[@]}")
  if [ -n "$cache" ]; then
    if [[ $cache == /* ]]; then env+="; export JAX_COMPILATION_CACHE_DIR=$(quote "$cache")"
    else env+="; export JAX_COMPILATION_CACHE_DIR=\"\$PWD\"/$(quote "$cache")"; fi
  fi
  sweep="$(show .venv/bin/python -m featdiv_jax.sweep run "${sweep_args[@]}")"
  if [ "$foreground" = 1 ]; then
    step "${ssh_cmd[@]}" "$host" "cd $rdir || exit 1; $env; $sweep"
  else
    step "${ssh_cmd[@]}" "$host" "cd $rdir || exit 1; $env; nohup $sweep > sweep.log 2>&1 < /dev/null & echo \"sweep started (pid \$!): ssh $(quote "$host") tail -f $rdir/sweep.log\""
  fi
  if [ "$dry_run" = 1 ] && [ -n "$runs" ]; then
    echo "# the sweep then runs, skipping finished runs (from ~/$remote_dir):"
    while IFS= read -r line; do echo "#   $line"; done <<< "$runs"
  fi
fi
