"""A featdiv run read back from its workdir: its config, its checkpoint steps and their arrays.

Used to initialise heads from an earlier run (`model.init_from=WORKDIR[@best|@STEP]`), to
evaluate a run and to export a head to timm. No TensorFlow here.
"""

import dataclasses
import os
from typing import Any, Optional

import jax
import ml_collections

from featdiv_jax import checkpoint
from featdiv_jax import workdir as workdir_lib
from featdiv_jax.files import read_json

STEP_WORDS = ("latest", "best")


class RunError(ValueError):
  """A workdir that holds no usable run, or no checkpoint of the asked-for step."""


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """One checkpoint of a run: its step and its train state as saved (nested dicts of arrays)."""
  workdir: str
  step: int
  config: ml_collections.ConfigDict
  state: Any   # {"step", "params", "batch_stats", "opt_state"}
  meta: dict   # progress.Progress.to_json() as of `step`

  @property
  def num_heads(self) -> int:
    return self.config.model.num_heads


def split_spec(spec: str) -> Optional[tuple[str, str]]:
  """(workdir, which) of a `model.init_from` that names a run -- 'DIR', 'DIR@best', 'DIR@12' --
  or None when `spec` names no directory (a weights file)."""
  if os.path.isdir(spec):
    return spec, "latest"
  path, sep, which = spec.rpartition("@")
  return (path, which) if sep and os.path.isdir(path) else None


def checkpoint_steps(workdir: str) -> list:
  """The run's complete checkpoint steps, oldest first."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  ckpts = checkpoint.Checkpoints(directory, create=False)
  try:
    return ckpts.all_steps()
  finally:
    ckpts.close()


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run recorded in WORKDIR/config.json."""
  path = os.path.join(workdir, workdir_lib.CONFIG_FILE)
  if not os.path.isfile(path):
    raise RunError(f"{workdir} holds no featdiv run (no {workdir_lib.CONFIG_FILE})")
  try:
    return ml_collections.ConfigDict(read_json(path)["config"])
  except (ValueError, KeyError, TypeError) as e:
    raise RunError(f"{path} could not be read ({type(e).__name__}: {e})") from None


def best_step(workdir: str) -> Optional[int]:
  """The eval step with the best accuracy in results.json (the first of equals), or None."""
  path = os.path.join(workdir, workdir_lib.RESULTS_FILE)
  if not os.path.isfile(path):
    return None
  try:
    results = read_json(path)
    if not isinstance(results, dict):
      raise TypeError(f"it holds a {type(results).__name__}")
  except (ValueError, TypeError, UnicodeDecodeError) as e:
    raise RunError(f"{path} is damaged ({type(e).__name__}: {str(e)[:120]}), so the best step is "
                   "unknown: re-run the run's training command on this workdir to rebuild it "
                   "from its checkpoints, or name a step (latest or a number)") from None
  if results.get("best_step") is not None:
    return int(results["best_step"])
  history = results.get("history") or []
  if not history:
    return None
  return max(history, key=lambda h: (h["eval_accuracy"], -h["step"]))["step"]


def resolve_step(workdir: str, which: str, available: list) -> int:
  """`latest`, `best` or a step number -> a step that has a checkpoint, or a RunError."""
  if not available:
    raise RunError(f"{workdir} has no checkpoint")
  if which == "latest":
    return available[-1]
  if which == "best":
    step = best_step(workdir)
    if step is None:
      raise RunError(f"{workdir} has no evaluation yet, so no best step")
  else:
    try:
      step = int(which)
    except ValueError:
      raise RunError(f"step {which!r} is not one of {', '.join(STEP_WORDS)} or a step "
                     "number") from None
  if step not in available:
    raise RunError(f"{workdir} has no checkpoint of step {step} ({which}); checkpoints: "
                   f"{', '.join(map(str, available))} (keep_best=True keeps the best one)")
  return step


def load(workdir: str, which: str = "latest") -> SavedRun:
  """The run in `workdir` at checkpoint `which` (latest, best or a step number)."""
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir):
    raise RunError(f"{workdir} does not exist")
  config = read_config(workdir)
  step = resolve_step(workdir, which, checkpoint_steps(workdir))
  ckpts = checkpoint.Checkpoints(os.path.join(workdir, "checkpoints"), create=False)
  try:
    state, meta = ckpts.restore_as_saved(step)
  except Exception as e:  # pylint: disable=broad-except  # any unreadable step means the same
    first = str(e).splitlines()[0][:300] if str(e) else ""
    raise RunError(f"checkpoint step {step} in {workdir} could not be restored "
                   f"({type(e).__name__}: {first})") from None
  finally:
    ckpts.close()
  return SavedRun(workdir=workdir, step=step, config=config, state=state, meta=meta)


def head_variables(run: SavedRun, head: int) -> dict:
  """Head `head`'s backbone {"params", "batch_stats"}, as `models.place_head` takes them."""
  if not 0 <= head < run.num_heads:
    raise RunError(f"head {head} is out of range: the run in {run.workdir} has "
                   f"{run.num_heads} head(s) (0..{run.num_heads - 1})")
  return {col: jax.device_get(_index(run.state[col]["heads"], head))
          for col in ("params", "batch_stats")}


def _index(tree, k):
  if isinstance(tree, dict):
    return {name: _index(value, k) for name, value in tree.items()}
  return tree[k]
