#!/usr/bin/env bash
# Submit a featdiv_jax sweep as ONE SLURM job: in one allocation of N nodes, each run of the sweep
# trains on all N nodes (srun, one task per node, all its GPUs) joined by jax.distributed
# (featdiv_jax.main, --config.distributed=auto, starts it when SLURM_NTASKS > 1), one run after
# another. Runs whose results.json says finished are skipped, interrupted ones resume, so
# re-submitting the same sweep continues it.
#
# Usage: launch/slurm.sh [options] -- SWEEP ARGS
#
# SWEEP ARGS are those of `python -m featdiv_jax.sweep` (--sweep-dir, --datasets, --variants,
# --archs, --seeds, --extra, --main-flag); --sweep-dir must be on a file system every node sees.
# The runs come from `python -m featdiv_jax.sweep commands`; the job stops at the first failed run.
#
# Options:
#   --nodes N             nodes per run (default: 1)
#   --gpus-per-node G     GPUs per node (default: 1; 0: no --gpus-per-node line)
#   --cpus-per-task C     CPU cores per node's task (default: not set)
#   --partition P         SLURM partition (default: the cluster's default)
#   --time T              time limit, e.g. 24:00:00 (default: the partition's)
#   --account A           SLURM account (default: not set)
#   --job-name NAME       job name (default: featdiv-sweep)
#   --sbatch-option OPT   one more #SBATCH line, e.g. --sbatch-option=--exclusive (repeatable)
#   --python PATH         Python with featdiv_jax installed, on the nodes and here
#                         (default: this checkout's .venv/bin/python, else python3)
#   --script PATH         where to write the sbatch script (default: a temporary file)
#   --dry-run, --print    print the sbatch script and the sbatch command, submit nothing
#   -h, --help            this help
#
# Examples:
#   launch/slurm.sh --nodes 2 --gpus-per-node 4 --partition gpu --time 24:00:00 --dry-run -- \
#     --sweep-dir /shared/sweeps/c10 --datasets cifar10 --seeds 0,1,2
#   launch/slurm.sh --nodes 1 --gpus-per-node 8 -- --sweep-dir /shared/sweeps/all \
#     --datasets cifar10,caltech101,flowers102 --main-flag=--config.dataset.data_dir=/shared/tfds
#   .venv/bin/python -m featdiv_jax.sweep status --sweep-dir /shared/sweeps/c10    # progress
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# shellcheck source=_common.sh
source "$root/launch/_common.sh"
positive() { [[ $2 =~ ^[0-9]+$ ]] && [ "$2" -ge "$3" ] || die "$1 must be an integer >= $3, got '$2'"; }

nodes=1 gpus=1 cpus="" partition="" time_limit="" account="" job_name="featdiv-sweep"
python="" script="" dry_run=0 extra_sbatch=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --nodes|--gpus-per-node|--cpus-per-task|--partition|--time|--account|--job-name|--sbatch-option|--python|--script)
      [ "$#" -ge 2 ] || die "$1 needs a value"
      case "$1" in
        --nodes) nodes=$2 ;; --gpus-per-node) gpus=$2 ;; --cpus-per-task) cpus=$2 ;;
        --partition) partition=$2 ;; --time) time_limit=$2 ;; --account) account=$2 ;;
        --job-name) job_name=$2 ;; --sbatch-option) extra_sbatch+=("$2") ;;
        --python) python=$2 ;; --script) script=$2 ;;
      esac
      shift 2 ;;
    --sbatch-option=*) extra_sbatch+=("${1#--sbatch-option=}"); shift ;;
    --dry-run|--print) dry_run=1; shift ;;
    --) shift; break ;;
    *) die "unknown option '$1' (sweep arguments go after --)" ;;
  esac
done
[ "$#" -gt 0 ] || die "no sweep arguments after -- (at least --sweep-dir DIR)"
positive --nodes "$nodes" 1
positive --gpus-per-node "$gpus" 0
if [ -n "$cpus" ]; then positive --cpus-per-task "$cpus" 1; fi
if [ -z "$python" ]; then
  python=$root/.venv/bin/python
  [ -x "$python" ] || python=$(command -v python3 || echo python3)
fi
if [ "$dry_run" = 0 ] && ! command -v sbatch > /dev/null; then
  die "sbatch not found: run this on a SLURM login node, or use --dry-run to print the job script"
fi

sweep_args=("$@" "--main-flag=--config.distributed=auto")
srun_prefix="srun --nodes=$nodes --ntasks-per-node=1 --kill-on-bad-exit=1"
# The sweep's runs as commands (absolute workdirs), each on all nodes; also checks the arguments.
runs=$(cd "$root" && "$python" -m featdiv_jax.sweep commands --absolute --python "$python" \
  --prefix "$srun_prefix" "${sweep_args[@]}") || exit 2

job() {
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=$job_name"
  echo "#SBATCH --nodes=$nodes"
  echo "#SBATCH --ntasks-per-node=1"
  if [ "$gpus" -gt 0 ]; then echo "#SBATCH --gpus-per-node=$gpus"; fi
  if [ -n "$cpus" ]; then echo "#SBATCH --cpus-per-task=$cpus"; fi
  if [ -n "$partition" ]; then echo "#SBATCH --partition=$partition"; fi
  if [ -n "$time_limit" ]; then echo "#SBATCH --time=$time_limit"; fi
  if [ -n "$account" ]; then echo "#SBATCH --account=$account"; fi
  local opt
  for opt in "${extra_sbatch[@]}"; do echo "#SBATCH $opt"; done
  echo "#SBATCH --output=slurm-%x-%j.out"
  echo "# featdiv_jax sweep written by launch/slurm.sh: $(show "${sweep_args[@]}")"
  echo "# Each run trains on all $nodes node(s), one process per node (jax.distributed); runs one after another."
  echo "set -euo pipefail"
  echo "cd $(quote "$root")"
  echo "export PYTHONUNBUFFERED=1"
  echo "finished() {  # results.json of workdir \$1 says finished"
  echo "  $(quote "$python") -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get(\"finished\") is True else 1)' \"\$1/results.json\" 2> /dev/null"
  echo "}"
  echo "start=\$SECONDS"
  local line workdir
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    if [[ $line =~ --workdir=([^\ \']+) ]]; then
      workdir=${BASH_REMATCH[1]}
      echo "if finished $(quote "$workdir"); then echo \"sweep: skip $workdir: finished\"; else"
      echo "  echo \"sweep: start $workdir\""
      echo "  $line"
      echo "fi"
    else
      echo "$line"
    fi
  done <<< "$runs"
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
