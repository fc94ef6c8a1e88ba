r"""A sweep over data set x variant x arch x seed: one workdir per run, run one after another.

  python -m featdiv_jax.sweep plan     --sweep-dir runs/sweep --datasets digits,cifar10 --seeds 0,1,2
  python -m featdiv_jax.sweep run      --sweep-dir runs/sweep --datasets digits --extra epochs=2
  python -m featdiv_jax.sweep status   --sweep-dir runs/sweep
  python -m featdiv_jax.sweep commands --sweep-dir runs/sweep --datasets cifar10 --prefix 'srun -N2'
  python -m featdiv_jax.sweep prepare  --sweep-dir runs/sweep --datasets cifar10 --data-dir ~/tfds
  python -m featdiv_jax.sweep plan     --sweep-dir runs/dose --kinds cos,cka --weights 0,0.1,1,10

Each run trains in SWEEP_DIR/<dataset>/<arch>/<variant>/seed<N> with
`python -m featdiv_jax.main --config=configs/<file>.py:<variant>[,extra...],arch=<arch>,seed=<N>`.
The protocol (configlib's `protocol`, set by `--extra protocol=pretrained_head` or a data set's
`paper` word) is part of a run's identity: a pretrained_head run trains in
SWEEP_DIR/<dataset>/pretrained_head/<arch>/<variant>/seed<N>, so that it never shares a workdir
with the scratch run of the same grid point, and its grid must hold `single`: the single runs
(stage 1) come first, and each multi/multi_cos run (stage 2) gets
`--config.model.init_from=<the workdir of the single run of its dataset, arch and seed>`.
The penalty's dose is two more axes, of multi_cos only: `--kinds` (penalty.kind) x `--weights`
(penalty.weight > 0) gives one multi_cos run per pair, trained with
`--config=...:multi_cos[,extra...],kind=<kind>,weight=<weight>,arch=<arch>,seed=<N>` in
.../<arch>/multi_cos-<kind>-w<weight>/seed<N> (sweepfile.variant_dir; the config's kind or weight
where only the other axis is given). Weight 0 is no penalty, which is the multi variant: 0 in
`--weights` plans the multi run (once, in .../<arch>/multi/seed<N>) even when `--variants` does
not name multi. Without the two options the grid is that of sweeps before them.
`run` skips runs whose results.json says finished and re-runs (= resumes from the checkpoints)
interrupted ones. SWEEP_DIR/sweep.json lists every run planned in the directory (the union of
every grid planned there; featdiv_jax.sweepfile reads and writes it). Imports no TensorFlow
(`prepare` calls the data module for that); jax only to list the model names.
"""

import argparse
import itertools
import math
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

from featdiv_jax import configlib
from featdiv_jax import files
from featdiv_jax import sweepfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Sweep data set name -> config file (relative to the repository root).
DATASET_CONFIGS = {
    "digits": "configs/digits.py",
    "cifar10": "configs/cifar10.py",
    "caltech101": "configs/caltech101.py",
    "flowers102": "configs/flowers102.py",
    "oxford_flowers102": "configs/flowers102.py",
}
EMBEDDED_DATASETS = ("digits",)  # ship with scikit-learn: nothing to download or prepare
SCRATCH, PRETRAINED_HEAD = "scratch", "pretrained_head"  # configlib.PROTOCOLS
STAGE_1 = "single"  # the variant pretrained_head trains first and takes head 0 from
NO_PENALTY, PENALIZED = "multi", "multi_cos"  # configlib.VARIANTS: weight 0 is multi
PENALTY_KEYS = ("kind", "weight")  # configlib.ARG_KEYS of the penalty axes
WEIGHTS_VALID = "give non-negative penalty weights, e.g. 0,0.1,1,10"


class SweepError(ValueError):
  """Bad sweep input: one line naming the bad value and the valid ones."""


def archs() -> tuple:
  """The model names featdiv_jax.models knows (imported here only: it pulls in jax)."""
  from featdiv_jax.models.resnet import ARCHS  # pylint: disable=import-outside-toplevel
  return tuple(ARCHS)


