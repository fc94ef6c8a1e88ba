"""What keeps a run's work safe: a workdir lock, the preemption notice, and fault points.

No TensorFlow here. `fault_point` is how tests kill a real run at an exact moment (mid-save,
mid-eval); it does nothing unless FEATDIV_FAULT names that moment.
"""

import errno
import fcntl
import os
import signal
from typing import Optional

import jax
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
  """Turns SIGTERM (a cloud VM's preemption notice) into a flag the loop polls.

  With several processes the decision is taken together at `jax`'s preemption sync point, so
  every host saves the same step; with one it is the local flag.
  """

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.requested

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


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
