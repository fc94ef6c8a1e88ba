"""sweep.json, the runs planned in a sweep directory: the one module that reads and writes it.

  {"created": "<ISO time>", "updated": "<ISO time>",
   "runs": [{"dataset", "protocol", "arch", "variant", ["kind", "weight",] "seed", "workdir",
             "config", "command"}, ...],
   "invocations": [{"time": "<ISO time>", "argv": [...]}, ...]}

A run's `workdir` is relative to the directory that holds sweep.json. A run without
`protocol` (planned before the sweep knew protocols) is a "scratch" one. Only a multi_cos run
planned with the sweep's penalty axes (--kinds/--weights) has `kind` and `weight` (its
penalty.kind and penalty.weight), and its workdir's variant level is `variant_dir`'s
`multi_cos-<kind>-w<weight>`; a run without them trains at its config's penalty. The sweep
(featdiv_jax.sweep) reads the file as it is (`read_plan`) and extends it (`add_runs`); the report
(featdiv_jax.report) reads it as `PlannedRun`s (`planned_runs`), which tolerates hand-written
files: a bare list of runs instead of the object, missing keys, and entries of the wrong shape
(warned about and left out).

No jax, no TensorFlow: the sweep and the report use it on any machine.
"""

import dataclasses
import datetime
import math
import numbers
import os
import shlex
from typing import Callable, Optional, Union

from featdiv_jax import files

SWEEP_FILE = "sweep.json"
SCRATCH = "scratch"  # the protocol of a run that names none (configlib's default)
Seed = Union[int, str]


def format_weight(weight: float) -> str:
  """A penalty weight as a workdir names it: the shortest text that reads back as the same float,
  without '+' ('0.1', '1', '10', '1e-05', '1e20')."""
  weight = float(weight)
  text = str(int(weight)) if weight.is_integer() and abs(weight) < 1e16 else repr(weight)
  return text.replace("e+", "e")


def variant_dir(variant: str, kind: Optional[str] = None, weight: Optional[float] = None) -> str:
  """The variant level of a run's workdir: the variant, or `<variant>-<kind>-w<weight>` for a
  run planned with a penalty kind and weight (`parse_variant_dir` reads it back)."""
  if kind is None and weight is None:
    return variant
  return f"{variant}-{kind}-w{format_weight(weight)}"


def parse_variant_dir(name: str) -> tuple:
  """(variant, penalty kind, penalty weight) of a name `variant_dir` writes; (name, None, None)
  for any other name (a plain variant)."""
  variant, _, rest = name.partition("-")
  kind, w, weight = rest.partition("-w")
  try:
    value = float(weight) if variant and kind and w else None
  except ValueError:
    value = None
  if value is None or not math.isfinite(value) or variant_dir(variant, kind, value) != name:
    return name, None, None
  return variant, kind, value


def plan_path(sweep_dir: str) -> str:
  return os.path.join(sweep_dir, SWEEP_FILE)


def read_plan(sweep_dir: str) -> Optional[dict]:
  """`sweep_dir`'s sweep.json as parsed JSON; None when there is none. OSError or ValueError
  when it cannot be read or parsed."""
  path = plan_path(sweep_dir)
  if not os.path.exists(path):
    return None
  return files.read_json(path)


def add_runs(sweep_dir: str, runs: list, argv: list, log: Callable[[str], None]) -> dict:
  """Writes sweep.json: the union of the runs already there and `runs` (same workdir: the new
  command wins, with a note to `log`), and this invocation's argv. Returns what it wrote."""
  os.makedirs(sweep_dir, exist_ok=True)
  now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  plan = read_plan(sweep_dir) or {"created": now, "runs": [], "invocations": []}
  added = _merge_runs(plan["runs"], runs, log)
  if plan["runs"] and added and added < len(plan["runs"]):
    log(f"{SWEEP_FILE}: added {added} runs to the {len(plan['runs']) - added} already planned")
  plan["updated"] = now
  plan.setdefault("invocations", []).append({"time": now, "argv": argv})
  files.write_json_atomic(plan_path(sweep_dir), plan)
  return plan


def _merge_runs(planned: list, runs: list, log: Callable[[str], None]) -> int:
  """Adds `runs` to `planned` in place, one run per workdir; returns how many workdirs are new."""
  index_of = {run["workdir"]: i for i, run in enumerate(planned)}
  added = 0
  for run in runs:
    i = index_of.get(run["workdir"])
    if i is None:
      index_of[run["workdir"]] = len(planned)
      planned.append(run)
      added += 1
    elif planned[i]["command"] != run["command"]:
      log(f"note: {run['workdir']}: command changed from "
          f"{shlex.join(planned[i]['command'])} to {shlex.join(run['command'])}")
      planned[i] = run
  return added