def penalty_kinds() -> tuple:
  """The penalty kinds featdiv_jax.losses knows (imported here only: it pulls in jax)."""
  from featdiv_jax.losses import PENALTY_KINDS  # pylint: disable=import-outside-toplevel
  return tuple(PENALTY_KINDS)


def _split(text) -> list:
  """'a,b' (or a list of such strings from a repeated option) -> ['a', 'b']."""
  items = []
  for part in ([text] if isinstance(text, str) else text or []):
    items += [t.strip() for t in part.split(",") if t.strip()]
  return items


def _unique(items) -> list:
  return list(dict.fromkeys(items))


def parse_seeds(text: str) -> list:
  """'0,1,2' or '0-4' (or a mix) -> a list of distinct non-negative ints."""
  seeds = []
  for token in _split(text):
    lo, dash, hi = token.partition("-")
    try:
      values = range(int(lo), int(hi) + 1) if dash and lo else [int(token)]
    except ValueError:
      values = None
    if not values or any(s < 0 for s in values):
      raise SweepError(f"bad seed {token!r} in --seeds; valid: non-negative integers, "
                       f"comma-separated, or a range such as 0-4")
    seeds += list(values)
  if not seeds:
    raise SweepError("--seeds is empty; valid: non-negative integers such as 0,1,2 or 0-4")
  return _unique(seeds)


def parse_weights(text: str) -> list:
  """'0,0.1,1,10' -> a list of distinct finite non-negative floats."""
  weights = []
  for token in _split(text):
    try:
      weight = float(token)
    except ValueError:
      raise SweepError(f"--weights: {token} is not a number; {WEIGHTS_VALID}") from None
    if not math.isfinite(weight):
      raise SweepError(f"--weights: {token} is not finite; {WEIGHTS_VALID}")
    if weight < 0:
      raise SweepError(f"--weights: {token} is negative; {WEIGHTS_VALID}")
    weights.append(weight + 0.0)  # -0.0 -> 0.0
  if not weights:
    raise SweepError(f"--weights is empty; {WEIGHTS_VALID}")
  return _unique(weights)


def _choose(option: str, text: str, valid) -> list:
  values = _unique(_split(text))
  if not values:
    raise SweepError(f"{option} is empty; valid: {', '.join(valid)}")
  for v in values:
    if v not in valid:
      raise SweepError(f"unknown value {v!r} in {option}; valid: {', '.join(valid)}")
  return values


def _load_config(config_file: str, arg: str):
  """configs/<file>.py's get_config(arg) (imports only configlib and ml_collections)."""
  path = ROOT / config_file
  if not path.is_file():
    raise SweepError(f"config file {path} not found: run the sweep from a checkout of the "
                     f"repository (pip install -e .)")
  return configlib.load_config_file(path, arg)


def _check_extra(extra: list) -> None:
  for token in extra:
    key = token.partition("=")[0]
    if key in ("arch", "seed"):
      raise SweepError(f"--extra {token!r}: {key} is a sweep axis; valid: --{key}s instead")
    words = configlib.FLAGS_WORDS + (configlib.PAPER,)
    if "=" not in token and token not in words:
      raise SweepError(f"bad --extra value {token!r}; valid: "
                       f"{', '.join(words)}, or key=value with key in "
                       f"{', '.join(k for k in configlib.ARG_KEYS if k not in ('arch', 'seed'))}")


def _check_main_flags(flags: list) -> None:
  base = configlib.default_config()
  for flag in flags:
    name = flag.partition("=")[0]
    if not flag.startswith("--") or name in ("--config", "--workdir"):
      raise SweepError(f"bad --main-flag {flag!r}; valid: a flag of featdiv_jax.main other "
                       f"than --config/--workdir, e.g. --main-flag=--config.batch_size=128")
    if name == "--config.protocol":  # the protocol decides the workdirs and the run order
      raise SweepError(f"bad --main-flag {flag!r}: the sweep lays its runs out by protocol; "
                       f"valid: --extra protocol=<{'|'.join(configlib.PROTOCOLS)}>")
    if name.startswith("--config."):
      why = configlib.unknown_field(base, name[len("--config."):])
      if why:
        raise SweepError(f"--main-flag {flag!r}: {why}")


