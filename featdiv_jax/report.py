r"""Sweep report: figures and a markdown table from the results.json files of many runs.

  python -m featdiv_jax.report SWEEP_DIR [WORKDIR ...] [--out DIR]

Reads every `results.json` found recursively under the given directories (a sweep directory, or
single run workdirs; the same file reached twice counts once) and writes into `--out` (default:
the first directory):

- `comparison.png`: best test accuracy per variant, grouped by (data set, protocol, arch): mean
  bar, std error bar over finished seeds, every seed as a dot (hollow: still running), the
  paper's published number as a star where there is one.
- `curves.png`: eval accuracy against epoch per variant (mean line, min-max band over seeds).
- `diversity.png`: mean off-diagonal cosine between heads against epoch (multi vs multi_cos) and
  the final K x K head-cosine matrix, averaged over seeds, for each multi-head variant.
- `report.md`: one table per (data set, protocol, arch), the paired multi_cos - multi comparison
  across seeds (scipy.stats.ttest_rel), the paper's published numbers where the data set is one
  of the paper's, and a closing "Missing / in progress" section.

A run is (data set, protocol, arch, variant, seed), the protocol (configlib's `protocol`) read
from results.json's config, "scratch" where an older file has none: a multi_cos trained from
scratch and one whose head 0 came from a trained single run (pretrained_head) are different
experiments, so they are never merged or paired, and each protocol gets its own sections
(titled with the protocol where it is not scratch) and plot groups.

Partial sweeps are fine: runs with `finished: false` are counted as running and kept out of the
statistics (their current best is listed). A `sweep.json` at the top of a given directory lists
the planned runs, `{"runs": [{"dataset", "protocol", "arch", "variant", "seed", "workdir"},
...]}` (missing keys are tolerated, a missing protocol is scratch; featdiv_jax.sweepfile reads
it); a planned run with no results.json of its protocol is reported missing. Without one, a
variant lacking a seed that another variant of the same (data set, protocol, arch) has is
reported missing.

Exit status: 0, or 2 with one line on stderr when no results.json can be read. Reads JSON only:
imports neither jax nor TensorFlow, so it runs anywhere.
"""

import argparse
import dataclasses
import math
import os
import sys
from typing import Callable, NamedTuple, Optional

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from scipy import stats

from featdiv_jax import files
from featdiv_jax import sweepfile

VARIANT_ORDER = ("single", "multi", "multi_cos")  # configlib.VARIANTS, without importing it
COLORS = {"single": "tab:blue", "multi": "tab:orange", "multi_cos": "tab:green"}
ALPHA = 0.05  # significance level of the paired t-test
PUBLISHED_LABEL = "published (paper's PyTorch code, single run)"
SCRATCH = sweepfile.SCRATCH  # the protocol of a results.json whose config names none
# The protocol of the paper's notebooks, which produced PUBLISHED (docs/reference.md, "How the
# published numbers were produced"): its numbers are shown next to every protocol's rows, and
# labelled with it next to the others'.
PUBLISHED_PROTOCOL = "pretrained_head"

# Published best test accuracy (%) of the paper's PyTorch code, one run each, no seeds; from
# docs/reference.md, section "Published best test accuracy (%)". Keys are our TFDS data set
# names and (variant, arch); the paper's multi-head models have 2 heads ("2 heads + cosine" is
# multi_cos, "2 heads, no constraint" is multi). `digits` is not in the paper.
PUBLISHED = {
    "cifar10": {
        ("multi_cos", "seresnet18"): 77.11, ("multi", "seresnet18"): 76.97,
        ("multi_cos", "seresnet34"): 77.83, ("multi", "seresnet34"): 77.70,
        ("single", "seresnet34"): 76.45, ("single", "seresnet50"): 77.23,
        ("single", "seresnet101"): 77.38, ("single", "seresnet152"): 77.88},
    "caltech101": {
        ("multi_cos", "seresnet18"): 73.04, ("multi", "seresnet18"): 71.89,
        ("multi_cos", "seresnet34"): 73.24, ("multi", "seresnet34"): 72.49,
        ("single", "seresnet34"): 72.06, ("single", "seresnet50"): 72.24,
        ("single", "seresnet101"): 72.52, ("single", "seresnet152"): 72.98},
    "oxford_flowers102": {
        ("multi_cos", "seresnet18"): 45.98, ("multi", "seresnet18"): 45.20,
        ("multi_cos", "seresnet34"): 47.35, ("multi", "seresnet34"): 47.06,
        ("single", "seresnet34"): 41.57, ("single", "seresnet50"): 42.25,
        ("single", "seresnet101"): 45.29, ("single", "seresnet152"): 45.39},
}
PAPER_NAMES = {"cifar10": "CIFAR-10", "caltech101": "Caltech-101",
               "oxford_flowers102": "Flowers-102"}

FIGURES = ("comparison.png", "curves.png", "diversity.png")
DPI = 100


class ReportError(Exception):
  """Nothing to report: one line for the user, no traceback."""


# ----------------------------------------------------------------------------- records


