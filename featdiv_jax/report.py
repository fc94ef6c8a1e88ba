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
- `heads.png`: per (data set, protocol, arch) with multi-head runs, whether the heads learn
  different, useful features: the final CKA between heads, each head's linear-probe accuracy
  and each head's ablation drop, per row (mean ± std, dots = seeds).
- `dose.png`, only where some group's multi_cos runs differ in penalty kind or weight: final
  accuracy, head cosine and head CKA against the penalty weight (symlog; weight 0 is the multi
  runs, shared by every kind), a line per kind.
- `report.md`: per (data set, protocol, arch) a table, a "Heads" table of the per-head measures,
  a "Dose" table where penalty settings differ, and the paired multi_cos - multi comparison
  across seeds (scipy.stats.ttest_rel) on accuracy and on the head measures; the paper's
  published numbers where the data set is one of the paper's; a "Parameter-matched" section
  where a multi-head model of one arch has about the parameters of a single model of another
  (the paper's two seresnet18 heads against one seresnet34); and a closing "Missing / in
  progress" section.

A run is (data set, protocol, arch, variant, seed), the protocol (configlib's `protocol`) read
from results.json's config, "scratch" where an older file has none: a multi_cos trained from
scratch and one whose head 0 came from a trained single run (pretrained_head) are different
experiments, so they are never merged or paired, and each protocol gets its own sections
(titled with the protocol where it is not scratch) and plot groups.

Penalty settings are not pooled either: a multi_cos run's config.penalty (kind, weight) is part
of its identity, and where the multi_cos runs of a group differ in it, each setting is its own
row, labelled `multi_cos cka w=0.1`, paired with multi on its own; where they share one, the row
is `multi_cos` as ever.

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
PENALISED = "multi_cos"  # the variant whose runs may differ in penalty kind and weight
COLORS = {"single": "tab:blue", "multi": "tab:orange", "multi_cos": "tab:green"}
# For the rows of multi_cos split by penalty setting, in the order of their labels.
SETTING_COLORS = ("tab:green", "tab:olive", "tab:cyan", "tab:purple", "tab:brown", "tab:pink",
                  "tab:red", "tab:gray")
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
# The penalty (kind, weight) of the paper's "2 heads + cosine" (docs/reference.md): the one
# multi_cos row split by setting that its published number is shown next to.
PUBLISHED_PENALTY = ("cos", 1.0)

# The paired multi_cos - multi comparisons, each on a Run attribute: (its label in the paired
# table, its words in a sentence). Every difference is in % points; CKA is scaled by 100 alike.
PAIRED_METRICS = {
    "best": ("best acc", "best accuracy"),
    "final": ("final acc", "final accuracy"),
    "final_head_cka": ("head CKA (×100)", "final head CKA ×100"),
    "mean_head_probe": ("mean head probe acc", "mean head probe accuracy"),
    "probe_all": ("all-heads probe acc", "all-heads probe accuracy"),
    "mean_ablation_drop": ("mean ablation drop", "mean head ablation drop"),
    "fused_gap": ("fused − best head", "fused − best single head probe gap"),
}
PARAMS_TOLERANCE = 0.2  # a multi-head and a single model are parameter-matched within ±20%

FIGURES = ("comparison.png", "curves.png", "diversity.png", "heads.png")  # always written
DOSE_FIGURE = "dose.png"  # written where some group has multi_cos rows split by setting
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
  # Per head: whether the heads learn different, useful features. None where a file (older,
  # or of one head) has no value.
  head_ckas: list = dataclasses.field(default_factory=list)  # per eval: mean off-diagonal CKA
  head_probe: Optional[list] = None  # per head: probe accuracy, at the last eval with a probe
  probe_all: Optional[float] = None  # the probe on all heads' features, at that eval
  head_drops: Optional[list] = None  # per head: accuracy lost without its map, at the last eval
  penalty_kind: Optional[str] = None  # config.penalty
  penalty_weight: Optional[float] = None
  # 'multi_cos cka w=0.1' where the multi_cos runs of its group differ in penalty (`label_rows`)
  setting_label: Optional[str] = None

  @property
  def group(self) -> tuple:
    return (self.dataset, self.protocol, self.arch)

  @property
  def key(self) -> tuple:
    """Its identity: (dataset, protocol, arch, variant, seed), and for a multi_cos run whose
    config names a penalty, its kind and weight: two settings at one seed are two runs."""
    setting = (self.penalty_kind, self.penalty_weight)
    named = self.variant == PENALISED and setting != (None, None)
    return (self.dataset, self.protocol, self.arch, self.variant, self.seed) + (
        setting if named else ())

  @property
  def workdir(self) -> str:
    return os.path.dirname(self.path)

  @property
  def arm(self) -> str:
    """The label of its row in its group's table: the variant, or its setting_label."""
    return self.setting_label or self.variant

  @property
  def arm_sort(self) -> tuple:
    """Its row's place in the table: by variant, then penalty kind and weight."""
    weight = -1.0 if self.penalty_weight is None else self.penalty_weight
    return (variant_sort(self.variant), self.penalty_kind or "", weight)

  @property
  def final_head_cosine(self) -> Optional[float]:
    return self.head_cosines[-1] if self.head_cosines else None

  @property
  def final_head_cka(self) -> Optional[float]:
    return self.head_ckas[-1] if self.head_ckas else None

  @property
  def mean_head_probe(self) -> Optional[float]:
    return float(np.mean(self.head_probe)) if self.head_probe else None

  @property
  def mean_ablation_drop(self) -> Optional[float]:
    return float(np.mean(self.head_drops)) if self.head_drops else None

  @property
  def fused_gap(self) -> Optional[float]:
    """The final accuracy of the whole model minus the best single head's probe accuracy."""
    if self.final is None or not self.head_probe:
      return None
    return self.final - max(self.head_probe)

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
  kind: Optional[str] = None      # the penalty setting a sweep's dose axes planned it with
  weight: Optional[float] = None


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
  metric: str  # a key of PAIRED_METRICS: 'best', 'final', 'final_head_cka', ...
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


class HeadMeasures(NamedTuple):
  """A row's per-head measures over its finished runs (Run's fields of the same names), each a
  MeanStd; accuracies and drops in %, CKA as it is."""
  cka: MeanStd  # final mean off-diagonal CKA between heads
  probe: tuple  # a MeanStd per head: probe accuracy
  probe_all: MeanStd  # the probe on all heads' features
  drops: tuple  # a MeanStd per head: ablation drop in points
  gap: MeanStd  # final accuracy - the best head's probe accuracy, in points


@dataclasses.dataclass(frozen=True)
class Row:
  """One line in the table of a (dataset, protocol, arch): a variant's runs, or a multi_cos
  penalty setting's where they differ (`label`). Accuracies in %."""
  variant: str
  label: str  # the variant, or 'multi_cos cka w=0.1' (Run.setting_label)
  setting: Optional[tuple]  # (penalty kind, weight) of a label that is a setting; None else
  heads: tuple  # the distinct num_heads of its runs
  params: tuple  # the distinct num_params of its runs
  best: MeanStd  # over finished runs
  final: MeanStd  # over finished runs
  finished: int
  found: int
  planned: Optional[int]  # None without a sweep.json
  running_runs: tuple  # kept out of the statistics
  images_per_s: Optional[float]  # mean over all found runs
  head_cosine: MeanStd  # at the last eval, over finished runs
  measures: HeadMeasures
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
  rows: tuple  # one Row per variant or setting, in VARIANT_ORDER, settings by kind and weight
  # Per multi_cos row, where there is a multi row: the PairedComparisons of that row - multi on
  # each of PAIRED_METRICS, in its order.
  paired: tuple
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
    return bool(self.paired)

  @property
  def dose(self) -> list:
    """[(penalty kind, weight, Row)] where the group's multi_cos rows are split by setting:
    the multi row at weight 0 (kind None: every kind's), then each setting; else []."""
    settings = [(*row.setting, row) for row in self.rows if row.setting is not None]
    if not settings:
      return []
    return [(None, 0.0, row) for row in self.rows if row.variant == "multi"] + settings


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


def _numbers(x, name: str) -> Optional[list]:
  """A non-empty list of finite numbers as floats, or None; ValueError when it is neither."""
  if x is None:
    return None
  if not isinstance(x, list) or not x or None in x:
    raise ValueError(f"{name} is {x!r}, not a list of numbers")
  return [_number(v, f"{name}[{i}]") for i, v in enumerate(x)]


def _history(data, steps_per_epoch: Optional[int]) -> dict:
  """The Run fields read from a parsed results.json's history: per eval the epoch, accuracy,
  head cosine and head CKA; the per-head probe accuracies of the last eval with a probe and the
  ablation drops of the last eval."""
  history = data.get("history", [])
  if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
    raise ValueError("history is not a list of objects")
  fields = dict(epochs=[], accuracies=[], head_cosines=[], head_ckas=[])
  for i, entry in enumerate(history):
    accuracy = _number(entry.get("eval_accuracy"), f"history[{i}].eval_accuracy")
    if accuracy is None:
      raise ValueError(f"history[{i}] has no eval_accuracy")
    epoch = _number(entry.get("epoch"), f"history[{i}].epoch")
    if epoch is None:  # older files: the epoch from the step
      step = _number(entry.get("step"), f"history[{i}].step") or 0
      epoch = step / steps_per_epoch if steps_per_epoch else step
    fields["epochs"].append(epoch)
    fields["accuracies"].append(accuracy)
    for field, key in (("head_cosines", "eval_head_cosine"), ("head_ckas", "eval_head_cka")):
      fields[field].append(_number(entry.get(key), f"history[{i}].{key}"))
  probed = [i for i, entry in enumerate(history)
            if entry.get("eval_head_probe_accuracy") is not None]
  if probed:
    i = probed[-1]
    fields["head_probe"] = _numbers(history[i]["eval_head_probe_accuracy"],
                                    f"history[{i}].eval_head_probe_accuracy")
    fields["probe_all"] = _number(history[i].get("eval_probe_all_accuracy"),
                                  f"history[{i}].eval_probe_all_accuracy")
  if history:
    fields["head_drops"] = _numbers(history[-1].get("eval_head_ablation_drop"),
                                    f"history[{len(history) - 1}].eval_head_ablation_drop")
  return fields


def _penalty(config: dict) -> tuple:
  """(kind, weight) of config.penalty; None for what it does not name (older files)."""
  penalty = config.get("penalty", {})
  if not isinstance(penalty, dict):
    raise ValueError(f"config.penalty is {penalty!r}, not an object")
  kind = penalty.get("kind")
  if not isinstance(kind, (str, type(None))):
    raise ValueError(f"config.penalty.kind is {kind!r}, not a string")
  return kind, _number(penalty.get("weight"), "config.penalty.weight")


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
  history = _history(data, steps_per_epoch)
  accuracies = history["accuracies"]
  best = _number(data.get("best_eval_accuracy"), "best_eval_accuracy")
  final = _number(data.get("final_eval_accuracy"), "final_eval_accuracy")
  heads = config.get("model", {}).get("num_heads")
  penalty_kind, penalty_weight = _penalty(config)
  return Run(
      path=path, dataset=dataset, protocol=protocol, arch=arch, variant=variant, seed=seed,
      num_heads=None if heads is None else int(heads), finished=bool(data.get("finished")),
      best=best if best is not None else max(accuracies, default=None),
      final=final if final is not None else (accuracies[-1] if accuracies else None),
      **history, penalty_kind=penalty_kind, penalty_weight=penalty_weight,
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
  runs = sorted(by_key.values(), key=lambda r: (group_sort(r.group), variant_sort(r.variant),
                                                _seed_sort(r.seed)))
  label_rows(runs)
  return runs


def setting_label(variant: str, kind: Optional[str], weight: Optional[float]) -> str:
  """'multi_cos cka w=0.1' (the weight as the sweep's workdirs write it), leaving out what is
  None."""
  return " ".join([variant] + ([kind] if kind else [])
                  + ([] if weight is None else [f"w={sweepfile.format_weight(weight)}"]))


def label_rows(runs: list) -> None:
  """Sets the setting_label of the multi_cos runs of every group whose multi_cos runs differ in
  penalty (kind, weight), so that each setting is a row of its own; clears it elsewhere."""
  for group in {r.group for r in runs}:
    penalised = [r for r in runs if r.group == group and r.variant == PENALISED]
    split = len({(r.penalty_kind, r.penalty_weight) for r in penalised}) > 1
    for r in penalised:
      r.setting_label = (setting_label(r.variant, r.penalty_kind, r.penalty_weight) if split
                         else None)


def arms_of(runs: list, variants=()) -> list:
  """The row labels (Run.arm) of `runs`, and `variants` that none of them has, in table order."""
  found = {r.variant for r in runs}
  sort_of = {v: (variant_sort(v), "", -1.0) for v in variants if v not in found}
  sort_of.update({r.arm: r.arm_sort for r in runs})
  return sorted(sort_of, key=sort_of.get)


def is_done_by(planned: sweepfile.PlannedRun, run: Run) -> bool:
  """A planned run is done by `run` when its protocol and every one of dataset/arch/variant/seed
  it names agree (or, naming none of these, when `run` lives in its workdir): a scratch result
  does not do a planned pretrained_head run, nor the other way round. A run the sweep's penalty
  axes planned (naming a kind and weight) is done only by a result of that config.penalty."""
  wanted = (planned.dataset, planned.arch, planned.variant, planned.seed)
  if any(value is not None for value in wanted):
    return planned.protocol == run.protocol and all(
        value is None or value == actual
        for value, actual in zip(wanted + (planned.kind, planned.weight),
                                 (run.dataset, run.arch, run.variant, run.seed,
                                  run.penalty_kind, run.penalty_weight)))
  workdir = os.path.realpath(planned.workdir)
  here = os.path.realpath(run.workdir)
  return here == workdir or here.startswith(workdir + os.sep)


def missing_runs(runs, plan: Optional[list]) -> list:
  """MissingRuns: the planned runs (PlannedRuns of sweep.json) that no results.json does, or,
  without a plan, within each (dataset, protocol, arch) a variant lacking a seed that another
  has."""
  if plan is not None:
    fields = {field.name for field in dataclasses.fields(MissingRun)}
    return [MissingRun(**{k: v for k, v in dataclasses.asdict(planned).items() if k in fields},
                       source=PLANNED) for planned in plan
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
  """([(seed, a's metric in %, b's metric in %)], ['row seed S (why)' per seed left out])
  over the seeds of `group` that either row (Run.arm) has."""
  def by_seed(arm):
    return {r.seed: r for r in runs if r.group == group and r.arm == arm}
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
    return dataclasses.replace(untested, reason="no seed with finished runs of both that have it")
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
  """b - a on `metric` (a key of PAIRED_METRICS, in % points), paired by seed over finished runs
  of `group` (dataset, protocol, arch), with a paired t-test where one is possible; a and b are
  row labels (Run.arm: a variant, or a multi_cos setting). A (dataset, arch) pair, as groups
  were before protocols, names the scratch group."""
  if len(group) == 2:
    group = (group[0], SCRATCH, group[1])
  pairs, unpaired = _pair_by_seed(runs, group, metric, a, b)
  untested = PairedComparison(a=a, b=b, metric=metric, seeds=tuple(s for s, _, _ in pairs),
                              unpaired=tuple(unpaired))
  return _paired_test(untested, np.array([x for _, x, _ in pairs]),
                      np.array([y for _, _, y in pairs]))


def percent(values) -> MeanStd:
  """mean_std of fractions, in %."""
  return mean_std([100 * v for v in values if v is not None])


def per_head(lists) -> tuple:
  """A MeanStd (in %) per head over runs' per-head lists of fractions (None: the run has none)."""
  lists = [values for values in lists if values]
  return tuple(percent([values[k] for values in lists if k < len(values)])
               for k in range(max(map(len, lists), default=0)))


def head_measures(finished: list) -> HeadMeasures:
  return HeadMeasures(cka=mean_std([r.final_head_cka for r in finished]),
                      probe=per_head([r.head_probe for r in finished]),
                      probe_all=percent([r.probe_all for r in finished]),
                      drops=per_head([r.head_drops for r in finished]),
                      gap=percent([r.fused_gap for r in finished]))


def summarize(group: tuple, label: str, runs: list, planned: Optional[dict]) -> Row:
  """The table row `label` in `group` (dataset, protocol, arch), from its runs (Run.arm ==
  label; a row with none is a planned variant); `planned`: `_planned_counts`, None without a
  sweep.json. `published` is the paper's number for the variant and arch, whatever the protocol
  (the table labels it with PUBLISHED_PROTOCOL where that is not the group's), and for a
  multi_cos setting only where that setting is the paper's."""
  dataset, _, arch = group
  variant = runs[0].variant if runs else label
  setting = (runs[0].penalty_kind, runs[0].penalty_weight) if label != variant else None
  finished = [r for r in runs if r.finished]
  published = PUBLISHED.get(dataset, {}).get((variant, arch))
  return Row(
      variant=variant, label=label, setting=setting,
      heads=tuple(sorted({r.num_heads for r in runs if r.num_heads is not None})),
      params=tuple(sorted({r.num_params for r in runs if r.num_params is not None})),
      best=percent([r.best for r in finished]),
      final=percent([r.final for r in finished]),
      finished=len(finished), found=len(runs),
      planned=None if planned is None else planned.get(group + (variant,) + (setting or ())),
      running_runs=tuple(r for r in runs if not r.finished),
      images_per_s=mean_std([r.images_per_s for r in runs]).mean,
      head_cosine=mean_std([r.final_head_cosine for r in finished]),
      measures=head_measures(finished),
      smoke=any(r.smoke for r in runs),
      published=published if setting in (None, PUBLISHED_PENALTY) else None)


def _planned_counts(plan: list) -> dict:
  """{(dataset, protocol, arch, variant): number of planned runs}, over the planned runs naming
  dataset, arch and variant (the protocol always has a value); and {(dataset, protocol, arch,
  variant, kind, weight): number} over those that also name a penalty kind and weight (the
  sweep's penalty axes), for the multi_cos rows split by setting."""
  counts = {}
  for planned in plan:
    key = (planned.dataset, planned.protocol, planned.arch, planned.variant)
    for k in (key, key + (planned.kind, planned.weight)):
      if None not in k:
        counts[k] = counts.get(k, 0) + 1
  return counts


def aggregate(runs, plan: Optional[list] = None) -> list:
  """The report's table: a GroupSummary per (dataset, protocol, arch), sorted (`group_sort`),
  with a Row per variant (or multi_cos setting) found or planned (`plan`: PlannedRuns, or None
  without a sweep.json)."""
  planned = _planned_counts(plan or [])
  table = []
  for group in sorted({r.group for r in runs} | {key[:3] for key in planned}, key=group_sort):
    members = [r for r in runs if r.group == group]
    rows = [summarize(group, label, [r for r in members if r.arm == label],
                      planned if plan is not None else None)
            for label in arms_of(members, [key[3] for key in planned if key[:3] == group])]
    dataset, protocol, arch = group
    has_multi = any(row.variant == "multi" for row in rows)
    table.append(GroupSummary(
        dataset=dataset, protocol=protocol, arch=arch, rows=tuple(rows),
        paired=tuple(tuple(paired_comparison(runs, group, metric, b=row.label)
                           for metric in PAIRED_METRICS)
                     for row in rows if row.variant == PENALISED and has_multi),
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


def arm_colors(labels) -> dict:
  """{row label: color}: a variant's own color, and SETTING_COLORS (cycled) for the multi_cos
  rows split by setting, in the order of their labels, so that every figure agrees."""
  settings = sorted({label for label in labels if label not in COLORS})
  return {label: COLORS.get(label) or SETTING_COLORS[settings.index(label) % len(SETTING_COLORS)]
          for label in labels}


def _mean_marker(ax, x: float, stat: MeanStd, color, label: Optional[str]) -> None:
  """A mean ± std marker (no std for n=1). A marker, not a bar: differences are fractions of
  a point."""
  if stat.mean is not None:
    ax.errorbar(x, stat.mean, yerr=stat.std, fmt="_", markersize=22, markeredgewidth=2.5,
                color=color, ecolor="black", elinewidth=1, capsize=4, label=label, zorder=2)


def _seed_dots(ax, x: float, width: float, values: list, color, hollow=None, label=None) -> None:
  """A dot per seed, spread over `width` around x; `hollow`: per value, whether to draw it
  hollow, and then `label` goes on the first hollow one."""
  hollow = hollow or [False] * len(values)
  offsets = np.linspace(-width / 4, width / 4, len(values)) if len(values) > 1 else [0.0]
  for value, offset, empty in zip(values, offsets, hollow):
    ax.scatter(x + offset, value, s=14, zorder=3, edgecolors="black", linewidths=0.6,
               facecolors="none" if empty else color, label=label if empty else None)
    label = None if empty else label


def _plot_variant(ax, x: float, width: float, row: Row, members: list, shown: set,
                  color) -> None:
  """One row of one group at `x`: mean ± std marker, a dot per seed, the published star."""
  _mean_marker(ax, x, row.best, color, _legend_once(shown, row.label, row.label))
  running = [not run.finished for run in members]
  _seed_dots(ax, x, width, [100 * run.best for run in members], color, running,
             _legend_once(shown, "running", "seed, still running") if any(running) else None)
  if row.published is not None:
    ax.scatter(x, row.published, marker="*", s=60, color="black", zorder=4,
               label=_legend_once(shown, "published",
                                  f"{PUBLISHED_LABEL}, protocol {PUBLISHED_PROTOCOL}"))


def plot_comparison(table: list, runs: list, path: str) -> None:
  """Best test accuracy per row, grouped by (dataset, protocol, arch): mean, std, seeds,
  published.

  The y axis is scaled to the data (it does not start at 0), as the accuracies of the variants
  usually differ by less than a point."""
  fig, ax = plt.subplots(figsize=(min(16, 2.5 + 2.2 * max(1, len(table))), 3.6), dpi=DPI)
  colors = arm_colors([row.label for group in table for row in group.rows])
  shown = set()  # the kinds of mark already in the legend
  for group_index, group in enumerate(table):
    width = 0.8 / max(1, len(group.rows))
    for variant_index, row in enumerate(group.rows):
      members = [r for r in runs if r.group == group.key and r.arm == row.label
                 and r.best is not None]
      _plot_variant(ax, group_index - 0.4 + width * (variant_index + 0.5), width, row, members,
                    shown, colors[row.label])
  ax.set_xticks(range(len(table)))
  ax.set_xticklabels([group_title(group.key, sep="\n") for group in table], fontsize=8)
  ax.set_ylabel("best test accuracy (%)")
  ax.set_title("Best test accuracy: mean ± std, dots = seeds", fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  if len(shown) > 5:  # rows split by penalty setting: beside the axes, not over the marks
    width, height = fig.get_size_inches()
    fig.set_size_inches(width + 3.5, height)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  elif shown:
    ax.legend(fontsize=7, loc="best")
  _save(fig, path)


def plot_curves(runs: list, path: str) -> None:
  """Eval accuracy against epoch: one panel per (dataset, protocol, arch), one line + band per
  row."""
  groups = sorted({r.group for r in runs}, key=group_sort)
  colors = arm_colors(arms_of(runs))
  fig, axes = _panel_grid(len(groups))
  for ax, group in zip(axes, groups):
    members = [r for r in runs if r.group == group]
    for arm in arms_of(members):
      evaluated = [r for r in members if r.arm == arm and r.accuracies]
      n_running = sum(not r.finished for r in evaluated)
      label = f"{arm} (n={len(evaluated)}{f', {n_running} running' if n_running else ''})"
      _line_with_band(ax, [(r.epochs, r.accuracies) for r in evaluated], label, colors[arm],
                      scale=100)
    ax.set_title(group_title(group), fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("eval accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle("Eval accuracy: mean over seeds, band = min-max", fontsize=9)
  _save(fig, path)


def _multihead_arms(members: list) -> list:
  return arms_of([r for r in members
                  if (r.num_heads or 1) > 1 or any(c is not None for c in r.head_cosines)])


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


def _plot_head_cosines(ax, group: tuple, members: list, arms: list, colors: dict) -> None:
  """Mean cosine between heads against epoch, a line + band per multi-head row."""
  for arm in arms:
    of_arm = [r for r in members if r.arm == arm]
    _line_with_band(ax, [(r.epochs, r.head_cosines) for r in of_arm],
                    f"{arm} (n={len(of_arm)})", colors[arm])
  ax.set_title(f"{group_title(group)}: mean cosine between heads", fontsize=9)
  ax.set_xlabel("epoch")
  ax.set_ylabel("eval head cosine")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)


def _plot_matrix(fig, ax, arm: str, members: list) -> None:
  """The row's final K x K head-cosine matrix, averaged over runs, as a heatmap."""
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
  ax.set_title(f"{arm}:\nfinal head cosine (mean of {n} {note})", fontsize=8)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)


def _no_multihead_figure(path: str, what: str) -> None:
  fig, ax = plt.subplots(figsize=(4, 2), dpi=DPI)
  ax.axis("off")
  ax.text(0.5, 0.5, f"no multi-head runs: no {what} to show", ha="center", va="center")
  _save(fig, path)


def _multihead_groups(runs: list) -> tuple:
  """([(dataset, protocol, arch) with multi-head runs], {group: its runs})."""
  members_of = {group: [r for r in runs if r.group == group] for group in {r.group for r in runs}}
  return ([group for group in sorted(members_of, key=group_sort)
           if _multihead_arms(members_of[group])], members_of)


def plot_diversity(runs: list, path: str) -> None:
  """Per (dataset, protocol, arch) with multi-head runs: head cosine vs epoch, and the mean
  final matrix of each multi-head row as a heatmap."""
  groups, members_of = _multihead_groups(runs)
  if not groups:
    _no_multihead_figure(path, "head cosine")
    return
  arms_of_group = {group: _multihead_arms(members_of[group]) for group in groups}
  colors = arm_colors(arms_of(runs))
  n_arms = max(map(len, arms_of_group.values()))
  fig, axes = plt.subplots(len(groups), 1 + n_arms,
                           figsize=(4 + 3.2 * n_arms, 3 * len(groups)), dpi=DPI, squeeze=False)
  for row_axes, group in zip(axes, groups):
    members, arms = members_of[group], arms_of_group[group]
    _plot_head_cosines(row_axes[0], group, members, arms, colors)
    for ax in row_axes[1 + len(arms):]:
      ax.axis("off")
    for ax, arm in zip(row_axes[1:], arms):
      _plot_matrix(fig, ax, arm, [r for r in members if r.arm == arm])
  _save(fig, path)


# The panels of heads.png: (title, y label, the values of a finished run: a list, one per head,
# or None; whether the values are per head).
HEAD_PANELS = (
    ("final CKA between heads", "head CKA",
     lambda r: None if r.final_head_cka is None else [r.final_head_cka], False),
    ("linear probe on each head", "probe accuracy (%)",
     lambda r: r.head_probe and [100 * v for v in r.head_probe], True),
    ("accuracy lost without each head", "ablation drop (points)",
     lambda r: r.head_drops and [100 * v for v in r.head_drops], True),
)


def _plot_head_panel(ax, members: list, colors: dict, panel: tuple) -> None:
  """One panel of heads.png: per row of the group (and per head), mean ± std and the seeds."""
  title, ylabel, values_of, by_head = panel
  ticks, tick_labels, x = [], [], 0.0
  for arm in arms_of(members):
    lists = [values_of(r) for r in members if r.arm == arm]
    lists = [values for values in lists if values]
    for k in range(max(map(len, lists), default=0)):
      values = [values[k] for values in lists if k < len(values)]
      _mean_marker(ax, x, mean_std(values), colors[arm], None if k else arm)
      _seed_dots(ax, x, 0.6, values, colors[arm])
      ticks.append(x)
      tick_labels.append(f"h{k}" if by_head else arm)
      x += 1.0
    x += 0.5 if lists else 0.0  # a gap between rows
  ax.set_xticks(ticks)
  ax.set_xticklabels(tick_labels, fontsize=7, rotation=0 if by_head else 20)
  ax.set_title(title, fontsize=9)
  ax.set_ylabel(ylabel)
  ax.grid(axis="y", alpha=0.3)
  if ticks:
    ax.legend(fontsize=6)
  else:
    ax.text(0.5, 0.5, "no values in these runs", ha="center", va="center",
            transform=ax.transAxes)


def plot_heads(runs: list, path: str) -> None:
  """Per (dataset, protocol, arch) with multi-head runs, over its finished runs: the final CKA
  between heads, each head's probe accuracy and each head's ablation drop, per row."""
  groups, members_of = _multihead_groups(runs)
  if not groups:
    _no_multihead_figure(path, "head measures")
    return
  colors = arm_colors(arms_of(runs))
  fig, axes = plt.subplots(len(groups), len(HEAD_PANELS), squeeze=False, dpi=DPI,
                           figsize=(4.5 * len(HEAD_PANELS), 3.2 * len(groups)))
  for row_axes, group in zip(axes, groups):
    finished = [r for r in members_of[group] if r.finished]
    for ax, panel in zip(row_axes, HEAD_PANELS):
      _plot_head_panel(ax, finished, colors, panel)
    row_axes[0].set_title(f"{group_title(group)}: {HEAD_PANELS[0][0]}", fontsize=9)
  fig.suptitle("Heads: mean ± std over finished seeds, dots = seeds", fontsize=9)
  _save(fig, path)


# The panels of dose.png and the columns of the Dose table: (title, the Row's MeanStd, format).
DOSE_MEASURES = (("final acc (%)", lambda row: row.final, ".2f"),
                 ("final head cos", lambda row: row.head_cosine, ".3f"),
                 ("final head CKA", lambda row: row.measures.cka, ".3f"))


def plot_dose(table: list, path: str) -> None:
  """Per group whose multi_cos rows are split by setting: each of DOSE_MEASURES against the
  penalty weight (symlog, so that 0 shows), a line per kind, error bars = std over seeds."""
  groups = [group for group in table if group.dose]
  fig, axes = plt.subplots(len(groups), len(DOSE_MEASURES), squeeze=False, dpi=DPI,
                           figsize=(4.5 * len(DOSE_MEASURES), 3.2 * len(groups)))
  for row_axes, group in zip(axes, groups):
    kinds = sorted({kind for kind, _, _ in group.dose if kind is not None})
    weights = [w for _, w, _ in group.dose if w]
    for ax, (title, stat_of, _) in zip(row_axes, DOSE_MEASURES):
      for kind in kinds:
        points = sorted(((w, stat_of(row)) for k, w, row in group.dose
                         if k in (None, kind) and w is not None and stat_of(row).n),
                        key=lambda point: point[0])
        if points:
          ax.errorbar([w for w, _ in points], [stat.mean for _, stat in points],
                      yerr=[stat.std or 0.0 for _, stat in points], marker="o", capsize=3,
                      label=kind)
      ax.set_xscale("symlog", linthresh=min(weights, default=1.0))
      ax.set_xlabel("penalty weight (0 = multi)")
      ax.set_title(f"{group_title(group.key)}: {title}", fontsize=9)
      ax.grid(alpha=0.3)
      if kinds:
        ax.legend(fontsize=7, title="kind", title_fontsize=7)
  fig.suptitle("Dose: mean ± std over finished seeds", fontsize=9)
  _save(fig, path)


# ----------------------------------------------------------------------------- markdown


def fmt_pm(stat: tuple, spec: str = ".2f") -> str:
  """'76.20 ± 0.31' (n>=2), '76.20 (n=1)', or '–', from a MeanStd or (mean, std, n); `spec`
  formats the mean ('+.2f': signed), the std without its sign."""
  mean, std, n = stat
  if n == 0:
    return "–"
  shown = format(mean, spec)
  return f"{shown} (n=1)" if std is None else f"{shown} ± {format(std, spec.lstrip('+'))}"


def _fmt_heads(stats: tuple, spec: str = ".2f") -> str:
  """Per head, 'h0 76.20 ± 0.31, h1 75.10 ± 0.20', or '–'."""
  return ", ".join(f"h{k} {fmt_pm(stat, spec)}" for k, stat in enumerate(stats)) or "–"


def _md_table(header: list, rows: list) -> list:
  """Markdown lines of a table, and a blank line."""
  lines = ["| " + " | ".join(cells) + " |" for cells in [header] + rows]
  return lines[:1] + ["|" + "---|" * len(header)] + lines[1:] + [""]


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
  what = f"{comparison.b} − {comparison.a} ({PAIRED_METRICS[comparison.metric][1]})"
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
  """The group's table: a line per row."""
  published = group.published is not None
  header = ["variant", "heads", "best acc (%)", "final acc (%)", "seeds", "params", "images/s",
            "final head cos"]
  if published:  # the paper's numbers came from one protocol: say so next to another's rows
    header.append(f"{PUBLISHED_LABEL} (%)" if group.protocol == PUBLISHED_PROTOCOL
                  else f"{PUBLISHED_LABEL} (%), protocol {PUBLISHED_PROTOCOL}")
  rows = []
  for row in group.rows:
    cells = [row.label, _fmt_list(row.heads, str), fmt_pm(row.best), fmt_pm(row.final),
             fmt_seeds(row), _fmt_list(row.params, "{:,}".format),
             _fmt_optional(row.images_per_s, ".0f"), _fmt_optional(row.head_cosine.mean, ".3f")]
    if published:
      cells.append(_fmt_optional(row.published, ".2f"))
    rows.append(cells)
  return _md_table(header, rows)


HEADS_PREAMBLE = (
    "Heads, mean ± std over the finished seeds. head CKA: mean off-diagonal linear CKA between "
    "the heads' pooled features at the last eval (1: the same features up to rotation and "
    "scale, 0: unrelated). probe acc: a logistic-regression probe on one head's pooled features "
    "(fitted on training examples, scored on the eval split), per head (h0, h1, ...). all-heads "
    "probe: the probe on all heads' features concatenated. ablation drop: eval accuracy lost "
    "when that head's feature map is replaced by its batch mean, in points. fused − best head: "
    "final eval accuracy minus the best head's probe accuracy, in points (> 0: the model gains "
    "from its heads together).")


def _heads_lines(group: GroupSummary) -> list:
  """The Heads table: a line per row of the group, labelled 'variant × K'."""
  lines = ["### Heads", "", HEADS_PREAMBLE, ""]
  header = ["variant × heads", "head CKA", "probe acc per head (%)", "all-heads probe acc (%)",
            "ablation drop per head (points)", "fused − best head (points)"]
  return lines + _md_table(header, [
      [f"{row.label} × {_fmt_list(row.heads, str)}", fmt_pm(row.measures.cka, ".3f"),
       _fmt_heads(row.measures.probe), fmt_pm(row.measures.probe_all),
       _fmt_heads(row.measures.drops, "+.2f"), fmt_pm(row.measures.gap, "+.2f")]
      for row in group.rows])


def _dose_lines(group: GroupSummary) -> list:
  """The Dose table of a group whose multi_cos rows are split by setting."""
  lines = ["### Dose", "", "Final values per penalty setting, mean ± std over the finished "
           "seeds; weight 0 is the multi runs, every kind's. dose.png plots them.", ""]
  header = ["kind", "weight"] + [title for title, _, _ in DOSE_MEASURES] + ["n seeds"]
  return lines + _md_table(header, [
      [kind or "– (multi)", "–" if weight is None else sweepfile.format_weight(weight)]
      + [fmt_pm(stat_of(row), spec) for _, stat_of, spec in DOSE_MEASURES]
      + [str(row.final.n)] for kind, weight, row in group.dose])


def _running_lines(group: GroupSummary) -> list:
  """A line per running run of the group, which the statistics leave out."""
  lines = [f"- running (not in the statistics): {row.variant} seed {run.seed}, "
           f"{run.progress()}, {run.current_best()}"
           for row in group.rows for run in row.running_runs]
  return lines + [""] if lines else []


def _paired_lines(comparisons: tuple) -> list:
  """The table and sentences of one multi_cos row - multi, a comparison per PAIRED_METRICS:
  a sentence for each accuracy and for each head measure that has pairs."""
  first = comparisons[0]
  lines = [f"### {first.b} − {first.a}, paired by seed", ""]
  rows = []
  for comparison in comparisons:
    if comparison.t is None:
      t = p = f"n/a ({comparison.reason})"
    else:
      t, p = f"{comparison.t:.3f}", _fmt_p(comparison.p)
    rows.append([PAIRED_METRICS[comparison.metric][0], _fmt_optional(comparison.mean, "+.2f"),
                 _fmt_optional(comparison.std, ".2f"), str(comparison.n), t, p])
  lines += _md_table(["metric", "mean diff (points)", "std of diffs", "n pairs", "t",
                      "p (two-sided)"], rows)
  lines += [paired_sentence(comparison) for comparison in comparisons
            if comparison.n or comparison.metric in ("best", "final")]
  if first.unpaired:
    lines.append("Left out of the pairing: " + "; ".join(first.unpaired) + ".")
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
  lines += _heads_lines(group)
  if group.dose:
    lines += _dose_lines(group)
  for comparisons in group.paired:
    lines += _paired_lines(comparisons)
  return lines


def parameter_matches(table: list) -> list:
  """[(multi-head GroupSummary, Row, single GroupSummary, Row)]: each multi-head row of an arch
  and each single row of another arch, same data set and protocol, whose mean num_params is
  within PARAMS_TOLERANCE of the multi-head row's."""
  singles = [(group, row) for group in table for row in group.rows
             if row.variant == "single" and row.params]
  matches = []
  for group in table:
    for row in group.rows:
      if row.variant == "single" or not row.params:
        continue
      params = np.mean(row.params)
      matches += [(group, row, other, single) for other, single in singles
                  if other.key[:2] == group.key[:2] and other.arch != group.arch
                  and abs(np.mean(single.params) - params) <= PARAMS_TOLERANCE * params]
  return matches


def _matched_cells(group: GroupSummary, row: Row) -> list:
  name = f"{group.arch} × {_fmt_list(row.heads, str)}"
  return [name if row.variant == "single" else f"{name} ({row.label})",
          _fmt_list(row.params, "{:,}".format), fmt_pm(row.best), fmt_pm(row.final),
          str(row.finished)]


def _parameter_matched_section(matches: list) -> list:
  """'## Parameter-matched': each multi-head model beside a single one of about its size."""
  lines = ["## Parameter-matched", "",
           f"A multi-head model of one arch beside a single model of another arch with "
           f"num_params within ±{PARAMS_TOLERANCE:.0%} (the paper's two seresnet18 heads against "
           "one seresnet34), same data set and protocol. Accuracy in %, mean ± std over the "
           "finished seeds of each; different archs are not seed-paired, so there is no test "
           "here: read mean ± std only.", ""]
  half = ["params", "best acc (%)", "final acc (%)", "n seeds"]
  return lines + _md_table(
      ["data set", "multi-head arch × heads"] + half + ["single arch × heads"] + half,
      [[group.dataset + ("" if group.protocol == SCRATCH else f" / {group.protocol}")]
       + _matched_cells(group, row) + _matched_cells(other, single)
       for group, row, other, single in matches])


def _fmt_missing(missing: MissingRun) -> str:
  if missing.kind is not None or missing.weight is not None:  # a point of the dose axes
    missing = dataclasses.replace(missing, variant=setting_label(missing.variant, missing.kind,
                                                                 missing.weight))
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


def figures_of(table: list) -> tuple:
  """The figures the report writes: FIGURES, and DOSE_FIGURE where some group has a dose."""
  return FIGURES + ((DOSE_FIGURE,) if any(group.dose for group in table) else ())


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
           f"Figures: {', '.join(figures_of(table))}.", ""]
  for group in table:
    lines += render_group(group)
  matches = parameter_matches(table)
  if matches:
    lines += _parameter_matched_section(matches)
  return "\n".join(lines + _missing_section(runs, missing))


def summary_text(table: list, runs: list, missing: list, out: str) -> str:
  """A few lines for stdout."""
  lines = []
  for group in table:
    parts = [f"{row.label} {fmt_pm(row.best)} ({fmt_seeds(row)})" for row in group.rows]
    lines.append(f"{group_title(group.key, sep='/')}: " + "; ".join(parts))
    lines += ["  " + paired_sentence(comparisons[0]) for comparisons in group.paired]
  n_running = sum(not r.finished for r in runs)
  lines.append(f"{len(runs)} runs ({len(runs) - n_running} finished, {n_running} running), "
               f"{len(missing)} missing")
  written = figures_of(table) + ("report.md",)
  lines.append(f"wrote {', '.join(os.path.join(out, name) for name in written)}")
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
  plot_heads(runs, os.path.join(out, "heads.png"))
  if DOSE_FIGURE in figures_of(table):
    plot_dose(table, os.path.join(out, DOSE_FIGURE))
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