def _check_axes_alone(extra: list, main_flags: list) -> None:
  """With --kinds/--weights, nothing else may set the penalty: the workdirs would lie."""
  for token in extra:
    key = token.partition("=")[0]
    if key in PENALTY_KEYS:
      raise SweepError(f"--extra {token!r} sets penalty.{key}, which --kinds/--weights set per "
                       f"run; valid: the value in --{key}s instead")
  for flag in main_flags:
    name = flag.partition("=")[0]
    if name in ("--config.penalty", *(f"--config.penalty.{key}" for key in PENALTY_KEYS)):
      raise SweepError(f"--main-flag {flag!r} sets the penalty, which --kinds/--weights set per "
                       f"run; valid: the values in --kinds/--weights instead")


def _axes_text(kinds, weights) -> str:
  """'--kinds cos,cka and --weights 0.1,1': the axes given, as the user wrote them."""
  given = [] if kinds is None else [f"--kinds {','.join(kinds)}"]
  if weights is not None:
    given.append(f"--weights {','.join(map(sweepfile.format_weight, weights))}")
  return " and ".join(given)


def _points(variants: list, kinds, weights) -> list:
  """(variant, penalty kind, penalty weight) per workdir variant level, in --variants order;
  kind and weight None where the run takes its config's. `kinds`/`weights`: the parsed axes, or
  None when not given (neither given: the variants as they are)."""
  if kinds is None and weights is None:
    return [(variant, None, None) for variant in variants]
  positive = [None] if weights is None else [w for w in weights if w > 0]
  zero = weights is not None and 0 in weights
  # Only weight 0 plans a run without multi_cos; kinds or positive weights would be dropped.
  if PENALIZED not in variants and (positive or not zero):
    raise SweepError(f"{_axes_text(kinds, weights)}: the penalty axes apply to {PENALIZED} "
                     f"only, which --variants {','.join(variants)} lacks; valid: --variants "
                     f"with {PENALIZED}, e.g. {','.join(configlib.VARIANTS)} (or --weights 0 "
                     f"alone, which plans {NO_PENALTY})")
  if zero and NO_PENALTY not in variants:  # weight 0 is the multi variant
    at = variants.index(PENALIZED) if PENALIZED in variants else len(variants)
    variants = variants[:at] + [NO_PENALTY] + variants[at:]
  points = []
  for variant in variants:
    if variant == PENALIZED:
      points += [(variant, kind, weight) for kind in kinds or [None] for weight in positive]
    else:
      points.append((variant, None, None))
  return points


def expand(sweep_dir: str, datasets, variants, arch_names, seeds, extra=(), main_flags=(),
           python: str = "python", absolute: bool = True, kinds=None, weights=None) -> list:
  """The grid as run dicts (see the module docstring); raises SweepError for bad input.
  `kinds`/`weights`: the penalty axes ('cos,cka', '0,0.1,1'), None when not given."""
  datasets = _choose("--datasets", datasets, tuple(DATASET_CONFIGS))
  variants = _choose("--variants", variants, configlib.VARIANTS)
  arch_names = _choose("--archs", arch_names, archs())
  seeds = parse_seeds(seeds) if isinstance(seeds, str) else _unique(seeds)
  kinds = None if kinds is None else _choose("--kinds", kinds, penalty_kinds())
  weights = None if weights is None else parse_weights(weights)
  extra, main_flags = _split(extra), list(main_flags or [])
  _check_extra(extra)
  _check_main_flags(main_flags)
  if kinds is not None or weights is not None:
    _check_axes_alone(extra, main_flags)
  points = _points(variants, kinds, weights)
  workdir_root = os.path.abspath(sweep_dir) if absolute else sweep_dir  # in the commands
  runs, seen = [], set()
  for dataset, arch, point, seed in itertools.product(datasets, arch_names, points, seeds):
    run = _grid_run(workdir_root, dataset, arch, point, seed, extra, main_flags, python)
    if run["workdir"] not in seen:  # flowers102 and its alias oxford_flowers102 share a dir
      seen.add(run["workdir"])
      runs.append(run)
  if STAGE_1 not in variants and any(run["protocol"] == PRETRAINED_HEAD for run in runs):
    raise SweepError(f"--variants {','.join(variants)} lacks {STAGE_1}, which protocol="
                     f"{PRETRAINED_HEAD} trains first and takes head 0 of every multi-head run "
                     f"from; valid: --variants with {STAGE_1}, e.g. {','.join(configlib.VARIANTS)}")
  # Stage 2 reads stage 1's workdir: every stage-1 run before any stage-2 run (a stable sort:
  # a scratch grid keeps its order).
  return sorted(runs, key=_is_stage_2)