@dataclasses.dataclass
class Run:
  """One run's results.json, reduced to what the report uses. Accuracies are fractions."""
  path: str
  dataset: str
  arch: str
  variant: str
  seed: object
  num_heads: Optional[int]
  finished: bool
  best: Optional[float]
  final: Optional[float]
  epochs: list
  accuracies: list
  head_cosines: list  # per eval; None for one head
  head_cosine_matrix: Optional[list]  # K x K, at the last eval
  num_params: Optional[int]
  images_per_s: Optional[float]
  step: int
  total_steps: Optional[int]
  steps_per_epoch: Optional[int]
  smoke: bool = False
  protocol: str = SCRATCH  # part of the identity: the same seed under two protocols is two runs

  @property
  def group(self) -> tuple:
    return (self.dataset, self.protocol, self.arch)

  @property
  def key(self) -> tuple:
    return (self.dataset, self.protocol, self.arch, self.variant, self.seed)

  @property
  def workdir(self) -> str:
    return os.path.dirname(self.path)

  @property
  def final_head_cosine(self) -> Optional[float]:
    return self.head_cosines[-1] if self.head_cosines else None

  def progress(self) -> str:
    """'step 300/1000 (epoch 3.0 of 10.0)'."""
    total = "?" if self.total_steps is None else self.total_steps
    text = f"step {self.step}/{total}"
    if self.steps_per_epoch:
      of = "" if self.total_steps is None else f" of {self.total_steps / self.steps_per_epoch:.1f}"
      text += f" (epoch {self.step / self.steps_per_epoch:.1f}{of})"
    return text

  def current_best(self) -> str:
    """'current best 76.20' (%), or 'no eval yet'."""
    return "no eval yet" if self.best is None else f"current best {100 * self.best:.2f}"


PLANNED, INFERRED = "sweep.json", "inferred"  # where a MissingRun comes from


@dataclasses.dataclass(frozen=True)
class MissingRun:
  """A run with no results.json: planned in sweep.json (PLANNED), or lacking a seed that other
  variants of its (dataset, protocol, arch) have (INFERRED, without a sweep.json)."""
  dataset: Optional[str]
  arch: Optional[str]
  variant: Optional[str]
  seed: Optional[sweepfile.Seed]
  workdir: Optional[str]
  source: str
  protocol: str = SCRATCH


class MeanStd(NamedTuple):
  """Over some runs: mean, sample std (ddof=1; None when n < 2) and n."""
  mean: Optional[float]
  std: Optional[float]
  n: int


@dataclasses.dataclass(frozen=True)
class PairedComparison:
  """b - a on one metric in % points, paired by seed over finished runs."""
  a: str
  b: str
  metric: str  # 'best' or 'final'
  seeds: tuple  # the paired seeds
  unpaired: tuple  # 'variant seed S (why)' for each seed left out of the pairing
  mean: Optional[float] = None  # of the differences
  std: Optional[float] = None  # of the differences
  t: Optional[float] = None  # of the paired t-test; t and p are None where no test is possible
  p: Optional[float] = None  # two-sided
  reason: Optional[str] = None  # why there is no test

  @property
  def n(self) -> int:
    return len(self.seeds)


@dataclasses.dataclass(frozen=True)
class Row:
  """One variant's line in the table of a (dataset, arch). Accuracies in %."""
  variant: str
  heads: tuple  # the distinct num_heads of its runs
  params: tuple  # the distinct num_params of its runs
  best: MeanStd  # over finished runs
  final: MeanStd  # over finished runs
  finished: int
  found: int
  planned: Optional[int]  # None without a sweep.json
  running_runs: tuple  # kept out of the statistics
  images_per_s: Optional[float]  # mean over all found runs
  head_cosine: Optional[float]  # at the last eval, mean over finished runs
  smoke: bool
  published: Optional[float]  # the paper's number for this variant and arch

  @property
  def running(self) -> int:
    return len(self.running_runs)


@dataclasses.dataclass(frozen=True)
class GroupSummary:
  """The report's section of one (dataset, protocol, arch)."""
  dataset: str
  arch: str
  rows: tuple  # one Row per variant, in VARIANT_ORDER
  paired: tuple  # PairedComparison of multi_cos - multi on best, then final accuracy
  published: Optional[dict]  # PUBLISHED[dataset], where the data set is one of the paper's
  protocol: str = SCRATCH

  @property
  def key(self) -> tuple:
    return (self.dataset, self.protocol, self.arch)

  @property
  def title(self) -> str:
    """'cifar10 / seresnet18', with ' / pretrained_head' when the protocol is not scratch."""
    return group_title(self.key)

  @property
  def has_pair(self) -> bool:
    """Whether multi and multi_cos are both there, so that the paired comparison applies."""
    return {"multi", "multi_cos"} <= {row.variant for row in self.rows}


# ----------------------------------------------------------------------------- loading


def _seed_sort(seed):
  return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def group_sort(group: tuple):
  """(dataset, protocol, arch) in order, scratch before the other protocols of a data set."""
  dataset, protocol, arch = group
  return (dataset, protocol != SCRATCH, protocol, arch)


def group_title(group: tuple, sep: str = " / ") -> str:
  """'cifar10 / seresnet18' for a scratch group, 'cifar10 / seresnet18 / pretrained_head' else:
  sweeps from before protocols read as they always did."""
  dataset, protocol, arch = group
  return sep.join([dataset, arch] + ([] if protocol == SCRATCH else [protocol]))


def run_title(run) -> str:
  """'cifar10 / seresnet18 / multi', with the protocol before the variant where not scratch; of
  a Run or a MissingRun ('?' for what a planned run does not name)."""
  names = [run.dataset, run.arch] + ([] if run.protocol == SCRATCH else [run.protocol])
  return " / ".join("?" if name is None else str(name) for name in names + [run.variant])


