"""What a person sees while `featdiv_jax.main` trains, and where the rest of the detail goes.

On a terminal: per model a progress bar (tqdm: step / total, img/s, loss, ETA; with several
models which one of how many and the ETA of all of them), one line per evaluation, then the
summary table. Not on a terminal (CI, SLURM, `| tee`): no bar, a plain progress line at most
every `plain_every_s` seconds instead, and the same evaluation lines. Only process 0 prints.

Everything logged at INFO -- absl, orbax, TFDS, the parameter overview, the hyper-parameters,
each metric write -- goes to the run's log file (`log_to_file`: WORKDIR/train.log for process 0,
WORKDIR/train.process<i>.log for the others, appended across resumes); warnings and errors still
reach stderr. `--verbose` keeps today's full detail on the terminal (and no bar).
"""

import logging as std_logging
import os
import sys
import time
from typing import Optional, TextIO

from absl import logging
import jax
import tqdm

LOG_FILE = "train.log"


def log_file_name(process_index: int) -> str:
  return LOG_FILE if process_index == 0 else f"train.process{process_index}.log"


def quiet_terminal(verbose: bool) -> None:
  """The terminal shows absl's warnings and errors only (unless `verbose`); INFO records still
  reach the log file, once `log_to_file` has opened it. Called first, before JAX's backends
  start and log."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().setLevel(std_logging.NOTSET if verbose else std_logging.WARNING)


def log_to_file(workdir: str, verbose: bool, process_index: Optional[int] = None) -> None:
  """Sends absl's INFO records (and everything Python logs through the root logger) to this
  process's log file in `workdir` (`log_file_name`; the index is jax.process_index() at
  `open_log` unless given); the terminal keeps warnings and errors only, unless `verbose`. The
  records are held in memory until `open_log`, so that a command refused before it trains
  writes nothing into the workdir, and records from before jax.distributed starts are kept.
  Idempotent: a second call replaces the first's handler."""
  close_log()
  root = std_logging.getLogger()
  handler = _RunLog(workdir, process_index)
  handler.setFormatter(logging.PythonFormatter())
  root.addHandler(handler)
  quiet_terminal(verbose)


def close_log() -> None:
  """Stops the run log of `log_to_file` (what it held unopened is dropped)."""
  root = std_logging.getLogger()
  for handler in [h for h in root.handlers if isinstance(h, _RunLog)]:
    root.removeHandler(handler)
    handler.close()


def open_log() -> Optional[str]:
  """Starts writing the run log (`log_to_file`) into its file, the records held so far first;
  returns its path the first time, None after that or without a run log."""
  for handler in std_logging.getLogger().handlers:
    if isinstance(handler, _RunLog) and handler.open():
      return handler.path
  return None


class _RunLog(std_logging.Handler):
  """The run's log file: records are held until `open()`, then appended to the file."""

  def __init__(self, workdir: str, process_index: Optional[int]):
    super().__init__()
    self.workdir, self.process_index, self.path = workdir, process_index, None
    self._held, self._file = [], None

  def open(self) -> bool:
    """Opens the file (appending) and writes the held records; False if open already."""
    if self._file is not None:
      return False
    index = jax.process_index() if self.process_index is None else self.process_index
    self.path = os.path.join(self.workdir, log_file_name(index))
    os.makedirs(self.workdir, exist_ok=True)
    self._file = std_logging.FileHandler(self.path, mode="a", encoding="utf-8")
    self._file.setFormatter(self.formatter)
    for record in self._held:
      self._file.handle(record)
    self._held = []
    return True

  def emit(self, record):
    if self._file is None:
      self._held.append(record)
    else:
      self._file.handle(record)

  def flush(self):
    if self._file is not None:
      self._file.flush()

  def close(self):
    if self._file is not None:
      self._file.close()
    super().close()