def _is_stage_2(run: dict) -> bool:
  return run["protocol"] == PRETRAINED_HEAD and run["variant"] != STAGE_1


def run_workdir(dataset: str, protocol: str, arch: str, variant: str, seed: int,
                kind: str | None = None, weight: float | None = None) -> str:
  """A run's workdir under the sweep directory: scratch runs keep the layout of sweeps that
  predate protocols; other protocols get a directory level of their own; a run of the penalty
  axes names its kind and weight in the variant's level (sweepfile.variant_dir)."""
  parts = [dataset] + ([] if protocol == SCRATCH else [protocol])
  return os.path.join(*parts, arch, sweepfile.variant_dir(variant, kind, weight), f"seed{seed}")


def _grid_run(workdir_root: str, dataset: str, arch: str, point: tuple, seed: int, extra: list,
              main_flags: list, python: str) -> dict:
  """One run of the grid, as sweep.json stores it (its command's workdir under `workdir_root`);
  `point`: (variant, penalty kind, penalty weight) from `_points`. SweepError for a bad --extra."""
  config_file = DATASET_CONFIGS[dataset]
  variant, kind, weight = point
  penalty = ([] if kind is None else [f"kind={kind}"]) + (
      [] if weight is None else [f"weight={sweepfile.format_weight(weight)}"])
  arg = ",".join([variant, *extra, *penalty, f"arch={arch}", f"seed={seed}"])
  try:
    config = _load_config(config_file, arg)
  except configlib.ConfigError as e:
    raise SweepError(f"--extra {','.join(extra)!r}: {e}") from None
  protocol = config.protocol
  if protocol not in configlib.PROTOCOLS:  # it names a directory level: refuse it here
    raise SweepError(f"--extra {','.join(extra)!r}: unknown protocol {protocol!r}; valid: "
                     f"{', '.join(configlib.PROTOCOLS)}")
  name = config.dataset.name  # the TFDS name, which names the workdir
  axes = {}
  if penalty:  # the workdir and sweep.json name both, the config's where only one is given
    axes = dict(kind=config.penalty.kind, weight=float(config.penalty.weight))
  workdir = run_workdir(name, protocol, arch, variant, seed, axes.get("kind"), axes.get("weight"))
  flags = list(main_flags)
  if protocol == PRETRAINED_HEAD and variant != STAGE_1:  # stage 2: head 0 from stage 1
    stage_1 = run_workdir(name, protocol, arch, STAGE_1, seed)
    flags.append(f"--config.model.init_from={os.path.join(workdir_root, stage_1)}")
  return dict(dataset=name, protocol=protocol, arch=arch, variant=variant, **axes, seed=seed,
              workdir=workdir, config=f"{config_file}:{arg}",
              command=main_command(python, f"{config_file}:{arg}",
                                   os.path.join(workdir_root, workdir), flags))


def main_command(python: str, config: str, workdir: str, main_flags=()) -> list:
  return [python, "-m", "featdiv_jax.main", f"--config={config}", f"--workdir={workdir}",
          *main_flags]


def run_state(workdir: str) -> str:
  """'finished', 'in progress' (checkpoints or an unfinished results.json) or 'not started'."""
  results = os.path.join(workdir, "results.json")
  if os.path.exists(results):
    try:
      if files.read_json(results).get("finished") is True:
        return "finished"
    except (OSError, ValueError):
      pass
    return "in progress"
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.isdir(checkpoints) and os.listdir(checkpoints):
    return "in progress"
  return "not started"