def variant_sort(variant: str):
  return (VARIANT_ORDER.index(variant), "") if variant in VARIANT_ORDER else (len(VARIANT_ORDER),
                                                                             variant)


def _number(x, name: str, kind=float):
  if x is None:
    return None
  if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
    raise ValueError(f"{name} is {x!r}, not a finite number")
  return kind(x)


def _identity(data) -> tuple:
  """(config, dataset, protocol, arch, variant, seed) of a parsed results.json; ValueError when
  one is missing or of the wrong type. Files written before the protocol existed are scratch."""
  if not isinstance(data, dict):
    raise ValueError(f"expected a JSON object, got {type(data).__name__}")
  config = data.get("config")
  if not isinstance(config, dict):
    raise ValueError("no 'config' object")
  try:
    dataset = config["dataset"]["name"]
    arch = config["model"]["arch"]
  except (KeyError, TypeError) as e:
    raise ValueError(f"config lacks dataset.name or model.arch ({e})") from None
  variant = data.get("variant", config.get("variant"))
  if not all(isinstance(v, str) and v for v in (dataset, arch, variant)):
    raise ValueError("dataset name, arch or variant missing or not a string")
  seed = sweepfile.norm_seed(config.get("seed"))
  if "seed" not in config or not isinstance(seed, (int, str)):
    raise ValueError(f"config.seed is {config.get('seed')!r}, not an integer or string")
  protocol = config.get("protocol")
  protocol = SCRATCH if protocol is None else protocol
  if not isinstance(protocol, str) or not protocol:
    raise ValueError(f"config.protocol is {protocol!r}, not a string")
  return config, dataset, protocol, arch, variant, seed


def _history(data, steps_per_epoch: Optional[int]) -> tuple:
  """(epochs, eval accuracies, eval head cosines) from a parsed results.json's history."""
  history = data.get("history", [])
  if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
    raise ValueError("history is not a list of objects")
  epochs, accuracies, cosines = [], [], []
  for i, entry in enumerate(history):
    accuracy = _number(entry.get("eval_accuracy"), f"history[{i}].eval_accuracy")
    if accuracy is None:
      raise ValueError(f"history[{i}] has no eval_accuracy")
    epoch = _number(entry.get("epoch"), f"history[{i}].epoch")
    if epoch is None:  # older files: the epoch from the step
      step = _number(entry.get("step"), f"history[{i}].step") or 0
      epoch = step / steps_per_epoch if steps_per_epoch else step
    epochs.append(epoch)
    accuracies.append(accuracy)
    cosines.append(_number(entry.get("eval_head_cosine"), f"history[{i}].eval_head_cosine"))
  return epochs, accuracies, cosines


def _head_cosine_matrix(data) -> Optional[list]:
  matrix = data.get("eval_head_cosine_matrix")
  if matrix is not None:
    shape = np.asarray(matrix, dtype=float).shape
    if len(shape) != 2 or shape[0] != shape[1]:
      raise ValueError(f"eval_head_cosine_matrix has shape {shape}, not K x K")
  return matrix


def parse_results(data, path: str) -> Run:
  """A Run from a parsed results.json; ValueError (with the reason) when it is not one."""
  config, dataset, protocol, arch, variant, seed = _identity(data)
  steps_per_epoch = _number(data.get("steps_per_epoch"), "steps_per_epoch", int)
  epochs, accuracies, cosines = _history(data, steps_per_epoch)
  best = _number(data.get("best_eval_accuracy"), "best_eval_accuracy")
  final = _number(data.get("final_eval_accuracy"), "final_eval_accuracy")
  heads = config.get("model", {}).get("num_heads")
  return Run(
      path=path, dataset=dataset, protocol=protocol, arch=arch, variant=variant, seed=seed,
      num_heads=None if heads is None else int(heads), finished=bool(data.get("finished")),
      best=best if best is not None else max(accuracies, default=None),
      final=final if final is not None else (accuracies[-1] if accuracies else None),
      epochs=epochs, accuracies=accuracies, head_cosines=cosines,
      head_cosine_matrix=_head_cosine_matrix(data),
      num_params=_number(data.get("num_params"), "num_params", int),
      images_per_s=_number(data.get("train_images_per_s"), "train_images_per_s"),
      step=_number(data.get("step"), "step", int) or 0,
      total_steps=_number(data.get("total_steps"), "total_steps", int),
      steps_per_epoch=steps_per_epoch, smoke=bool(config.get("smoke", False)))


def find_results(dirs) -> list:
  """Every results.json under `dirs`, each file once (by real path), in a stable order."""
  seen, found = set(), []
  for top in dirs:
    for root, subdirs, names in os.walk(top):
      subdirs[:] = sorted(d for d in subdirs if d != "checkpoints")  # orbax trees: no results
      if "results.json" in names:
        path = os.path.join(root, "results.json")
        real = os.path.realpath(path)
        if real not in seen:
          seen.add(real)
          found.append(path)
  return found


def _better(a: Run, b: Run) -> Run:
  """Of two results.json of the same run key, the finished / further one."""
  return max((a, b), key=lambda r: (r.finished, r.step, len(r.accuracies)))