class Console:
  """Progress of one command's models on the terminal; a no-op when not `enabled`."""

  def __init__(self, enabled: bool = True, stream: Optional[TextIO] = None,
               interactive: Optional[bool] = None, plain_every_s: float = 30.0):
    self.enabled = enabled
    self.stream = stream or sys.stderr
    self.interactive = (interactive if interactive is not None
                        else bool(getattr(self.stream, "isatty", lambda: False)()))
    self.plain_every_s = plain_every_s
    self.bar, self.name, self.total, self.step_number = None, "", 0, 0
    self.runs, self.run_index, self._plan = 1, 0, []
    self.steps_left_after = 0  # steps of the runs after this one
    self._started = self._last_plain = 0.0
    self._first_step, self._timing = 0, False
    self.loss = self.images_per_s = None

  def plan(self, steps_per_run: list) -> None:
    """The command trains these runs in order, with these many steps each."""
    self._plan = list(steps_per_run)
    self.runs = len(steps_per_run)

  def start_run(self, name: str, total_steps: int, first_step: int) -> None:
    """Model `name` trains steps first_step + 1 .. total_steps (a resumed run starts later)."""
    self.run_index += 1
    self.steps_left_after = sum(self._plan[self.run_index:])
    self.name, self.total, self.step_number = name, total_steps, first_step
    self._started = self._last_plain = time.monotonic()
    self._first_step, self._timing = first_step, False
    self.loss = self.images_per_s = None
    if not self.enabled:
      return
    if first_step >= total_steps:
      self._print(f"{self._label()}: finished already (step {first_step}/{total_steps})")
      return
    if first_step:
      self._print(f"{self._label()}: resuming from step {first_step} of {total_steps}")
    if self.interactive:
      self.bar = tqdm.tqdm(total=total_steps, initial=first_step, desc=self._label(),
                           unit="step", file=self.stream, dynamic_ncols=True, leave=True,
                           bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                           "[{elapsed}<{remaining}{postfix}]")
    else:
      self._print(f"{self._label()}: steps {first_step + 1}-{total_steps}")

  def step(self, step: int) -> None:
    """Step `step` was dispatched."""
    if not self.enabled:
      return
    done = step - self.step_number
    self.step_number = step
    if not self._timing:  # the pace (and so the ETAs) is measured from the first step on,
      self._timing = True  # not from the start, which includes compiling it
      self._started, self._first_step = time.monotonic(), step
    if self.bar is not None:
      self.bar.update(done)
    elif time.monotonic() - self._last_plain >= self.plain_every_s and step < self.total:
      self._last_plain = time.monotonic()
      self._print(self._plain_line())

  def train_metrics(self, loss: float, images_per_s: Optional[float]) -> None:
    """The latest logged train loss and images/s (shown on the bar)."""
    self.loss, self.images_per_s = loss, images_per_s or self.images_per_s
    if self.enabled and self.bar is not None:
      self.bar.set_postfix_str(self._postfix(), refresh=False)

  def evaluation(self, line: str) -> None:
    """One line per evaluation, above the bar."""
    if self.enabled:
      self._print(f"{self.name} {line}")

  def end_run(self) -> None:
    if self.bar is not None:
      self.bar.close()
      self.bar = None

  def message(self, text: str) -> None:
    if self.enabled:
      self._print(text)

  # --- formatting --------------------------------------------------------------------------

  def _label(self) -> str:
    return f"[{self.run_index}/{self.runs}] {self.name}" if self.runs > 1 else self.name

  def _postfix(self) -> str:
    parts = []
    if self.images_per_s:
      parts.append(f"{self.images_per_s:,.0f} img/s")
    if self.loss is not None:
      parts.append(f"loss {self.loss:.4f}")
    all_eta = self._all_runs_eta()
    if all_eta is not None:
      parts.append(f"all runs ETA {_duration(all_eta)}")
    return ", ".join(parts)

  def _seconds_per_step(self) -> Optional[float]:
    done = self.step_number - self._first_step
    return (time.monotonic() - self._started) / done if done > 0 else None

  def _all_runs_eta(self) -> Optional[float]:
    """This run's and the later runs' remaining steps at this run's pace."""
    per_step = self._seconds_per_step()
    if self.runs < 2 or per_step is None:
      return None
    return per_step * (self.total - self.step_number + self.steps_left_after)

  def _plain_line(self) -> str:
    per_step = self._seconds_per_step()
    eta = f", ETA {_duration(per_step * (self.total - self.step_number))}" if per_step else ""
    postfix = self._postfix()
    return (f"{self._label()}: step {self.step_number}/{self.total} "
            f"({100 * self.step_number / self.total:.0f}%){eta}"
            f"{', ' + postfix if postfix else ''}")

  def _print(self, line: str) -> None:
    if self.bar is not None:
      self.bar.write(line, file=self.stream)
    else:
      print(line, file=self.stream, flush=True)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
