"""What keeps a run's work safe: a workdir lock, the preemption notice, and fault points.

No TensorFlow here. `fault_point` is how tests kill a real run at an exact moment (mid-save,
mid-eval); it does nothing unless FEATDIV_FAULT names that moment.
"""

import errno
import fcntl
import os
import re
import signal
import socket
import sys
import threading
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
    workdir = os.path.dirname(self.path)
    os.makedirs(workdir, exist_ok=True)
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:  # a directory in its place, another user's file, a read-only mount
      raise WorkdirBusyError(
          f"{self.path} cannot be used as this workdir's lock ({e.strerror}); if no run is "
          "using the workdir, remove it and re-run the same command") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = " ".join(os.pread(fd, 256, 0).decode(errors="replace").split()[:3]) or "unknown"
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise WorkdirBusyError(
          f"workdir {workdir} is in use by another run (pid {holder}); wait for it to finish "
          f"or stop it, or use another --workdir (a lock whose run is gone -- its host died -- "
          f"lapses by itself; {self.path} may then be removed)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is not None:
      os.close(self._fd)  # releases the flock
      self._fd = None


class PreemptionWatch:
  """Turns SIGTERM (a cloud VM's or a scheduler's preemption notice) and SIGINT (Ctrl-C) into a
  stop the loop polls: the current step finishes, is saved, and the run ends (`signal_name` says
  which arrived).

  SIGINT: a Python handler in both modes below, so a Ctrl-C never raises KeyboardInterrupt
  inside XLA (a compile interrupted that way can crash the process); the request is honoured at
  the next step, after a compile or an evaluation in progress. With jax.distributed the handler
  passes it on as a SIGTERM to this process, so that JAX's notifier makes every host stop at the
  same step. A second SIGINT stops at once (`os._exit(130)`, with one line): an unfinished save
  is never a checkpoint, so the last complete one stays the last good one.

  Two ways, decided when the watch is entered:
  - jax.distributed running with its preemption service (JAX's default; any number of
    processes): `jax.distributed.initialize` installed a C++ SIGTERM notifier that tells every
    process through the coordination service, and `should_stop` is JAX's preemption sync point,
    True at the same step on every host, so all save that step together. No Python SIGTERM
    handler is installed: it would replace JAX's notifier, and the sync point would then never
    fire (the SIGINT handler only passes a Ctrl-C on to it).
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
    self.signal_name = "SIGTERM"  # what asked for the stop; SIGINT once a Ctrl-C did
    self.mode = None  # "sync", "local" or "off", set by __enter__
    self._previous = {}

  def __enter__(self):
    self.mode = _preemption_mode()
    handlers = {signal.SIGINT: self._interrupt}
    if self.mode == "local":
      handlers[signal.SIGTERM] = self._handle
    elif self.mode == "off":
      logging.warning("jax.distributed runs without its preemption service "
                      "(jax_enable_preemption_service=False): a SIGTERM will not save a "
                      "checkpoint")
    if threading.current_thread() is threading.main_thread():  # else leave signals alone
      self._previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def _interrupt(self, signum, frame):
    del signum, frame
    if self.signal_name == "SIGINT":  # the second Ctrl-C
      print("featdiv_jax: interrupted again: stopped at once; the last complete checkpoint is "
            "the one a re-run resumes from", file=sys.stderr, flush=True)
      os._exit(130)  # pylint: disable=protected-access
    self.signal_name = "SIGINT"
    if self.mode == "sync":
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier: every host stops at one step
    else:
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
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}


def _preemption_mode() -> str:
  """'sync' when jax.distributed runs with its preemption service, else 'local' for one
  process, 'off' for several."""
  if jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service:
    return "sync"
  return "local" if jax.process_count() == 1 else "off"


def _faults(name: str, step: int):
  """The FEATDIV_FAULT entries `name:step[:WHAT[:DELAY]]` for this point: their [WHAT, DELAY]."""
  for fault in os.environ.get("FEATDIV_FAULT", "").split(","):
    parts = fault.split(":")
    if parts[:2] == [name, str(step)]:
      yield parts[2:]


def fault_point(name: str, step: int, path: Optional[str] = None) -> None:
  """Signals this process when FEATDIV_FAULT holds `name:step[:SIGNAL[:DELAY]]` (fault-injection
  tests; several comma-separated), after DELAY seconds (from another thread) if given; with
  `ENOSPC` in place of SIGNAL, raises a full disk's OSError for `path` instead.

  Points: `step` (after a train step is dispatched), `save` (a checkpoint save is in flight),
  `eval` (after the first eval batch), `compile` (the first step of a run, about to compile;
  `step` is the step it starts from), `results` (results.json is about to be written).
  SIGNAL defaults to KILL; TERM is a preemption notice, INT a Ctrl-C; `OOM` in its place raises
  the device's out-of-memory error.
  """
  for what in _faults(name, step):
    if what[:1] == ["ENOSPC"]:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    if what[:1] == ["OOM"]:  # the error a GPU's allocator gives for a batch that does not fit
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                                       "allocate 25769803776 bytes.")
    sig = getattr(signal, f"SIG{what[0] if what else 'KILL'}")
    if len(what) > 1:
      threading.Timer(float(what[1]), os.kill, (os.getpid(), sig)).start()
    else:
      os.kill(os.getpid(), sig)


def disk_fault(name: str, step: int, directory: str) -> None:
  """FEATDIV_FAULT `name:step:ENOSPC` (with name `save`: the checkpoint save of `step`, before
  it starts): from now on every file orbax writes below `directory` -- from its writer threads,
  as on a disk that has just filled up -- fails with ENOSPC. Test-only, like `fault_point`."""
  if not any(what[:1] == ["ENOSPC"] for what in _faults(name, step)):
    return
  from etils import epath  # pylint: disable=g-import-not-at-top
  path_type = type(epath.Path(directory))
  write_text, prefix = path_type.write_text, os.path.join(directory, "")

  def full(self, *args, **kwargs):
    if str(self).startswith(prefix):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return write_text(self, *args, **kwargs)
  path_type.write_text = full


class DiskFullError(Exception):
  """The disk of the workdir filled up: what could not be saved and what is safe, in one line."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _chain(exc: BaseException):
  """`exc` and every error behind it (causes, contexts, exception groups' members), each once."""
  stack, seen = [exc], set()
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    stack += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def disk_full(exc: BaseException) -> Optional[BaseException]:
  """The out-of-space error in `exc`'s chain -- an OSError with ENOSPC/EDQUOT, or an error whose
  text says so (TensorFlow's and tensorstore's) -- else None."""
  return next((e for e in _chain(exc)
               if isinstance(e, DiskFullError)
               or (isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS)
               or any(text in str(e) for text in ("No space left on device",
                                                  "Disk quota exceeded"))), None)


def disk_full_message(exc: BaseException, workdir: str) -> Optional[str]:
  """One line for a full disk anywhere in `exc`'s chain (the DiskFullError the loop raised if
  there is one: it says the most, and may sit under a later error's context), else None."""
  said = next((e for e in _chain(exc) if isinstance(e, DiskFullError)), None)
  if said is not None:
    return str(said)
  found = disk_full(exc)
  if found is None:
    return None
  where = getattr(found, "filename", None) or workdir
  return (f"no space left on device writing {where}; free space there and re-run the same "
          "command: it resumes from the last complete checkpoint in "
          f"{os.path.join(workdir, 'checkpoints')}")


class OutOfMemoryError(ValueError):
  """The batch (or the model) does not fit in the device's or the host's memory."""


_ASKED = (  # how XLA's allocators (GPU, CPU, TPU) and numpy say how much memory was asked for
    (re.compile(r"allocate (\d+) bytes"), lambda m: f"{int(m[1]) / 2**30:.1f} GiB asked for"),
    (re.compile(r"allocate ([\d.]+\s*[KMGT]i?B)"), lambda m: f"{m[1]} asked for"),
    (re.compile(r"Used ([\d.]+\s*[KMGT]i?B?) of ([\d.]+\s*[KMGT]i?B?) (\w+)"),
     lambda m: f"{m[1]} needed of {m[2]} {m[3]}"))


def out_of_memory(exc: BaseException) -> Optional[str]:
  """For an out-of-memory error anywhere in `exc`'s chain (XLA's RESOURCE_EXHAUSTED on a device,
  a MemoryError on the host): what it says was asked for ("24.0 GiB asked for", or "the amount
  is not reported"); None for any other error."""
  for e in _chain(exc):
    text = str(e)
    if isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in text or re.search(
        r"out of memory", text, re.IGNORECASE):
      where = "host memory" if isinstance(e, MemoryError) else "device memory"
      for pattern, say in _ASKED:
        found = pattern.search(text)
        if found:
          return f"{where}: {say(found)}"
      return f"{where}: the amount is not reported"
  return None


def first_nonfinite(values: dict) -> Optional[tuple]:
  """(index, name, value) of the first non-finite entry of {name: 1-D array}, or None."""
  found = None
  for name, array in values.items():
    bad = np.flatnonzero(~np.isfinite(np.asarray(array, np.float64)))
    if bad.size and (found is None or bad[0] < found[0]):
      found = (int(bad[0]), name, float(np.asarray(array)[bad[0]]))
  return found
