"""What a workdir holds besides checkpoints: its model signature (config.json) and results.json.

A workdir belongs to one model: `check` refuses, before anything is written, a config whose
model differs from the one recorded there. (The lock on a live run is `guards.WorkdirLock`.)
"""

import json
import os

from featdiv_jax import configlib
from featdiv_jax.files import unused_path, write_json_atomic

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"


class WorkdirError(ValueError):
  """The workdir holds a run this config cannot continue."""


def _signature(config) -> dict:
  return json.loads(json.dumps(configlib.model_signature(config)))  # tuples -> lists, as saved


def check(workdir: str, config) -> None:
  """Refuses a workdir whose saved config describes a different model; writes nothing."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  ours = _signature(config)
  try:
    with open(path) as f:
      saved = json.load(f)["signature"]
    if not isinstance(saved, dict):
      raise TypeError(f"its signature is a {type(saved).__name__}")
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise WorkdirError(
        f"{path} is damaged ({type(e).__name__}: {str(e)[:120]}); it records which model this "
        "workdir trains: restore it, or move it aside and re-run the same command with the "
        "run's own config to write it again") from None
  # A field newer than the workdir's run had its default value there.
  defaults = _signature(configlib.default_config())["model"]
  saved_model = {**defaults, **saved.get("model", {})}
  our_model = ours["model"]
  diffs = [f"model.{k}: workdir has {saved_model.get(k)!r}, config has {our_model.get(k)!r}"
           for k in sorted(set(saved_model) | set(our_model))
           if saved_model.get(k) != our_model.get(k)]
  others = {**_signature(configlib.default_config()), **saved}
  diffs += [f"{k}: workdir has {others.get(k)!r}, config has {ours[k]!r}"
            for k in ours if k != "model" and others.get(k) != ours[k]]
  if diffs:
    raise WorkdirError(f"workdir {workdir} holds a run of a different model ("
                       + "; ".join(diffs) + "); use a new --workdir or the matching config")


def record_config(workdir: str, config) -> None:
  """Writes WORKDIR/config.json once: the signature later runs are checked against."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    write_json_atomic(path, {"signature": _signature(config), "config": config.to_dict()})


def write_results(workdir: str, results: dict) -> None:
  write_json_atomic(os.path.join(workdir, RESULTS_FILE), results)


def set_aside_damaged_results(workdir: str) -> str | None:
  """Moves an unreadable WORKDIR/results.json to results.json.damaged (.2, .3, ... never over
  another) and returns where; None when it reads (or is absent). The caller rebuilds it from
  the checkpoint's own record."""
  path = os.path.join(workdir, RESULTS_FILE)
  try:
    with open(path) as f:
      if isinstance(json.load(f), dict):
        return None
  except FileNotFoundError:
    return None
  except (ValueError, UnicodeDecodeError):
    pass
  aside = unused_path(f"{path}.damaged")
  os.replace(path, aside)
  return aside
