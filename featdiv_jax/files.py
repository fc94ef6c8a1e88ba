"""Small JSON files that must never be left half-written (results.json, config.json, sweep.json).

No jax, no TensorFlow: the sweep and the report use it on any machine.
"""

import json
import os
from typing import Any


def _default(o):
  return o.tolist() if hasattr(o, "tolist") else str(o)


def write_json_atomic(path: str, payload: Any) -> None:
  """Write-then-rename with an fsync, so a kill or a crash never leaves a truncated file."""
  tmp = f"{path}.tmp.{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(payload, f, indent=2, default=_default)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:  # a full disk, a signal: no half-written file left behind
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def unused_path(path: str) -> str:
  """`path`, or `path.2`, `path.3`... if it exists: what is set aside is never overwritten."""
  candidate, n = path, 1
  while os.path.exists(candidate):
    n += 1
    candidate = f"{path}.{n}"
  return candidate
