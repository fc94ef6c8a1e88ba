"""What keeps a run's work safe: a workdir lock, the preemption notice, and fault points.

No TensorFlow here. `fault_point` is how tests kill a real run at an exact moment (mid-save,
mid-eval); it does nothing unless FEATDIV_FAULT names that moment.
"""

import errno
import fcntl
import os
import signal
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


class WorkdirBusyError(ValueError):
  """Another live process holds the workdir."""


class WorkdirLock:
  """An exclusive `flock` on WORKDIR/.lock for the life of a run (process 0 only).

  The kernel drops the lock when its holder dies, even by kill -9, so a crashed run never
  leaves a stale lock behind; a second live run on the same workdir is refused.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, ".lock")
    self._fd: Optional[int] = None

  def __enter__(self):
    if jax.process_index() != 0:
      return self
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise WorkdirBusyError(
          f"workdir {os.path.dirname(self.path)} is in use by another run (pid {holder}); wait "
          "for it to finish or stop it, or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      os.close(self._fd)  # releases the flock
      self._fd = None


class PreemptionWatch:
  """Turns SIGTERM (a cloud VM's or a scheduler's preemption notice) into a stop the loop polls.

  Two ways, decided when the watch is entered:
  - jax.distributed running with its preemption service (JAX's default; any number of
    processes): `jax.distributed.initialize` installed a C++ SIGTERM notifier that tells every
    process through the coordination service, and `should_stop` is JAX's preemption sync point,
    True at the same step on every host, so all save that step together. No Python handler is
    installed: it would replace JAX's notifier, and the sync point would then never fire.
  - one process without jax.distributed: a Python SIGTERM handler sets a flag that
    `should_stop` returns.
  With several processes but the preemption service turned off (jax_enable_preemption_service),
  nothing is watched (a warning says so): a host stopping alone would hang the others.

  `should_stop(step)` must be called at every training step, on every process (the sync point
  is the step after the furthest one any host had reached when the notice arrived); `start(step)`
  once before the first step of a run tells JAX where the run starts, so that a notice arriving
  while a resumed run restores or compiles stops it at its first step.
  """

  def __init__(self):
    self.requested = False
    self.mode = None  # "sync", "local" or "off", set by __enter__
    self._previous = None

  def __enter__(self):
    self.mode = _preemption_mode()
    if self.mode == "local":
      try:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        self._previous = None
    elif self.mode == "off":
      logging.warning("jax.distributed runs without its preemption service "
                      "(jax_enable_preemption_service=False): a SIGTERM will not save a "
                      "checkpoint")
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def start(self, step: int) -> None:
    """Records the step a run starts from (call once, before its first training step)."""
    if self._mode() == "sync" and multihost_utils.reached_preemption_sync_point(step):
      self.requested = True  # the sync point is this very step (every host sees the same)

  def should_stop(self, step: int) -> bool:
    mode = self._mode()
    if mode == "sync":
      return bool(multihost_utils.reached_preemption_sync_point(step)) or self.requested
    return mode == "local" and self.requested

  def _mode(self) -> str:
    if self.mode is None:  # used without `with`: decide now, install nothing
      self.mode = _preemption_mode()
    return self.mode

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _preemption_mode() -> str:
  """'sync' when jax.distributed runs with its preemption service, else 'local' for one
  process, 'off' for several."""
  if jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service:
    return "sync"
  return "local" if jax.process_count() == 1 else "off"


def fault_point(name: str, step: int) -> None:
  """Signals this process when FEATDIV_FAULT is `name:step[:SIGNAL]` (fault-injection tests).

  Points: `step` (after a train step is dispatched), `save` (a checkpoint save is in flight),
  `eval` (after the first eval batch). SIGNAL defaults to KILL; TERM is a preemption notice.
  """
  parts = os.environ.get("FEATDIV_FAULT", "").split(":")
  if parts[:2] == [name, str(step)]:
    os.kill(os.getpid(), getattr(signal, f"SIG{parts[2] if len(parts) > 2 else 'KILL'}"))


def first_nonfinite(values: dict) -> Optional[tuple]:
  """(index, name, value) of the first non-finite entry of {name: 1-D array}, or None."""
  found = None
  for name, array in values.items():
    bad = np.flatnonzero(~np.isfinite(np.asarray(array, np.float64)))
    if bad.size and (found is None or bad[0] < found[0]):
      found = (int(bad[0]), name, float(np.asarray(array)[bad[0]]))
  return found