# ----------------------------------------------------------------------------- for the report


def norm_seed(seed):
  """Seeds compare as ints where they are integral (sweep.json may hold "1" or 1.0)."""
  if isinstance(seed, numbers.Integral):  # bool and numpy integers too
    return int(seed)
  if isinstance(seed, float) and seed.is_integer():
    return int(seed)
  if isinstance(seed, str):
    try:
      return int(seed.strip())
    except ValueError:
      return seed.strip()
  return seed


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  """One run planned in sweep.json, as the report reads it: None for what the entry does not
  name, the seed normalised (`norm_seed`), the workdir absolute. `protocol` is "scratch" where
  the entry names none: entries older than the protocol key were all trained from scratch.
  `kind` and `weight` (a float) are the penalty of a run planned with the penalty axes, None for
  any other (which then asks for no particular penalty)."""
  dataset: Optional[str]
  arch: Optional[str]
  variant: Optional[str]
  seed: Optional[Seed]
  workdir: Optional[str]
  protocol: str = SCRATCH
  kind: Optional[str] = None
  weight: Optional[float] = None

  def well_typed(self) -> bool:
    names = (self.dataset, self.arch, self.variant, self.kind)
    return (all(isinstance(name, (str, type(None))) for name in names)
            and isinstance(self.seed, (int, str, type(None))) and isinstance(self.protocol, str)
            and isinstance(self.weight, (float, type(None))))

  def names_nothing(self) -> bool:
    """Whether the entry names no run (the protocol, which has a default, does not count)."""
    return all(value is None for value in (self.dataset, self.arch, self.variant, self.seed,
                                            self.workdir))


def planned_runs(dirs, warn: Callable[[str], None]) -> Optional[list]:
  """The PlannedRuns of the sweep.json at the top of each of `dirs`; None without a usable entry
  (the report then infers which runs are missing). Unreadable files and bad entries are warned
  about and left out."""
  planned = []
  for top in dirs:
    path = plan_path(top)
    if not os.path.isfile(path):
      continue
    try:
      entries = _entries(read_plan(top))
    except (OSError, ValueError, KeyError, TypeError) as e:
      warn(f"warning: ignoring {path}: {e}")
      continue
    for i, entry in enumerate(entries):
      run = _planned_run(entry, top, f"{path}: runs[{i}]", warn)
      if run is not None:
        planned.append(run)
  return planned or None


def _entries(plan) -> list:
  """The list of runs of a parsed sweep.json (its "runs", or the file itself when a list)."""
  entries = plan["runs"] if isinstance(plan, dict) else plan
  if not isinstance(entries, list):
    raise ValueError("'runs' is not a list")
  return entries


def _planned_run(entry, top: str, where: str,
                 warn: Callable[[str], None]) -> Optional[PlannedRun]:
  """A PlannedRun from one entry of `top`/sweep.json; None (with a warning) for a bad entry."""
  if not isinstance(entry, dict):
    warn(f"warning: {where} is not an object; ignored")
    return None
  workdir = entry.get("workdir")
  seed = entry.get("seed")
  kind, weight = entry.get("kind"), entry.get("weight")
  if kind is None and weight is None and isinstance(workdir, str):  # a hand-trimmed entry
    _, kind, weight = parse_variant_dir(os.path.basename(os.path.dirname(workdir)))
  if isinstance(weight, numbers.Real) and not isinstance(weight, bool):
    weight = float(weight)
  run = PlannedRun(
      dataset=entry.get("dataset"), arch=entry.get("arch"), variant=entry.get("variant"),
      seed=None if seed is None else norm_seed(seed),
      workdir=(os.path.normpath(os.path.join(os.path.abspath(top), workdir))
               if isinstance(workdir, str) and workdir else None),
      protocol=SCRATCH if entry.get("protocol") is None else entry["protocol"],
      kind=kind, weight=weight)
  if not run.well_typed():
    warn(f"warning: {where} has a dataset, protocol, arch, variant, seed, kind or weight of the "
         f"wrong type; ignored")
    return None
  if run.names_nothing():
    warn(f"warning: {where} names no dataset, arch, variant, seed or workdir; ignored")
    return None
  return run
