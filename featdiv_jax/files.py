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
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, default=_default)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)