def load_runs(paths, warn: Callable[[str], None]) -> list:
  """Runs from results.json paths; malformed files and duplicates are warned about, skipped."""
  by_key = {}
  for path in paths:
    try:
      run = parse_results(files.read_json(path), path)
    except (OSError, ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
      warn(f"warning: skipping {path}: {e}")
      continue
    old = by_key.get(run.key)
    if old is not None:
      keep = _better(old, run)
      warn(f"warning: {old.path} and {run.path} are the same run "
           f"{'/'.join(map(str, run.key))}; using {keep.path}")
      run = keep
    by_key[run.key] = run
  return sorted(by_key.values(), key=lambda r: (group_sort(r.group), variant_sort(r.variant),
                                                _seed_sort(r.seed)))


def is_done_by(planned: sweepfile.PlannedRun, run: Run) -> bool:
  """A planned run is done by `run` when its protocol and every one of dataset/arch/variant/seed
  it names agree (or, naming none of these, when `run` lives in its workdir): a scratch result
  does not do a planned pretrained_head run, nor the other way round."""
  wanted = (planned.dataset, planned.arch, planned.variant, planned.seed)
  if any(value is not None for value in wanted):
    return planned.protocol == run.protocol and all(
        value is None or value == actual
        for value, actual in zip(wanted, (run.dataset, run.arch, run.variant, run.seed)))
  workdir = os.path.realpath(planned.workdir)
  here = os.path.realpath(run.workdir)
  return here == workdir or here.startswith(workdir + os.sep)


def missing_runs(runs, plan: Optional[list]) -> list:
  """MissingRuns: the planned runs (PlannedRuns of sweep.json) that no results.json does, or,
  without a plan, within each (dataset, protocol, arch) a variant lacking a seed that another
  has."""
  if plan is not None:
    return [MissingRun(**dataclasses.asdict(planned), source=PLANNED) for planned in plan
            if not any(is_done_by(planned, run) for run in runs)]
  missing = []
  for group in sorted({r.group for r in runs}, key=group_sort):
    members = [r for r in runs if r.group == group]
    seeds = sorted({r.seed for r in members}, key=_seed_sort)
    dataset, protocol, arch = group
    for variant in sorted({r.variant for r in members}, key=variant_sort):
      have = {r.seed for r in members if r.variant == variant}
      missing += [MissingRun(dataset=dataset, protocol=protocol, arch=arch, variant=variant,
                             seed=seed, workdir=None, source=INFERRED)
                  for seed in seeds if seed not in have]
  return missing


# ----------------------------------------------------------------------------- aggregation


def mean_std(values) -> MeanStd:
  """Mean, sample std (ddof=1; None when n < 2) and n of the values that are not None."""
  values = [v for v in values if v is not None]
  if not values:
    return MeanStd(None, None, 0)
  array = np.asarray(values, dtype=float)
  return MeanStd(float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else None,
                 int(array.size))


def _pair_by_seed(runs, group: tuple, metric: str, a: str, b: str) -> tuple:
  """([(seed, a's metric in %, b's metric in %)], ['variant seed S (why)' per seed left out])
  over the seeds of `group` that either variant has."""
  def by_seed(variant):
    return {r.seed: r for r in runs if r.group == group and r.variant == variant}
  runs_a, runs_b = by_seed(a), by_seed(b)
  pairs, unpaired = [], []
  for seed in sorted(set(runs_a) | set(runs_b), key=_seed_sort):
    run_a, run_b = runs_a.get(seed), runs_b.get(seed)
    if run_a is None or run_b is None:
      have, lacking = (a, b) if run_a is not None else (b, a)
      unpaired.append(f"{have} seed {seed} (no {lacking} run)")
    elif not (run_a.finished and run_b.finished):
      running = [r.variant for r in (run_a, run_b) if not r.finished]
      unpaired.append(f"seed {seed} ({' and '.join(running)} still running)")
    elif getattr(run_a, metric) is None or getattr(run_b, metric) is None:
      unpaired.append(f"seed {seed} (no eval yet)")
    else:
      pairs.append((seed, 100 * getattr(run_a, metric), 100 * getattr(run_b, metric)))
  return pairs, unpaired


def _paired_test(untested: PairedComparison, values_a, values_b) -> PairedComparison:
  """`untested` with the statistics of values_b - values_a, or the reason there is no test."""
  if not len(values_a):
    return dataclasses.replace(untested, reason="no seed with finished runs of both")
  diffs = values_b - values_a
  result = dataclasses.replace(untested, mean=float(diffs.mean()))
  if len(diffs) < 2:
    return dataclasses.replace(result, reason="n=1 pair: a paired t-test needs n>=2")
  result = dataclasses.replace(result, std=float(diffs.std(ddof=1)))
  if result.std <= 1e-9 * max(1.0, abs(result.mean)):
    return dataclasses.replace(result,
                               reason="every difference is the same: std of differences is 0")
  t, p = stats.ttest_rel(values_b, values_a)
  return dataclasses.replace(result, t=float(t), p=float(p))


def paired_comparison(runs, group: tuple, metric: str, a: str = "multi",
                      b: str = "multi_cos") -> PairedComparison:
  """b - a on `metric` ('best' or 'final', in % points), paired by seed over finished runs of
  `group` (dataset, protocol, arch), with a paired t-test where one is possible. A (dataset,
  arch) pair, as groups were before protocols, names the scratch group."""
  if len(group) == 2:
    group = (group[0], SCRATCH, group[1])
  pairs, unpaired = _pair_by_seed(runs, group, metric, a, b)
  untested = PairedComparison(a=a, b=b, metric=metric, seeds=tuple(s for s, _, _ in pairs),
                              unpaired=tuple(unpaired))
  return _paired_test(untested, np.array([x for _, x, _ in pairs]),
                      np.array([y for _, _, y in pairs]))


def summarize(group: tuple, variant: str, runs: list, planned: Optional[int]) -> Row:
  """The table row of `variant` in `group` (dataset, protocol, arch), from that variant's runs.
  `published` is the paper's number for the variant and arch, whatever the protocol (the table
  labels it with PUBLISHED_PROTOCOL where that is not the group's)."""
  dataset, _, arch = group
  finished = [r for r in runs if r.finished]
  return Row(
      variant=variant,
      heads=tuple(sorted({r.num_heads for r in runs if r.num_heads is not None})),
      params=tuple(sorted({r.num_params for r in runs if r.num_params is not None})),
      best=mean_std([100 * r.best for r in finished if r.best is not None]),
      final=mean_std([100 * r.final for r in finished if r.final is not None]),
      finished=len(finished), found=len(runs), planned=planned,
      running_runs=tuple(r for r in runs if not r.finished),
      images_per_s=mean_std([r.images_per_s for r in runs]).mean,
      head_cosine=mean_std([r.final_head_cosine for r in finished]).mean,
      smoke=any(r.smoke for r in runs),
      published=PUBLISHED.get(dataset, {}).get((variant, arch)))


def _planned_counts(plan: list) -> dict:
  """{(dataset, protocol, arch, variant): number of planned runs}, over the planned runs naming
  dataset, arch and variant (the protocol always has a value)."""
  counts = {}
  for planned in plan:
    key = (planned.dataset, planned.protocol, planned.arch, planned.variant)
    if None not in key:
      counts[key] = counts.get(key, 0) + 1
  return counts


def aggregate(runs, plan: Optional[list] = None) -> list:
  """The report's table: a GroupSummary per (dataset, protocol, arch), sorted (`group_sort`),
  with a Row per variant found or planned (`plan`: PlannedRuns, or None without a sweep.json)."""
  planned = _planned_counts(plan or [])
  table = []
  for group in sorted({r.group for r in runs} | {key[:3] for key in planned}, key=group_sort):
    members = [r for r in runs if r.group == group]
    variants = sorted({r.variant for r in members}
                      | {key[3] for key in planned if key[:3] == group}, key=variant_sort)
    rows = tuple(summarize(group, v, [r for r in members if r.variant == v],
                           planned.get(group + (v,)) if plan is not None else None)
                 for v in variants)
    dataset, protocol, arch = group
    table.append(GroupSummary(
        dataset=dataset, protocol=protocol, arch=arch, rows=rows,
        paired=tuple(paired_comparison(runs, group, metric) for metric in ("best", "final")),
        published=PUBLISHED.get(dataset)))
  return table


# ----------------------------------------------------------------------------- figures


def _panel_grid(n: int, width: float = 4.0, height: float = 3.0, cols_max: int = 3):
  cols = max(1, min(n, cols_max))
  rows = max(1, math.ceil(n / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), dpi=DPI,
                           squeeze=False)
  for ax in axes.flat[n:]:
    ax.axis("off")
  return fig, list(axes.flat)


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=DPI)
  plt.close(fig)