def log(message: str) -> None:
  print(f"sweep: {message}", flush=True)


# Where a launcher or cluster says which process of a multi-host job this one is:
# launch/tpu_vm.sh exports FEATDIV_PROCESS_ID (a Cloud TPU VM worker's agent-worker-number from
# its metadata server: Cloud TPU VMs set no TPU_WORKER_ID), GKE sets TPU_WORKER_ID, srun
# SLURM_PROCID (featdiv_jax.distributed names FEATDIV_PROCESS_ID too; this module imports no jax).
PROCESS_ID_VARS = ("FEATDIV_PROCESS_ID", "TPU_WORKER_ID", "SLURM_PROCID", "JAX_PROCESS_ID")


def _is_primary_process(environ=None) -> bool:
  """Only process 0 of a multi-host run writes results.json: False when any of
  PROCESS_ID_VARS names another process (unset or empty: this one may be the only one)."""
  env = os.environ if environ is None else environ
  return all(env.get(var, "").strip() in ("", "0") for var in PROCESS_ID_VARS)


class _Signals:
  """Forwards SIGINT/SIGTERM to the running child (main then saves a checkpoint of its current
  step and exits: 130 for SIGINT, 0 for SIGTERM) and records that the sweep must stop after it;
  a second signal kills the child (its last complete checkpoint stays the one to resume from)."""

  def __init__(self):
    self.received = None
    self.child = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    again = self.received is not None
    self.received = self.received or signum
    if self.child is not None and self.child.poll() is None:
      if again:
        log("second signal: killing the run")
        self.child.kill()
      else:
        log(f"{signal.Signals(signum).name}: asking the run to save a checkpoint and stop "
            f"(again to kill it)")
        self.child.send_signal(signum)

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)

  def run_child(self, command: list) -> int:
    """Runs `command` from the repository root as the child signals go to; its exit code."""
    # Own process group: a terminal's Ctrl-C reaches only the sweep, which forwards it once, so
    # that the run saves a checkpoint of its current step and the sweep stops after it.
    self.child = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    try:
      return self.child.wait()
    finally:
      if self.child.poll() is None:  # an exception in this process: don't leave it behind
        self.child.terminate()
        self.child.wait()
      self.child = None


def _local_command(run: dict, workdir: str) -> list:
  """The run's planned command with this process's Python and an absolute workdir."""
  command = [sys.executable, *run["command"][1:]]
  return [f"--workdir={os.path.abspath(workdir)}" if arg.startswith("--workdir=") else arg
          for arg in command]


def _run_one(sweep_dir: str, run: dict, where: str, signals: _Signals) -> tuple:
  """Runs one planned run unless it is finished: (outcome, exit code), with the outcome
  'skipped', 'finished', 'failed' or 'stopped' (by a signal)."""
  workdir = os.path.join(sweep_dir, run["workdir"])
  state = run_state(workdir)
  if state == "finished":
    log(f"{where} skip {run['workdir']}: finished")
    return "skipped", 0
  command = _local_command(run, workdir)
  verb = "resume" if state == "in progress" else "start"
  log(f"{where} {verb} {run['workdir']}: {shlex.join(command)}")
  started = time.monotonic()
  returncode = signals.run_child(command)
  took = time.monotonic() - started
  if returncode == 0 and (run_state(workdir) == "finished" or not _is_primary_process()):
    log(f"{where} done {run['workdir']} in {took:.1f} s")
    return "finished", returncode
  if signals.received:
    log(f"{where} stopped {run['workdir']} after {took:.1f} s (exit code {returncode}); "
        f"re-run the sweep to resume it")
    return "stopped", returncode
  why = (f"exit code {returncode}" if returncode
         else "exit code 0 but results.json is not finished")
  log(f"{where} FAILED {run['workdir']} after {took:.1f} s ({why})")
  return "failed", returncode


