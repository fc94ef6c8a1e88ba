#!/usr/bin/env bash
# Helpers shared by launch/gpu_vm.sh, tpu_vm.sh and slurm.sh: sourced by them, not run.
# The sourcing script's variables `dry_run` (1: print commands) and `steps` (comma list).
launch_script=$0
usage() { sed -n '2,/^set -euo/p' "$launch_script" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() {
  echo "$(basename "$launch_script"): error: $*" >&2
  echo "Run launch/$(basename "$launch_script") --help for usage." >&2
  exit 2
}
# Shell-quote one word only when it needs it, so printed commands stay readable.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
show() { local out="" a; for a in "$@"; do out+="$(quote "$a") "; done; printf '%s\n' "${out% }"; }
step() { if [ "${dry_run:-0}" = 1 ]; then show "$@"; else echo "+ $(show "$@")" >&2; "$@"; fi; }
wants() { [[ ",${steps:-}," == *",$1,"* ]]; }
# Dies unless $2 (the value of option $1) is an integer >= $3.
at_least() { [[ $2 =~ ^[0-9]+$ ]] && [ "$2" -ge "$3" ] || die "$1 must be an integer >= $3, got '$2'"; }
# The value of --sweep-dir in the sweep arguments "$@" (empty when there is none).
sweep_dir_of() {
  local previous="" arg
  for arg in "$@"; do
    if [ "$previous" = --sweep-dir ]; then printf '%s' "$arg"; return; fi
    case "$arg" in --sweep-dir=*) printf '%s' "${arg#--sweep-dir=}"; return ;; esac
    previous=$arg
  done
}
# JAX's persistent compilation cache of a sweep: --compile-cache's value ($1; 'none': no cache)
# or SWEEP_DIR/.jax_cache, shared by every run, seed and restart of the sweep.
compile_cache_of() {
  if [ "$1" = none ]; then return; fi
  if [ -n "$1" ]; then printf '%s' "$1"; return; fi
  local dir
  dir=$(sweep_dir_of "${@:2}")
  if [ -n "$dir" ]; then printf '%s' "${dir%/}/.jax_cache"; fi
}