def _by_epoch(series: list) -> tuple:
  """Mean, min and max over runs at each epoch any run has: series = [(epochs, values)]."""
  table = {}
  for epochs, values in series:
    for e, v in zip(epochs, values):
      if v is not None:
        table.setdefault(round(float(e), 6), []).append(v)
  xs = sorted(table)
  return (np.array(xs), np.array([np.mean(table[x]) for x in xs]),
          np.array([np.min(table[x]) for x in xs]), np.array([np.max(table[x]) for x in xs]))


def _line_with_band(ax, series, label, color, scale=1.0):
  x, mean, lo, hi = _by_epoch(series)
  if not len(x):
    return
  ax.plot(x, scale * mean, color=color, label=label, marker="." if len(x) < 15 else None)
  if len(series) > 1:
    ax.fill_between(x, scale * lo, scale * hi, color=color, alpha=0.2, linewidth=0)


def _legend_once(shown: set, key: str, label: str) -> Optional[str]:
  """`label` the first time a kind of mark (`key`) is drawn, then None: one legend entry each."""
  if key in shown:
    return None
  shown.add(key)
  return label


def _plot_variant(ax, x: float, width: float, row: Row, members: list, shown: set) -> None:
  """One variant of one group at `x`: mean ± std marker, a dot per seed, the published star."""
  color = COLORS.get(row.variant, "tab:gray")
  mean, std, _ = row.best
  label = _legend_once(shown, row.variant, row.variant)
  if mean is not None:  # a mean marker, not a bar: the differences are fractions of a point
    ax.errorbar(x, mean, yerr=std, fmt="_", markersize=22, markeredgewidth=2.5, color=color,
                ecolor="black", elinewidth=1, capsize=4, label=label, zorder=2)
  offsets = np.linspace(-width / 4, width / 4, len(members)) if len(members) > 1 else [0.0]
  for run, offset in zip(members, offsets):
    running = not run.finished
    ax.scatter(x + offset, 100 * run.best, s=14, zorder=3, edgecolors="black", linewidths=0.6,
               facecolors="none" if running else color,
               label=_legend_once(shown, "running", "seed, still running") if running else None)
  if row.published is not None:
    ax.scatter(x, row.published, marker="*", s=60, color="black", zorder=4,
               label=_legend_once(shown, "published",
                                  f"{PUBLISHED_LABEL}, protocol {PUBLISHED_PROTOCOL}"))


