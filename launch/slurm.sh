#!/usr/bin/env bash
# Submit a featdiv_jax sweep as ONE SLURM job: in one allocation of N nodes x G GPUs, each run of
# the sweep trains on all N x G GPUs, one process per GPU (srun --ntasks-per-node=G; JAX gives
# each process the GPU of its SLURM_LOCALID) joined by jax.distributed (featdiv_jax.main,
# --config.distributed=auto, starts it when SLURM_NTASKS > 1), one run after another. Runs whose
# results.json says finished are skipped, interrupted ones resume, so re-submitting the same
# sweep continues it. Each run refuses to train when it sees fewer than N x G devices
# (FEATDIV_EXPECT_DEVICES), and all runs share one JAX compilation cache.
#
# Usage: launch/slurm.sh [options] -- SWEEP ARGS
#
# SWEEP ARGS are those of `python -m featdiv_jax.sweep` (--sweep-dir, --datasets, --variants,
# --archs, --seeds, --extra, --main-flag); --sweep-dir must be on a file system every node sees.
# The runs come from `python -m featdiv_jax.sweep commands`; the job stops at the first failed run,
# and after a SIGTERM (preemption, scancel, time limit) once the running run has saved.
#
# Options:
#   --nodes N             nodes per run (default: 1)
#   --gpus-per-node G     GPUs per node, one task (process) each (default: 1; 0: CPU nodes, one
#                         task per node, no --gpus-per-node line and no device count check)
#   --cpus-per-task C     CPU cores per task, i.e. per GPU, for its input pipeline; passed to
#                         srun too (Slurm >= 22.05 srun does not take it from #SBATCH)
#                         (default: not set, the cluster's default, often 1)
#   --partition P         SLURM partition (default: the cluster's default)
#   --time T              time limit, e.g. 24:00:00 (default: the partition's)
#   --account A           SLURM account (default: not set)
#   --job-name NAME       job name (default: featdiv-sweep)
#   --sbatch-option OPT   one more #SBATCH line, e.g. --sbatch-option=--exclusive (repeatable)
#   --compile-cache DIR   JAX persistent compilation cache, on storage every node sees
#                         (default: SWEEP_DIR/.jax_cache; none: no cache)
#   --expect-devices N    devices each run must see (default: N x G; 0: no check)
#   --python PATH         Python with featdiv_jax installed, on the nodes and here
#                         (default: this checkout's .venv/bin/python, else python3)
#   --script PATH         where to write the sbatch script (default: a temporary file)
#   --dry-run, --print    print the sbatch script and the sbatch command, submit nothing
#   -h, --help            this help
#
# Examples:
#   launch/slurm.sh --nodes 2 --gpus-per-node 4 --cpus-per-task 8 --partition gpu --time 24:00:00 \
#     --dry-run -- --sweep-dir /shared/sweeps/c10 --datasets cifar10 --seeds 0,1,2
#   launch/slurm.sh --nodes 1 --gpus-per-node 8 -- --sweep-dir /shared/sweeps/all \
#     --datasets cifar10,caltech101,flowers102 --main-flag=--config.dataset.data_dir=/shared/tfds
#   .venv/bin/python -m featdiv_jax.sweep status --sweep-dir /shared/sweeps/c10    # progress
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# shellcheck source=_common.sh
source "$root/launch/_common.sh"
nodes=1 gpus=1 cpus="" partition="" time_limit="" account="" job_name="featdiv-sweep"
python="" script="" dry_run=0 extra_sbatch=() compile_cache="" expect=""
while [ "$#" -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nodes|--gpus-per-node|--cpus-per-task|--partition|--time|--account|--job-name|--sbatch-option|--python|--script|--compile-cache|--expect-devices)
      [ "$#" -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --nodes) nodes=$2 ;; --gpus-per-node) gpus=$2 ;; --cpus-per-task) cpus=$2 ;;
        --partition) partition=$2 ;; --time) time_limit=$2 ;; --account) account=$2 ;;
        --job-name) job_name=$2 ;; --sbatch-option) extra_sbatch+=("$2") ;;
        --python) python=$2 ;; --script) script=$2 ;;
        --compile-cache) compile_cache=$2 ;; --expect-devices) expect=$2 ;;
      esac
      shift 2 ;;
    --sbatch-option=*) extra_sbatch+=("${1#--sbatch-option=}"); shift ;;
    --dry-run|--print) dry_run=1; shift ;;
    --) shift; break ;;
    *) die "unknown option '$1' (sweep arguments go after --)" ;;
  esac
done
[ "$#" -gt 0 ] || die "no sweep arguments after -- (at least --sweep-dir DIR)"
at_least --nodes "$nodes" 1
at_least --gpus-per-node "$gpus" 0
if [ -n "$cpus" ]; then at_least --cpus-per-task "$cpus" 1; fi
if [ -n "$expect" ]; then at_least --expect-devices "$expect" 0; fi
if [ -z "$python" ]; then
  python=$root/.venv/bin/python
  [ -x "$python" ] || python=$(command -v python3 || echo python3)
fi
if [ "$dry_run" = 0 ] && ! command -v sbatch > /dev/null; then
  die "sbatch not found: run this on a SLURM login node, or use --dry-run to print the job script"
