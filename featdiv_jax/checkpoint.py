"""Orbax checkpoints of the train state plus a JSON `meta` item (history, timings, config).

The meta saved with step N is the loop's bookkeeping as of step N, so a resumed run continues
its eval history from exactly the checkpoint it restarts from.
"""

import contextlib
import dataclasses
import gc
import inspect
import os
import shutil
import sys
from typing import Any, Optional

from etils import epath
import jax
import orbax.checkpoint as ocp
from absl import logging

from featdiv_jax import files, guards


BEST_METRIC = "eval_accuracy"


class Checkpoints:
  """A CheckpointManager over `directory` with items `state` (arrays) and `meta` (JSON).

  It keeps the `keep` most recent steps; with `keep_best` also the newest step saved with a
  `best` metric (the loop saves one at each new best eval accuracy), which orbax's garbage
  collection then never removes while it stays the best.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               create: bool = True, keep_best: bool = False):
    self.directory = os.path.abspath(directory)
    options = dict(create=create, enable_async_checkpointing=async_save)
    if keep_best:
      policies = ocp.checkpoint_managers
      options["preservation_policy"] = policies.AnyPreservationPolicy([
          policies.LatestN(n=keep),
          policies.BestN(get_metric_fn=lambda m: m[BEST_METRIC], n=1,
                         keep_checkpoints_without_metrics=False)])
    else:
      options["max_to_keep"] = keep
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(**options),
        item_names=("state", "meta"))
    _log_orphaned_io()
    self.in_flight = None  # the step of the asynchronous save under way
    self.failed = None  # the step a full disk stopped (later errors of it were reported already)
    self._space_warned = False

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, best: Optional[float] = None) -> None:
    """Starts an asynchronous save; orbax writes into a temporary directory and renames it
    when complete, so a kill mid-save leaves no step that `latest_step` would pick up.
    `best`: the eval accuracy that makes this step the best so far (kept with `keep_best`).

    A full disk -- now, or in the background save before this one -- raises
    guards.DiskFullError naming the step that could not be saved and the last complete one;
    too little free space for another checkpoint gets a warning first (once)."""
    self.wait()  # orbax would wait here too: the previous save's failure belongs to its step
    self._warn_if_short_of_space(state)
    guards.disk_fault("save", step, self.directory)
    with self._saving(step):
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_as_saved(state)), meta=ocp.args.JsonSave(meta)),
          force=True, metrics=None if best is None else {BEST_METRIC: best})
    self.in_flight = step
    guards.fault_point("save", step)

  def finished_steps(self) -> list[int]:
    """The steps whose save completed, from the directory itself (orbax renames a step's
    temporary directory to the bare step number when, and only when, the step is complete)."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(name) for name in os.listdir(self.directory) if name.isdigit())

  def _warn_if_short_of_space(self, state: Any) -> None:
    """A warning (once) when the free space under the directory is less than twice the size of
    the state's arrays: the next saves may fail (statvfs; costs microseconds)."""
    if self._space_warned or jax.process_index() != 0:
      return
    need = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))
    free = shutil.disk_usage(self.directory).free
    if free < 2 * need:
      self._space_warned = True
      logging.warning("Only %.0f MB free in %s and a checkpoint takes about %.0f MB: free space "
                      "before the disk fills up and a save fails.", free / 2**20, self.directory,
                      need / 2**20)

  @contextlib.contextmanager
  def _saving(self, step: Optional[int]):
    """Turns a full disk's error inside into one guards.DiskFullError for `step`; what orbax
    reports again of the same failure afterwards (at wait, at close) is only logged."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if guards.disk_full(e) is None:
        raise
      if self.failed is not None:
        logging.warning("Again out of space in %s: %s", self.directory, e)
        return
      self.failed = step
      raise guards.DiskFullError(
          f"no space left on device in {self.directory}: the checkpoint of step {step} could "
          f"not be saved (its unfinished files are never resumed from); {self.after_disk_full()}"
      ) from e

  def after_disk_full(self) -> str:
    """What is safe and what to do, for a full-disk message."""
    finished = self.finished_steps()
    if not finished:
      return ("there is no complete checkpoint yet; free space and re-run the same command to "
              "start again")
    return (f"the last complete checkpoint is step {finished[-1]} in {self.directory}; free "
            "space and re-run the same command to resume from it")

  def restore_latest(self, abstract_state: Any) -> Optional[tuple]:
    """(step, state, meta) of the newest step that restores, or None if there is none.

    A step that fails to restore (a truncated or deleted file inside it) is renamed to
    `<step>.damaged` -- kept for inspection, never deleted, never trained over -- with a warning
    that names it, and the next older step is tried.
    """
    for step in reversed(self.all_steps()):
      try:
        state, meta = self.restore(step, abstract_state)
        if int(jax.device_get(state.step)) != step:
          raise ValueError(f"it holds train state of step {int(jax.device_get(state.step))}")
        return step, state, meta
      except Exception as e:  # pylint: disable=broad-except  # any unreadable step is damaged
        damaged = os.path.join(self.directory, f"{step}.damaged")
        logging.warning("Checkpoint step %d in %s is damaged (%s: %s); moving it to %s and "
                        "falling back to an older step.", step, self.directory,
                        type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "", damaged)
        if jax.process_index() == 0:
          os.replace(os.path.join(self.directory, str(step)), files.unused_path(damaged))
        self.manager.reload()
      # The failed restore leaves orbax's other array reads of the step as coroutines in the
      # error's reference cycles; collected here, on this thread, they end now (their errors
      # go to the log, `_log_orphaned_io`), not whenever and wherever a later collection runs.
      gc.collect()
    return None

  def restore_as_saved(self, step: int) -> tuple[Any, dict]:
    """(state as nested dicts of arrays with their saved shapes, meta) of `step`, on this
    process's first device whatever devices it was saved from: for reading a run whose model
    this process does not build (initialising heads from it, exporting it). Orbax refuses to
    restore onto other devices without a target, so the target is built from its metadata."""
    saved = ocp.StandardCheckpointHandler().metadata(
        epath.Path(self.directory) / str(step) / "state")
    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return self.restore(step, jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores into `abstract_state` (ShapeDtypeStructs carrying the wanted shardings)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_as_saved(abstract_state)), meta=ocp.args.JsonRestore()))
    state = restored.state
    if dataclasses.is_dataclass(abstract_state):
      state = abstract_state.replace(**state)
    return state, dict(restored.meta)

  def wait(self) -> None:
    """Waits for the save under way; guards.DiskFullError if the disk filled up during it."""
    with self._saving(self.in_flight):
      self.manager.wait_until_finished()
    self.in_flight = None

  def close(self) -> None:
    with self._saving(self.in_flight):
      self.manager.close()


def _log_orphaned_io() -> None:
  """Once per process: the errors of orbax's array reads and writes that end after their
  restore or save already failed go to the log, not as dozens of tracebacks on stderr -- the
  'Event loop is closed' of writes that finish after a full disk stopped their save (tensorstore's
  callbacks still arrive), and the reads of a damaged step that the failed restore abandoned
  (coroutines of orbax, collected later). Any other unraisable error reaches the previous hook."""
  previous = sys.unraisablehook
  if getattr(previous, "featdiv_jax", False):
    return

  def hook(unraisable):
    if (isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == "Event loop is closed"):
      logging.info("A checkpoint write finished after its save had failed: %s",
                   unraisable.exc_value)
      return
    if _is_orbax_coroutine(unraisable.object):
      logging.info("An array read of a checkpoint ended after its restore had failed: %s: %s",
                   type(unraisable.exc_value).__name__,
                   str(unraisable.exc_value).splitlines()[0][:300])
      return
    previous(unraisable)
  hook.featdiv_jax = True
  sys.unraisablehook = hook


def _is_orbax_coroutine(obj) -> bool:
  """A coroutine object of orbax's code (what an abandoned array read or write is)."""
  return inspect.iscoroutine(obj) and f"{os.sep}orbax{os.sep}" in obj.cr_code.co_filename


def _as_saved(state: Any) -> Any:
  """A train state as it is stored: a dict of its fields without those that are None, so a
  state without the optional EMA has the structure of the checkpoints written before it."""
  if not dataclasses.is_dataclass(state):
    return state
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if getattr(state, f.name) is not None}


def abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)
