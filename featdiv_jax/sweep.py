r"""A sweep over data set x variant x arch x seed: one workdir per run, run one after another.

  python -m featdiv_jax.sweep plan     --sweep-dir runs/sweep --datasets digits,cifar10 --seeds 0,1,2
  python -m featdiv_jax.sweep run      --sweep-dir runs/sweep --datasets digits --extra epochs=2
  python -m featdiv_jax.sweep status   --sweep-dir runs/sweep
  python -m featdiv_jax.sweep commands --sweep-dir runs/sweep --datasets cifar10 --prefix 'srun -N2'
  python -m featdiv_jax.sweep prepare  --sweep-dir runs/sweep --datasets cifar10 --data-dir ~/tfds

Each run trains in SWEEP_DIR/<dataset>/<arch>/<variant>/seed<N> with
`python -m featdiv_jax.main --config=configs/<file>.py:<variant>[,extra...],arch=<arch>,seed=<N>`.
`run` skips runs whose results.json says finished and re-runs (= resumes from the checkpoints)
interrupted ones. SWEEP_DIR/sweep.json lists every run planned in the directory (the union of
every grid planned there). Imports no TensorFlow (`prepare` calls the data module for that);
jax only to list the model names.
"""

import argparse
import datetime
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

from featdiv_jax import configlib

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
SWEEP_FILE = "sweep.json"


class SweepError(ValueError):
  """Bad sweep input: one line naming the bad value and the valid ones."""


def archs() -> tuple:
  """The model names featdiv_jax.models knows (imported here only: it pulls in jax)."""
  from featdiv_jax.models.resnet import ARCHS  # pylint: disable=import-outside-toplevel
  return tuple(ARCHS)


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
    if "=" not in token and token not in configlib.FLAGS_WORDS:
      raise SweepError(f"bad --extra value {token!r}; valid: "
                       f"{', '.join(configlib.FLAGS_WORDS)}, or key=value with key in "
                       f"{', '.join(k for k in configlib.ARG_KEYS if k not in ('arch', 'seed'))}")


def _check_main_flags(flags: list) -> None:
  base = configlib.default_config()
  for flag in flags:
    name = flag.partition("=")[0]
    if not flag.startswith("--") or name in ("--config", "--workdir"):
      raise SweepError(f"bad --main-flag {flag!r}; valid: a flag of featdiv_jax.main other "
                       f"than --config/--workdir, e.g. --main-flag=--config.batch_size=128")
    if name.startswith("--config."):
      why = configlib.unknown_field(base, name[len("--config."):])
      if why:
        raise SweepError(f"--main-flag {flag!r}: {why}")


def expand(sweep_dir: str, datasets, variants, arch_names, seeds, extra=(), main_flags=(),
           python: str = "python", absolute: bool = True) -> list:
  """The grid as run dicts (see the module docstring); raises SweepError for bad input."""
  datasets = _choose("--datasets", datasets, tuple(DATASET_CONFIGS))
  variants = _choose("--variants", variants, configlib.VARIANTS)
  arch_names = _choose("--archs", arch_names, archs())
  seeds = parse_seeds(seeds) if isinstance(seeds, str) else _unique(seeds)
  extra, main_flags = _split(extra), list(main_flags or [])
  _check_extra(extra)
  _check_main_flags(main_flags)
  runs, seen = [], set()
  for ds in datasets:
    config_file = DATASET_CONFIGS[ds]
    for arch in arch_names:
      for variant in variants:
        for seed in seeds:
          arg = ",".join([variant, *extra, f"arch={arch}", f"seed={seed}"])
          try:
            config = _load_config(config_file, arg)
          except configlib.ConfigError as e:
            raise SweepError(f"--extra {','.join(extra)!r}: {e}") from None
          name = config.dataset.name  # the TFDS name: flowers102 and its alias share a dir
          workdir = os.path.join(name, arch, variant, f"seed{seed}")
          if workdir in seen:
            continue
          seen.add(workdir)
          runs.append(dict(dataset=name, arch=arch, variant=variant, seed=seed, workdir=workdir,
                           config=f"{config_file}:{arg}",
                           command=main_command(
                               python, f"{config_file}:{arg}",
                               os.path.join(os.path.abspath(sweep_dir) if absolute else sweep_dir,
                                            workdir), main_flags)))
  return runs


def main_command(python: str, config: str, workdir: str, main_flags=()) -> list:
  return [python, "-m", "featdiv_jax.main", f"--config={config}", f"--workdir={workdir}",
          *main_flags]