def run_sweep(sweep_dir: str, runs: list, keep_going: bool = False) -> int:
  """Runs `runs` one after another in this process's Python; returns the sweep's exit code."""
  start = time.monotonic()
  counts = {"finished": 0, "skipped": 0, "failed": 0}
  failures, code = [], 0
  with _Signals() as signals:
    for i, run in enumerate(runs, 1):
      if signals.received:
        break
      outcome, returncode = _run_one(sweep_dir, run, f"[{i}/{len(runs)}]", signals)
      if outcome == "stopped":
        break
      counts[outcome] += 1
      if outcome == "failed":
        failures.append(run["workdir"])
        code = code or (returncode if returncode > 0 else 1)
        if not keep_going:
          break
  rest = len(runs) - sum(counts.values())
  log(f"summary: {counts['finished']} ran to the end, {counts['skipped']} skipped (finished "
      f"before), {counts['failed']} failed, {rest} not run; wall time "
      f"{time.monotonic() - start:.1f} s")
  for workdir in failures:
    log(f"failed: {workdir} (log above; re-run the sweep to retry it)")
  if signals.received:
    log(f"interrupted by {signal.Signals(signals.received).name}")
    return 128 + signals.received
  return code


def prepare(runs: list, data_dir: str) -> int:
  """Downloads and prepares the TFDS data sets of `runs` (network; digits needs nothing)."""
  names = _unique(run["dataset"] for run in runs if run["dataset"] not in EMBEDDED_DATASETS)
  if not names:
    log("nothing to prepare (only embedded data sets)")
    return 0
  from featdiv_jax.data import sources  # TensorFlow: only the data module imports it
  for name in names:
    log(f"preparing {name} in {data_dir or 'the TFDS default data dir'}")
    try:
      sources.download_and_prepare(name, data_dir)
    except sources.DatasetError as e:
      print(f"featdiv_jax.sweep: error: {e}", file=sys.stderr)
      return 1
  return 0


def print_status(sweep_dir: str, runs: list) -> None:
  """A line per run; a protocol column only when some run is not scratch (sweep.json entries
  written before protocols have no `protocol`: they are scratch)."""
  protocols = [run.get("protocol") or SCRATCH for run in runs]
  with_protocol = any(protocol != SCRATCH for protocol in protocols)
  rows = [(run["dataset"], *([protocol] if with_protocol else []), run["arch"],
           sweepfile.variant_dir(run["variant"], run.get("kind"), run.get("weight")),
           str(run["seed"]), run_state(os.path.join(sweep_dir, run["workdir"])), run["workdir"])
          for run, protocol in zip(runs, protocols)]
  header = ("dataset", *(["protocol"] if with_protocol else []), "arch", "variant", "seed",
            "state", "workdir")
  widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
  for row in [header] + rows:
    print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
  states = [row[-2] for row in rows]
  print(", ".join(f"{states.count(state)} {state}"
                  for state in ("finished", "in progress", "not started")))


