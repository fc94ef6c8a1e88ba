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