def load_plan(sweep_dir: str):
  path = os.path.join(sweep_dir, SWEEP_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_plan(sweep_dir: str, runs: list, argv: list) -> dict:
  """Writes sweep.json: the union of the runs already there and `runs` (same workdir: the new
  command wins, with a note)."""
  os.makedirs(sweep_dir, exist_ok=True)
  now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  plan = load_plan(sweep_dir) or {"created": now, "runs": [], "invocations": []}
  by_workdir = {r["workdir"]: i for i, r in enumerate(plan["runs"])}
  added = 0
  for run in runs:
    i = by_workdir.get(run["workdir"])
    if i is None:
      by_workdir[run["workdir"]] = len(plan["runs"])
      plan["runs"].append(run)
      added += 1
    elif plan["runs"][i]["command"] != run["command"]:
      log(f"note: {run['workdir']}: command changed from "
          f"{shlex.join(plan['runs'][i]['command'])} to {shlex.join(run['command'])}")
      plan["runs"][i] = run
  if plan["runs"] and added and added < len(plan["runs"]):
    log(f"{SWEEP_FILE}: added {added} runs to the {len(plan['runs']) - added} already planned")
  plan["updated"] = now
  plan.setdefault("invocations", []).append({"time": now, "argv": argv})
  tmp = os.path.join(sweep_dir, f".{SWEEP_FILE}.tmp.{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump(plan, f, indent=2)
  os.replace(tmp, os.path.join(sweep_dir, SWEEP_FILE))
  return plan


def run_state(workdir: str) -> str:
  """'finished', 'in progress' (checkpoints or an unfinished results.json) or 'not started'."""
  results = os.path.join(workdir, "results.json")
  if os.path.exists(results):
    try:
      with open(results) as f:
        if json.load(f).get("finished") is True:
          return "finished"
    except (OSError, ValueError):
      pass
    return "in progress"
  ckpts = os.path.join(workdir, "checkpoints")
  if os.path.isdir(ckpts) and os.listdir(ckpts):
    return "in progress"
  return "not started"


def log(message: str) -> None:
  print(f"sweep: {message}", flush=True)


def _is_primary_process() -> bool:
  """Only process 0 of a multi-host run writes results.json."""
  for var in ("TPU_WORKER_ID", "SLURM_PROCID", "JAX_PROCESS_ID"):
    if os.environ.get(var, "0") not in ("", "0"):
      return False
  return True


class _Signals:
  """Forwards SIGINT/SIGTERM to the running child as SIGTERM (main then saves a checkpoint and
  exits 0) and records that the sweep must stop; a second signal kills the child."""

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
        self.child.send_signal(signal.SIGTERM)

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def run_sweep(sweep_dir: str, runs: list, keep_going: bool = False) -> int:
  """Runs `runs` one after another in this process's Python; returns the sweep's exit code."""
  start = time.monotonic()
  counts = {"finished": 0, "skipped": 0, "failed": 0}
  failures, code = [], 0
  with _Signals() as signals:
    for i, r in enumerate(runs, 1):
      if signals.received:
        break
      workdir = os.path.join(sweep_dir, r["workdir"])
      state = run_state(workdir)
      if state == "finished":
        log(f"[{i}/{len(runs)}] skip {r['workdir']}: finished")
        counts["skipped"] += 1
        continue
      cmd = [sys.executable, *r["command"][1:]]
      cmd = [f"--workdir={os.path.abspath(workdir)}" if a.startswith("--workdir=") else a
             for a in cmd]
      verb = "resume" if state == "in progress" else "start"
      log(f"[{i}/{len(runs)}] {verb} {r['workdir']}: {shlex.join(cmd)}")
      t0 = time.monotonic()
      # Own process group: a terminal's Ctrl-C reaches only the sweep, which forwards SIGTERM so
      # that the run saves a checkpoint instead of dying mid-step.
      signals.child = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
      try:
        rc = signals.child.wait()
      finally:
        if signals.child.poll() is None:  # an exception in this process: don't leave it behind
          signals.child.terminate()
          signals.child.wait()
        signals.child = None
      took = time.monotonic() - t0
      if rc == 0 and (run_state(workdir) == "finished" or not _is_primary_process()):
        log(f"[{i}/{len(runs)}] done {r['workdir']} in {took:.1f} s")
        counts["finished"] += 1
        continue
      if signals.received:
        log(f"[{i}/{len(runs)}] stopped {r['workdir']} after {took:.1f} s (exit code {rc}); "
            f"re-run the sweep to resume it")
        break
      why = f"exit code {rc}" if rc else "exit code 0 but results.json is not finished"
      log(f"[{i}/{len(runs)}] FAILED {r['workdir']} after {took:.1f} s ({why})")
      counts["failed"] += 1
      failures.append(r["workdir"])
      code = code or (rc if rc > 0 else 1)
      if not keep_going:
        break
  rest = len(runs) - sum(counts.values())
  log(f"summary: {counts['finished']} ran to the end, {counts['skipped']} skipped (finished "
      f"before), {counts['failed']} failed, {rest} not run; wall time "
      f"{time.monotonic() - start:.1f} s")
  for w in failures:
    log(f"failed: {w} (log above; re-run the sweep to retry it)")
  if signals.received:
    log(f"interrupted by {signal.Signals(signals.received).name}")
    return 128 + signals.received
  return code


def prepare(runs: list, data_dir: str) -> int:
  """Downloads and prepares the TFDS data sets of `runs` (network; digits needs nothing)."""
  names = _unique(r["dataset"] for r in runs if r["dataset"] not in EMBEDDED_DATASETS)
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
  rows = [(r["dataset"], r["arch"], r["variant"], str(r["seed"]),
           run_state(os.path.join(sweep_dir, r["workdir"])), r["workdir"]) for r in runs]
  header = ("dataset", "arch", "variant", "seed", "state", "workdir")
  widths = [max(len(x[i]) for x in rows + [header]) for i in range(len(header))]
  for row in [header] + rows:
    print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
  states = [row[4] for row in rows]
  print(", ".join(f"{states.count(s)} {s}" for s in ("finished", "in progress", "not started")))


def build_parser() -> argparse.ArgumentParser:
  grid = argparse.ArgumentParser(add_help=False)
  grid.add_argument("--sweep-dir", required=True, help="one workdir per run under it")
  grid.add_argument("--datasets", help=f"comma-separated: {', '.join(DATASET_CONFIGS)} "
                    "(default: digits)")
  grid.add_argument("--variants", help=f"comma-separated: {', '.join(configlib.VARIANTS)} "
                    "(default: all three)")
  grid.add_argument("--archs", help="comma-separated SE-ResNet archs (default: seresnet18)")
  grid.add_argument("--seeds", help="comma-separated or a range, e.g. 0,1,2 or 0-4 (default: 0)")
  grid.add_argument("--extra", action="append", default=[], metavar="KEY=VALUE,...",
                    help="config arguments for every run, e.g. smoke or epochs=2,batch=128")
  grid.add_argument("--main-flag", action="append", default=[], metavar="FLAG",
                    help="a flag passed to every featdiv_jax.main, e.g. "
                         "--main-flag=--config.dataset.data_dir=/data/tfds (repeatable)")
  p = argparse.ArgumentParser(
      prog="python -m featdiv_jax.sweep", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="action", required=True, metavar="{plan,status,run,commands,prepare}")
  sub.add_parser("plan", parents=[grid], help="write/extend SWEEP_DIR/sweep.json")
  sub.add_parser("status", parents=[grid], help="finished / in progress / not started per run "
                 "(all runs of sweep.json when no grid option is given)")
  r = sub.add_parser("run", parents=[grid], help="plan, then run locally one after another")
  r.add_argument("--keep-going", action="store_true", help="continue after a failed run")
  c = sub.add_parser("commands", parents=[grid], help="print one shell command per run")
  c.add_argument("--python", default="python", help="interpreter in the printed commands")
  c.add_argument("--prefix", default="", help="put before each command, e.g. 'srun -N2'")
  c.add_argument("--pending", action="store_true", help="only runs that are not finished")
  c.add_argument("--absolute", action="store_true",
                 help="absolute workdirs (default: under --sweep-dir as given); the config "
                      "paths are relative to the repository root: run the commands from there")
  d = sub.add_parser("prepare", parents=[grid], help="download + prepare the grid's TFDS data")
  d.add_argument("--data-dir", default="", help="TFDS data dir ('' = TFDS default)")
  return p


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = build_parser().parse_args(argv)
  grid_given = any(v is not None for v in (args.datasets, args.variants, args.archs, args.seeds))
  try:
    plan = load_plan(args.sweep_dir)
    if args.action == "status" and not grid_given and plan is not None:
      runs = plan["runs"]
    else:
      runs = expand(args.sweep_dir, args.datasets or "digits",
                    args.variants or ",".join(configlib.VARIANTS), args.archs or "seresnet18",
                    args.seeds or "0", args.extra, args.main_flag,
                    python=getattr(args, "python", "python"),
                    absolute=args.action != "commands" or args.absolute)
  except SweepError as e:
    print(f"featdiv_jax.sweep: error: {e}", file=sys.stderr)
    return 2
  except (OSError, ValueError) as e:  # an unreadable sweep.json
    print(f"featdiv_jax.sweep: error: {type(e).__name__}: {e}", file=sys.stderr)
    return 2
  if args.action == "plan":
    plan = write_plan(args.sweep_dir, runs, argv)
    log(f"{len(runs)} runs in this grid, {len(plan['runs'])} in "
        f"{os.path.join(args.sweep_dir, SWEEP_FILE)}")
    return 0
  if args.action == "status":
    print_status(args.sweep_dir, runs)
    return 0
  if args.action == "commands":
    prefix = shlex.split(args.prefix)
    for r in runs:
      if args.pending and run_state(os.path.join(args.sweep_dir, r["workdir"])) == "finished":
        continue
      print(shlex.join(prefix + r["command"]))
    return 0
  if args.action == "prepare":
    return prepare(runs, args.data_dir)
  write_plan(args.sweep_dir, runs, argv)
  log(f"{len(runs)} runs in {os.path.abspath(args.sweep_dir)}")
  return run_sweep(args.sweep_dir, runs, keep_going=args.keep_going)


if __name__ == "__main__":
  sys.exit(main())