def build_parser() -> argparse.ArgumentParser:
  grid = argparse.ArgumentParser(add_help=False)
  grid.add_argument("--sweep-dir", required=True, help="one workdir per run under it")
  grid.add_argument("--datasets", help=f"comma-separated: {', '.join(DATASET_CONFIGS)} "
                    "(default: digits)")
  grid.add_argument("--variants", help=f"comma-separated: {', '.join(configlib.VARIANTS)} "
                    "(default: all three)")
  grid.add_argument("--archs", help="comma-separated SE-ResNet archs (default: seresnet18)")
  grid.add_argument("--seeds", help="comma-separated or a range, e.g. 0,1,2 or 0-4 (default: 0)")
  grid.add_argument("--kinds", help="comma-separated penalty kinds (featdiv_jax.losses."
                    "PENALTY_KINDS), e.g. cos,cka: one multi_cos run per kind (and weight > 0) "
                    "(default: the config's)")
  grid.add_argument("--weights", help="comma-separated non-negative penalty weights, e.g. "
                    "0,0.1,1,10: one multi_cos run per weight > 0 (and kind); 0 plans the multi "
                    "run, even when --variants lacks multi (default: the config's)")
  grid.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE,...",
                    help="config arguments for every run, e.g. smoke or epochs=2,batch=128; "
                         "protocol=pretrained_head (or a data set's paper word) plans the "
                         "two-stage runs")
  grid.add_argument("--main-flag", action="append", default=[], metavar="FLAG",
                    help="a flag passed to every featdiv_jax.main, e.g. "
                         "--main-flag=--config.dataset.data_dir=/data/tfds (repeatable)")
  parser = argparse.ArgumentParser(
      prog="python -m featdiv_jax.sweep", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  actions = parser.add_subparsers(dest="action", required=True,
                                  metavar="{plan,status,run,commands,prepare}")
  actions.add_parser("plan", parents=[grid], help="write/extend SWEEP_DIR/sweep.json")
  actions.add_parser("status", parents=[grid], help="finished / in progress / not started per "
                     "run (all runs of sweep.json when no grid option is given)")
  run = actions.add_parser("run", parents=[grid],
                           help="plan, then run locally one after another")
  run.add_argument("--keep-going", action="store_true", help="continue after a failed run")
  commands = actions.add_parser("commands", parents=[grid],
                                help="print one shell command per run")
  commands.add_argument("--python", default="python", help="interpreter in the printed commands")
  commands.add_argument("--prefix", default="", help="put before each command, e.g. 'srun -N2'")
  commands.add_argument("--pending", action="store_true",
                        help="only runs that are not finished")
  commands.add_argument("--absolute", action="store_true",
                        help="absolute workdirs (default: under --sweep-dir as given); the "
                             "config paths are relative to the repository root: run the "
                             "commands from there")
  prepare_data = actions.add_parser("prepare", parents=[grid],
                                    help="download + prepare the grid's TFDS data")
  prepare_data.add_argument("--data-dir", default="", help="TFDS data dir ('' = TFDS default)")
  return parser


def _selected_runs(args) -> list:
  """The runs the action is about: all of sweep.json's for `status` without grid options, else
  the grid's. SweepError for bad grid input, OSError or ValueError for an unreadable sweep.json."""
  grid_given = any(v is not None for v in (args.datasets, args.variants, args.archs, args.seeds,
                                            args.kinds, args.weights))
  plan = sweepfile.read_plan(args.sweep_dir)
  if args.action == "status" and not grid_given and plan is not None:
    return plan["runs"]
  return expand(args.sweep_dir, args.datasets or "digits",
                args.variants or ",".join(configlib.VARIANTS), args.archs or "seresnet18",
                args.seeds or "0", args.extra, args.main_flag,
                python=getattr(args, "python", "python"),
                absolute=args.action != "commands" or args.absolute, kinds=args.kinds,
                weights=args.weights)


def print_commands(sweep_dir: str, runs: list, prefix: str, pending: bool) -> None:
  for run in runs:
    if pending and run_state(os.path.join(sweep_dir, run["workdir"])) == "finished":
      continue
    print(shlex.join(shlex.split(prefix) + run["command"]))


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  try:
    runs = _selected_runs(args)
  except SweepError as e:
    print(f"featdiv_jax.sweep: error: {e}", file=sys.stderr)
    return 2
  except (OSError, ValueError) as e:  # an unreadable sweep.json
    print(f"featdiv_jax.sweep: error: {type(e).__name__}: {e}", file=sys.stderr)
    return 2
  if args.action == "plan":
    plan = sweepfile.add_runs(args.sweep_dir, runs, argv, log)
    log(f"{len(runs)} runs in this grid, {len(plan['runs'])} in "
        f"{sweepfile.plan_path(args.sweep_dir)}")
    return 0
  if args.action == "status":
    print_status(args.sweep_dir, runs)
    return 0
  if args.action == "commands":
    print_commands(args.sweep_dir, runs, args.prefix, args.pending)
    return 0
  if args.action == "prepare":
    return prepare(runs, args.data_dir)
  sweepfile.add_runs(args.sweep_dir, runs, argv, log)
  log(f"{len(runs)} runs in {os.path.abspath(args.sweep_dir)}")
  return run_sweep(args.sweep_dir, runs, keep_going=args.keep_going)


if __name__ == "__main__":
  sys.exit(main())