fi

# One task (process) per GPU: JAX's SLURM detection gives each process the GPU of its
# SLURM_LOCALID only (jax-ml/jax#16788), so one task per node would train on one GPU per node.
tasks_per_node=$(( gpus > 0 ? gpus : 1 ))
if [ -z "$expect" ]; then expect=$(( gpus > 0 ? nodes * gpus : 0 )); fi
srun_opts=(--nodes="$nodes" --ntasks-per-node="$tasks_per_node")
if [ "$gpus" -gt 0 ]; then srun_opts+=(--gpus-per-node="$gpus"); fi
if [ -n "$cpus" ]; then srun_opts+=(--cpus-per-task="$cpus"); fi
srun_opts+=(--kill-on-bad-exit=1)
sweep_args=("$@" "--main-flag=--config.distributed=auto")
# Relative paths are taken from the checkout (the job runs there, as `sweep commands` does).
cache=$(compile_cache_of "$compile_cache" "$@")
if [ -n "$cache" ] && [[ $cache != /* ]]; then cache=$root/$cache; fi
# The sweep's runs as commands (absolute workdirs), each on all nodes; also checks the arguments.
runs=$(cd "$root" && "$python" -m featdiv_jax.sweep commands --absolute --python "$python" \
  --prefix "srun ${srun_opts[*]}" "${sweep_args[@]}") || exit 2

job() {
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=$tasks_per_node"
  if [ "$gpus" -gt 0 ]; then echo "#SBATCH --gpus-per-node=$gpus"; fi
  if [ -n "$cpus" ]; then echo "#SBATCH --cpus-per-task=$cpus"; fi
  if [ -n "$partition" ]; then echo "#SBATCH --partition=$partition"; fi
  if [ -n "$time_limit" ]; then echo "#SBATCH --time=$time_limit"; fi
  if [ -n "$account" ]; then echo "#SBATCH --account=$account"; fi
  local opt
  for opt in "${extra_sbatch[@]}"; do echo "#SBATCH $opt"; done
  echo "#SBATCH --output=slurm-%x-%j.out"
  echo "# featdiv_jax sweep written by launch/slurm.sh: $(show "${sweep_args[@]}")"
  if [ "$gpus" -gt 0 ]; then
    echo "# Each run trains on $nodes node(s) x $gpus GPU(s): $((nodes * tasks_per_node)) processes, one per GPU, joined by jax.distributed; runs one after another."
  else
    echo "# Each run trains on $nodes CPU node(s), one process per node, joined by jax.distributed; runs one after another."
  fi
  echo "set -euo pipefail"
  echo "cd $(quote "$root")"
  echo "export PYTHONUNBUFFERED=1"
  if [ -n "$cpus" ]; then
    echo "export SRUN_CPUS_PER_TASK=$cpus  # srun in Slurm >= 22.05 does not inherit --cpus-per-task"
  fi
  if [ "$expect" -gt 0 ]; then
    echo "export FEATDIV_EXPECT_DEVICES=$expect  # featdiv_jax.main refuses to train on fewer devices"
  fi
  if [ -n "$cache" ]; then
    echo "export JAX_COMPILATION_CACHE_DIR=$(quote "$cache")  # shared by all runs, seeds and restarts"
  fi
  echo "finished() {  # results.json of workdir \$1 says finished"
  echo "  $(quote "$python") -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get(\"finished\") is True else 1)' \"\$1/results.json\" 2> /dev/null"
  echo "}"
  echo "# SIGTERM (preemption, scancel, the time limit) also reaches the running run, which saves a"
  echo "# checkpoint and exits 0: then start no further run."
  echo "stop=0"
  echo "trap 'stop=1' TERM"
  echo "start=\$SECONDS"
  local line workdir
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    if [[ $line =~ --workdir=([^\ \']+) ]]; then
      workdir=${BASH_REMATCH[1]}
      echo "if [ \"\$stop\" = 1 ]; then echo \"sweep: SIGTERM: stopped before $workdir; re-submit to resume\"; exit 143; fi"
      echo "if finished $(quote "$workdir"); then echo \"sweep: skip $workdir: finished\"; else"
      echo "  echo \"sweep: start $workdir\""
      echo "  $line"
      echo "fi"
    else
      echo "$line"
    fi
  done <<< "$runs"
  echo "if [ \"\$stop\" = 1 ]; then echo \"sweep: SIGTERM: stopped; re-submit to resume\"; exit 143; fi"
  echo "echo \"sweep: all runs done in \$((SECONDS - start)) s\""
}

if [ "$dry_run" = 1 ]; then
  echo "# launch/slurm.sh --dry-run: the sbatch script (nothing is written or submitted)"
  job
  echo "# submit with:"
  echo "sbatch ${script:-SCRIPT.sbatch}"
  exit 0
fi
if [ -z "$script" ]; then script=$(mktemp "${TMPDIR:-/tmp}/featdiv-sweep-XXXXXX.sbatch"); fi
job > "$script"
"$python" -m featdiv_jax.sweep plan "${sweep_args[@]}"  # sweep.json, for status and reports
echo "+ sbatch $script" >&2
sbatch "$script"
