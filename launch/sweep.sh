#!/usr/bin/env bash
# Run a featdiv_jax sweep here, one run after another: data set x variant x arch x seed, one
# workdir per run in SWEEP_DIR/<dataset>/<arch>/<variant>/seed<N> (a protocol other than
# scratch adds a level: SWEEP_DIR/<dataset>/pretrained_head/...). Finished runs are skipped and
# interrupted ones resume from their checkpoints, so re-running the same command continues the
# sweep. Ctrl-C asks the current run to save a checkpoint and stops. Works on a fresh machine
# with only python3 (the project's .venv is created on first use, see launch/in_venv.sh).
#
# Usage: launch/sweep.sh [--status] SWEEP_DIR [SWEEP ARGS...]
#
# SWEEP ARGS (of `python -m featdiv_jax.sweep run`):
#   --datasets LIST     digits, cifar10, caltech101, flowers102 (default: digits)
#   --variants LIST     single, multi, multi_cos (default: all three)
#   --archs LIST        seresnet18, seresnet34, seresnet50, ... (default: seresnet18)
#   --seeds LIST        e.g. 0,1,2 or 0-4 (default: 0)
#   --kinds LIST        penalty kinds, one multi_cos run each, e.g. cos,cka (default: the config's)
#   --weights LIST      penalty weights >= 0, e.g. 0,0.1,1,10: one multi_cos run per weight > 0
#                       (and kind) in .../<arch>/multi_cos-<kind>-w<weight>/seed<N>; 0 is the
#                       multi run, planned even when --variants lacks multi (default: the config's)
#   --extra K=V,...     config arguments for every run, e.g. epochs=2 or smoke
#   --main-flag=FLAG    a featdiv_jax.main flag for every run, e.g. --main-flag=--config.batch_size=128
#   --keep-going        continue after a failed run (default: stop with its exit code)
# --status prints finished / in progress / not started for every run in SWEEP_DIR/sweep.json.
# The runs share JAX's persistent compilation cache, SWEEP_DIR/.jax_cache (set
# JAX_COMPILATION_CACHE_DIR to use another), so restarts and further seeds reuse compiled steps.
#
# Examples:
#   launch/sweep.sh runs/sweep --datasets digits --seeds 0,1,2
#   launch/sweep.sh runs/sweep --datasets digits,cifar10 --archs seresnet18,seresnet34 --extra epochs=2
#   launch/sweep.sh runs/dose --datasets digits --kinds cos,cka --weights 0,0.1,1,10 --seeds 0,1,2
#   launch/sweep.sh --status runs/sweep
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "sweep.sh: error: $*" >&2; echo "Run launch/sweep.sh --help for usage." >&2; exit 2; }

action=run
while [ "$#" -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --status) action=status; shift ;;
    -*) die "unknown option '$1' before SWEEP_DIR" ;;
    *) break ;;
  esac
done
[ "$#" -gt 0 ] || die "SWEEP_DIR is required"
sweep_dir=$1
shift
# in_venv.sh runs from the repository root: a relative SWEEP_DIR is taken from here.
case "$sweep_dir" in /*) ;; *) sweep_dir=$PWD/$sweep_dir ;; esac
if [ "$action" = run ]; then
  export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-${sweep_dir%/}/.jax_cache}"
fi
exec "$root/launch/in_venv.sh" python -m featdiv_jax.sweep "$action" --sweep-dir "$sweep_dir" "$@"