def plot_comparison(table: list, runs: list, path: str) -> None:
  """Best test accuracy per variant, grouped by (dataset, protocol, arch): mean, std, seeds,
  published.

  The y axis is scaled to the data (it does not start at 0), as the accuracies of the variants
  usually differ by less than a point."""
  fig, ax = plt.subplots(figsize=(min(16, 2.5 + 2.2 * max(1, len(table))), 3.6), dpi=DPI)
  shown = set()  # the kinds of mark already in the legend
  for group_index, group in enumerate(table):
    width = 0.8 / max(1, len(group.rows))
    for variant_index, row in enumerate(group.rows):
      members = [r for r in runs if r.group == group.key and r.variant == row.variant
                 and r.best is not None]
      _plot_variant(ax, group_index - 0.4 + width * (variant_index + 0.5), width, row, members,
                    shown)
  ax.set_xticks(range(len(table)))
  ax.set_xticklabels([group_title(group.key, sep="\n") for group in table], fontsize=8)
  ax.set_ylabel("best test accuracy (%)")
  ax.set_title("Best test accuracy: mean ± std, dots = seeds", fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  if shown:
    ax.legend(fontsize=7, loc="best")
  _save(fig, path)


def plot_curves(runs: list, path: str) -> None:
  """Eval accuracy against epoch: one panel per (dataset, protocol, arch), one line + band per
  variant."""
  groups = sorted({r.group for r in runs}, key=group_sort)
  fig, axes = _panel_grid(len(groups))
  for ax, group in zip(axes, groups):
    members = [r for r in runs if r.group == group]
    for variant in sorted({r.variant for r in members}, key=variant_sort):
      evaluated = [r for r in members if r.variant == variant and r.accuracies]
      n_running = sum(not r.finished for r in evaluated)
      label = f"{variant} (n={len(evaluated)}{f', {n_running} running' if n_running else ''})"
      _line_with_band(ax, [(r.epochs, r.accuracies) for r in evaluated], label,
                      COLORS.get(variant, "tab:gray"), scale=100)
    ax.set_title(group_title(group), fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("eval accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("Eval accuracy: mean over seeds, band = min-max", fontsize=9)
  _save(fig, path)


def _multihead_variants(members: list) -> list:
  return sorted({r.variant for r in members
                 if (r.num_heads or 1) > 1 or any(c is not None for c in r.head_cosines)},
                key=variant_sort)


def mean_matrix(members: list) -> tuple:
  """(mean K x K head-cosine matrix, n runs, note): over finished runs, else running ones; runs
  whose K differs from the most common K are left out."""
  finished = [r for r in members if r.finished and r.head_cosine_matrix is not None]
  used = finished or [r for r in members if r.head_cosine_matrix is not None]
  if not used:
    return None, 0, ""
  matrices = [np.asarray(r.head_cosine_matrix, dtype=float) for r in used]
  shapes = [m.shape for m in matrices]
  common = max(set(shapes), key=shapes.count)
  matrices = [m for m in matrices if m.shape == common]
  return np.mean(matrices, axis=0), len(matrices), ("finished" if finished else "running")


def _plot_head_cosines(ax, group: tuple, members: list, variants: list) -> None:
  """Mean cosine between heads against epoch, a line + band per multi-head variant."""
  for variant in variants:
    of_variant = [r for r in members if r.variant == variant]
    _line_with_band(ax, [(r.epochs, r.head_cosines) for r in of_variant],
                    f"{variant} (n={len(of_variant)})", COLORS.get(variant, "tab:gray"))
  ax.set_title(f"{group_title(group)}: mean cosine between heads", fontsize=9)
  ax.set_xlabel("epoch")
  ax.set_ylabel("eval head cosine")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def _plot_matrix(fig, ax, variant: str, members: list) -> None:
  """The variant's final K x K head-cosine matrix, averaged over runs, as a heatmap."""
  matrix, n, note = mean_matrix(members)
  if matrix is None:
    ax.axis("off")
    return
  image = ax.imshow(matrix, vmin=min(0.0, float(matrix.min())), vmax=1.0, cmap="viridis")
  num_heads = matrix.shape[0]
  if num_heads <= 6:  # numbers in the cells while they fit
    for i in range(num_heads):
      for j in range(num_heads):
        ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                color="white" if matrix[i, j] < 0.6 else "black")
  ax.set_xticks(range(num_heads))
  ax.set_yticks(range(num_heads))
  ax.set_xlabel("head")
  ax.set_ylabel("head")
  ax.set_title(f"{variant}: final head cosine (mean of {n} {note})", fontsize=8)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def _no_multihead_figure(path: str) -> None:
  fig, ax = plt.subplots(figsize=(4, 2), dpi=DPI)
  ax.axis("off")
  ax.text(0.5, 0.5, "no multi-head runs: no head cosine to show", ha="center", va="center")
  _save(fig, path)


def plot_diversity(runs: list, path: str) -> None:
  """Per (dataset, protocol, arch) with multi-head runs: head cosine vs epoch, and the mean
  final matrix of each multi-head variant as a heatmap."""
  members_of = {group: [r for r in runs if r.group == group] for group in {r.group for r in runs}}
  variants_of = {group: _multihead_variants(members) for group, members in members_of.items()}
  groups = [group for group in sorted(members_of, key=group_sort) if variants_of[group]]
  if not groups:
    _no_multihead_figure(path)
    return
  n_variants = max(len(variants_of[group]) for group in groups)
  fig, axes = plt.subplots(len(groups), 1 + n_variants,
                           figsize=(4 + 3.2 * n_variants, 3 * len(groups)), dpi=DPI,
                           squeeze=False)
  for row_axes, group in zip(axes, groups):
    members, variants = members_of[group], variants_of[group]
    _plot_head_cosines(row_axes[0], group, members, variants)
    for ax in row_axes[1 + len(variants):]:
      ax.axis("off")
    for ax, variant in zip(row_axes[1:], variants):
      _plot_matrix(fig, ax, variant, [r for r in members if r.variant == variant])
  _save(fig, path)


# ----------------------------------------------------------------------------- markdown


def fmt_pm(stat: tuple) -> str:
  """'76.20 ± 0.31' (n>=2), '76.20 (n=1)', or '–', from a MeanStd or (mean, std, n)."""
  mean, std, n = stat
  if n == 0:
    return "–"
  return f"{mean:.2f} (n=1)" if std is None else f"{mean:.2f} ± {std:.2f}"


def fmt_seeds(row: Row) -> str:
  text = f"{row.finished} finished"
  if row.running:
    text += f" + {row.running} running"
  text += f" / {row.found} found"
  if row.planned is not None:
    text += f" (of {row.planned} planned)"
  return text


def _fmt_list(values, fmt) -> str:
  if not values:
    return "–"
  return fmt(values[0]) if len(values) == 1 else f"{fmt(values[0])}–{fmt(values[-1])}"


def _fmt_p(p: float) -> str:
  return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def _fmt_optional(value: Optional[float], spec: str) -> str:
  return "–" if value is None else format(value, spec)


def paired_sentence(comparison: PairedComparison) -> str:
  """Plain words for one paired comparison."""
  what = f"{comparison.b} − {comparison.a} ({comparison.metric} accuracy)"
  n, mean, p = comparison.n, comparison.mean, comparison.p
  if n == 0:
    return f"{what}: no seed has finished runs of both, nothing to compare."
  if p is None:
    return (f"{what}: {mean:+.2f} points at n={n}; no test possible ({comparison.reason}), "
            "so no conclusion either way.")
  if p < ALPHA:
    direction = "higher" if mean > 0 else "lower"
    return (f"{what}: {comparison.b} is significantly {direction} than {comparison.a} at n={n} "
            f"(mean {mean:+.2f} points, paired t-test two-sided p={_fmt_p(p)} < {ALPHA}).")
  return (f"{what}: no significant difference at n={n} (mean {mean:+.2f} points, "
          f"paired t-test two-sided p={_fmt_p(p)} ≥ {ALPHA}).")


def _published_line(group: GroupSummary) -> str:
  """The paper's numbers for the group's data set, with the protocol that produced them."""
  numbers = PUBLISHED[group.dataset]
  parts = [f"{v} {a} {numbers[(v, a)]:.2f}" for v, a in
           sorted(numbers, key=lambda k: (variant_sort(k[0]), int(k[1].replace("seresnet", ""))))]
  text = (f"{PUBLISHED_LABEL}, {PAPER_NAMES[group.dataset]}, best test accuracy (%): "
          + ", ".join(parts) + ". The paper's multi and multi_cos models have 2 heads, head 0 "
          f"its trained single model, frozen (protocol {PUBLISHED_PROTOCOL}), with timm's "
          "ImageNet stem and its own recipe (docs/reference.md): ")
  if group.protocol != PUBLISHED_PROTOCOL:
    return text + (f"this section's runs are protocol {group.protocol}: compare protocols and "
                   "recipes before comparing numbers.")
  return text + "compare recipes before comparing numbers."


def _table_lines(group: GroupSummary) -> list:
  """The group's table: a line per variant."""
  published = group.published is not None
  header = ["variant", "heads", "best acc (%)", "final acc (%)", "seeds", "params", "images/s",
            "final head cos"]
  if published:  # the paper's numbers came from one protocol: say so next to another's rows
    header.append(f"{PUBLISHED_LABEL} (%)" if group.protocol == PUBLISHED_PROTOCOL
                  else f"{PUBLISHED_LABEL} (%), protocol {PUBLISHED_PROTOCOL}")
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in group.rows:
    cells = [row.variant, _fmt_list(row.heads, str), fmt_pm(row.best), fmt_pm(row.final),
             fmt_seeds(row), _fmt_list(row.params, "{:,}".format),
             _fmt_optional(row.images_per_s, ".0f"), _fmt_optional(row.head_cosine, ".3f")]
    if published:
      cells.append(_fmt_optional(row.published, ".2f"))
    lines.append("| " + " | ".join(cells) + " |")
  return lines + [""]


def _running_lines(group: GroupSummary) -> list:
  """A line per running run of the group, which the statistics leave out."""
  lines = [f"- running (not in the statistics): {row.variant} seed {run.seed}, "
           f"{run.progress()}, {run.current_best()}"
           for row in group.rows for run in row.running_runs]
  return lines + [""] if lines else []


def _paired_lines(group: GroupSummary) -> list:
  """The multi_cos - multi table and sentences (the group has both variants)."""
  lines = ["### multi_cos − multi, paired by seed", "",
           "| metric | mean diff (points) | std of diffs | n pairs | t | p (two-sided) |",
           "|---|---|---|---|---|---|"]
  for comparison in group.paired:
    if comparison.t is None:
      t = p = f"n/a ({comparison.reason})"
    else:
      t, p = f"{comparison.t:.3f}", _fmt_p(comparison.p)
    lines.append(f"| {comparison.metric} acc | {_fmt_optional(comparison.mean, '+.2f')} | "
                 f"{_fmt_optional(comparison.std, '.2f')} | {comparison.n} | {t} | {p} |")
  lines.append("")
  lines += [paired_sentence(comparison) for comparison in group.paired]
  unpaired = group.paired[0].unpaired
  if unpaired:
    lines.append("Left out of the pairing: " + "; ".join(unpaired) + ".")
  return lines + [""]


def render_group(group: GroupSummary) -> list:
  """Markdown lines of one (dataset, protocol, arch) section."""
  lines = [f"## {group.title}", ""]
  if any(row.smoke for row in group.rows):
    lines += ["**Includes smoke runs** (shrunk model, data and steps): not comparable.", ""]
  lines += _table_lines(group) + _running_lines(group)
  if group.published is not None:
    lines += [_published_line(group), ""]
  else:
    lines += [f"No published numbers: {group.dataset} is not one of the paper's data sets.", ""]
  if group.has_pair:
    lines += _paired_lines(group)
  return lines


def _fmt_missing(missing: MissingRun) -> str:
  text = f"- {run_title(missing)}, seed {'?' if missing.seed is None else missing.seed}"
  if missing.workdir:
    text += f" (workdir `{missing.workdir}`)"
  return text + (" — planned in sweep.json, no results.json" if missing.source == PLANNED
                 else " — inferred: other variants have this seed (no sweep.json)")


def _missing_section(runs: list, missing: list) -> list:
  """The closing "Missing / in progress" section: running runs, then missing runs."""
  running = [r for r in runs if not r.finished]
  lines = ["## Missing / in progress", ""]
  if not running and not missing:
    return lines + ["none", ""]
  lines += ["### In progress", ""]
  lines += [f"- {run_title(r)}, seed {r.seed}: {r.progress()}, "
            f"{r.current_best()} — `{r.path}`" for r in running] or ["none"]
  lines += ["", "### Missing runs", ""]
  lines += [_fmt_missing(m) for m in missing] or ["none"]
  return lines + [""]


def render_markdown(table: list, runs: list, missing: list, dirs: list,
                    plan: Optional[list]) -> str:
  """The whole report.md."""
  n_finished = sum(r.finished for r in runs)
  lines = ["# Sweep report", "",
           f"Sources: {', '.join(f'`{d}`' for d in dirs)}: {len(runs)} runs "
           f"({n_finished} finished, {len(runs) - n_finished} running); "
           + (f"sweep.json plans {len(plan)} runs." if plan is not None
              else "no sweep.json (missing runs are inferred)."),
           "",
           "Accuracy: test (eval split) accuracy in %, mean ± sample std (ddof=1) over the "
           "finished seeds; running runs are counted apart and kept out of the statistics. "
           "images/s: mean of train_images_per_s over all found runs. final head cos: mean "
           "off-diagonal cosine between heads at the last eval, mean over finished seeds. "
           "Figures: comparison.png, curves.png, diversity.png.", ""]
  for group in table:
    lines += render_group(group)
  return "\n".join(lines + _missing_section(runs, missing))


def summary_text(table: list, runs: list, missing: list, out: str) -> str:
  """A few lines for stdout."""
  lines = []
  for group in table:
    parts = [f"{row.variant} {fmt_pm(row.best)} ({fmt_seeds(row)})" for row in group.rows]
    lines.append(f"{group_title(group.key, sep='/')}: " + "; ".join(parts))
    if group.has_pair:
      lines.append("  " + paired_sentence(group.paired[0]))
  n_running = sum(not r.finished for r in runs)
  lines.append(f"{len(runs)} runs ({len(runs) - n_running} finished, {n_running} running), "
               f"{len(missing)} missing")
  lines.append(f"wrote {', '.join(os.path.join(out, f) for f in FIGURES + ('report.md',))}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m featdiv_jax.report",
                              description=__doc__.splitlines()[0])
  p.add_argument("dirs", nargs="+", metavar="DIR",
                 help="a sweep directory and/or run workdirs, searched for results.json")
  p.add_argument("--out", default=None, help="where to write (default: the first DIR)")
  return p.parse_args(argv)


def build(dirs: list, out: str, warn: Callable[[str], None]) -> str:
  """Reads, aggregates and writes everything; returns the stdout summary. ReportError when
  there is nothing to report."""
  for d in dirs:
    if not os.path.isdir(d):
      raise ReportError(f"not a directory: {d}")
  paths = find_results(dirs)
  where = ", ".join(dirs)
  if not paths:
    raise ReportError(f"no results.json found under {where}")
  runs = load_runs(paths, warn)
  if not runs:
    raise ReportError(f"no readable results.json under {where} ({len(paths)} skipped)")
  plan = sweepfile.planned_runs(dirs, warn)
  table = aggregate(runs, plan)
  missing = missing_runs(runs, plan)
  os.makedirs(out, exist_ok=True)
  plot_comparison(table, runs, os.path.join(out, "comparison.png"))
  plot_curves(runs, os.path.join(out, "curves.png"))
  plot_diversity(runs, os.path.join(out, "diversity.png"))
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(render_markdown(table, runs, missing, dirs, plan))
  return summary_text(table, runs, missing, out)


def main(argv=None) -> int:
  """`argv` without the program name; returns the exit status."""
  args = parse_args(argv)
  warn = lambda msg: print(msg, file=sys.stderr, flush=True)
  try:
    summary = build(args.dirs, args.out or args.dirs[0], warn)
  except ReportError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(summary, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
