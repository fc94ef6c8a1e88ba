#!/usr/bin/env bash
# Run a command inside the project's virtualenv, creating it and installing the project (with
# its test extra) on first use or whenever pyproject.toml changes. Needs only python3.
#   launch/in_venv.sh python -m pytest -q
#   FEATDIV_VENV=/path/to/venv FEATDIV_EXTRAS=test,cuda12 launch/in_venv.sh python -m ...
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${FEATDIV_VENV:-$root/.venv}
extras=${FEATDIV_EXTRAS:-test}
python=${PYTHON:-python3}

if [ "$#" -eq 0 ] || [ "${1:-}" = "--help" ] || [ "${1:-}" = "-h" ]; then
  sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "featdiv_jax: creating virtualenv $venv" >&2
  if ! "$python" -m venv "$venv"; then
    echo "featdiv_jax: '$python -m venv' failed; install the venv module (Debian/Ubuntu: apt-get install python3-venv) or set PYTHON to another interpreter" >&2
    exit 1
  fi
fi
stamp="$venv/.featdiv_jax-installed"
want="$(cat "$root/pyproject.toml" | cksum) extras=$extras"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "featdiv_jax: installing the project into $venv (first run takes a few minutes)" >&2
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -e "${root}[$extras]" >&2
  echo "$want" > "$stamp"
fi
cd "$root"
export PATH="$venv/bin:$PATH"
exec "$@"
