r"""Sweep report: figures and a markdown table from the results.json files of many runs.

  python -m featdiv_jax.report SWEEP_DIR [WORKDIR ...] [--out DIR]

Reads every `results.json` found recursively under the given directories (a sweep directory, or
single run workdirs; the same file reached twice counts once) and writes into `--out` (default:
the first directory):

- `comparison.png`: best test accuracy per variant, grouped by (data set, arch): mean bar, std
  error bar over finished seeds, every seed as a dot (hollow: still running), the paper's
  published number as a star where there is one.
- `curves.png`: eval accuracy against epoch per variant (mean line, min-max band over seeds).
- `diversity.png`: mean off-diagonal cosine between heads against epoch (multi vs multi_cos) and
  the final K x K head-cosine matrix, averaged over seeds, for each multi-head variant.
- `report.md`: one table per (data set, arch), the paired multi_cos - multi comparison across
  seeds (scipy.stats.ttest_rel), the paper's published numbers where the data set is one of the
  paper's, and a closing "Missing / in progress" section.

Partial sweeps are fine: runs with `finished: false` are counted as running and kept out of the
statistics (their current best is listed). A `sweep.json` at the top of a given directory lists
the planned runs, `{"runs": [{"dataset", "arch", "variant", "seed", "workdir"}, ...]}` (missing
keys are tolerated); a planned run with no results.json is reported missing. Without one, a
variant lacking a seed that another variant of the same (data set, arch) has is reported missing.

Exit status: 0, or 2 with one line on stderr when no results.json can be read. Reads JSON only:
imports neither jax nor TensorFlow, so it runs anywhere.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Callable, Optional

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from scipy import stats

VARIANT_ORDER = ("single", "multi", "multi_cos")  # configlib.VARIANTS, without importing it
COLORS = {"single": "tab:blue", "multi": "tab:orange", "multi_cos": "tab:green"}
ALPHA = 0.05  # significance level of the paired t-test
PUBLISHED_LABEL = "published (paper's PyTorch code, single run)"

# Published best test accuracy (%) of the paper's PyTorch code, one run each, no seeds; from
# /work/shared/REFERENCE.md, section "Published best test accuracy (%)". Keys are our TFDS data
# set names and (variant, arch); the paper's multi-head models have 2 heads ("2 heads + cosine"
# is multi_cos, "2 heads, no constraint" is multi). `digits` is not in the paper.
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
  cos_matrix: Optional[list]
  num_params: Optional[int]
  images_per_s: Optional[float]
  step: int
  total_steps: Optional[int]
  steps_per_epoch: Optional[int]
  smoke: bool = False

  @property
  def group(self) -> tuple:
    return (self.dataset, self.arch)

  @property
  def key(self) -> tuple:
    return (self.dataset, self.arch, self.variant, self.seed)

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


# ----------------------------------------------------------------------------- loading


def norm_seed(seed):
  """Seeds compare as ints where they are integral (sweep.json may hold "1" or 1.0)."""
  if isinstance(seed, bool):
    return int(seed)
  if isinstance(seed, (int, np.integer)):
    return int(seed)
  if isinstance(seed, float) and seed.is_integer():
    return int(seed)
  if isinstance(seed, str):
    try:
      return int(seed.strip())
    except ValueError:
      return seed.strip()
  return seed


def _seed_sort(seed):
  return (0, seed, "") if isinstance(seed, int) else (1, 0, str(seed))


def variant_sort(variant: str):
  return (VARIANT_ORDER.index(variant), "") if variant in VARIANT_ORDER else (len(VARIANT_ORDER),
                                                                             variant)


def _number(x, name: str, kind=float):
  if x is None:
    return None
  if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
    raise ValueError(f"{name} is {x!r}, not a finite number")
  return kind(x)


def parse_results(data, path: str) -> Run:
  """A Run from a parsed results.json; ValueError (with the reason) when it is not one."""
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
  if "seed" not in config or not isinstance(norm_seed(config["seed"]), (int, str)):
    raise ValueError(f"config.seed is {config.get('seed')!r}, not an integer or string")
  history = data.get("history", [])
  if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
    raise ValueError("history is not a list of objects")
  steps_per_epoch = _number(data.get("steps_per_epoch"), "steps_per_epoch", int)
  epochs, accs, coss = [], [], []
  for i, h in enumerate(history):
    acc = _number(h.get("eval_accuracy"), f"history[{i}].eval_accuracy")
    if acc is None:
      raise ValueError(f"history[{i}] has no eval_accuracy")
    epoch = _number(h.get("epoch"), f"history[{i}].epoch")
    if epoch is None:  # older files: the epoch from the step
      step = _number(h.get("step"), f"history[{i}].step") or 0
      epoch = step / steps_per_epoch if steps_per_epoch else step
    epochs.append(epoch)
    accs.append(acc)
    coss.append(_number(h.get("eval_head_cosine"), f"history[{i}].eval_head_cosine"))
  best = _number(data.get("best_eval_accuracy"), "best_eval_accuracy")
  final = _number(data.get("final_eval_accuracy"), "final_eval_accuracy")
  matrix = data.get("eval_head_cosine_matrix")
  if matrix is not None:
    arr = np.asarray(matrix, dtype=float)
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
      raise ValueError(f"eval_head_cosine_matrix has shape {arr.shape}, not K x K")
  heads = config.get("model", {}).get("num_heads")
  return Run(
      path=path, dataset=dataset, arch=arch, variant=variant, seed=norm_seed(config["seed"]),
      num_heads=None if heads is None else int(heads), finished=bool(data.get("finished")),
      best=best if best is not None else (max(accs) if accs else None),
      final=final if final is not None else (accs[-1] if accs else None),
      epochs=epochs, accuracies=accs, head_cosines=coss, cos_matrix=matrix,
      num_params=_number(data.get("num_params"), "num_params", int),
      images_per_s=_number(data.get("train_images_per_s"), "train_images_per_s"),
      step=_number(data.get("step"), "step", int) or 0,
      total_steps=_number(data.get("total_steps"), "total_steps", int),
      steps_per_epoch=steps_per_epoch, smoke=bool(config.get("smoke", False)))


def find_results(dirs) -> list:
  """Every results.json under `dirs`, each file once (by real path), in a stable order."""
  seen, found = set(), []
  for top in dirs:
    for root, subdirs, files in os.walk(top):
      subdirs[:] = sorted(d for d in subdirs if d != "checkpoints")  # orbax trees: no results
      if "results.json" in files:
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
      with open(path) as f:
        run = parse_results(json.load(f), path)
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
  return sorted(by_key.values(), key=lambda r: (r.dataset, r.arch, variant_sort(r.variant),
                                                _seed_sort(r.seed)))


def load_plan(dirs, warn: Callable[[str], None]) -> Optional[list]:
  """Planned runs from `sweep.json` at the top of the given directories; None without a usable one.

  Each planned run: dict(dataset, arch, variant, seed, workdir) with None for what is absent
  and workdir made absolute (relative to the directory holding sweep.json).
  """
  plan = None
  for top in dirs:
    path = os.path.join(top, "sweep.json")
    if not os.path.isfile(path):
      continue
    try:
      with open(path) as f:
        data = json.load(f)
      entries = data["runs"] if isinstance(data, dict) else data
      if not isinstance(entries, list):
        raise ValueError("'runs' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as e:
      warn(f"warning: ignoring {path}: {e}")
      continue
    plan = plan or []
    for i, e in enumerate(entries):
      if not isinstance(e, dict):
        warn(f"warning: {path}: runs[{i}] is not an object; ignored")
        continue
      workdir = e.get("workdir")
      if isinstance(workdir, str) and workdir:
        workdir = os.path.normpath(os.path.join(os.path.abspath(top), workdir))
      else:
        workdir = None
      entry = dict(dataset=e.get("dataset"), arch=e.get("arch"), variant=e.get("variant"),
                   seed=None if e.get("seed") is None else norm_seed(e.get("seed")),
                   workdir=workdir)
      if not all(isinstance(entry[k], (str, type(None))) for k in ("dataset", "arch", "variant")
                 ) or not isinstance(entry["seed"], (int, str, type(None))):
        warn(f"warning: {path}: runs[{i}] has a dataset, arch, variant or seed of the wrong "
             "type; ignored")
        continue
      if all(entry[k] is None for k in ("dataset", "arch", "variant", "seed", "workdir")):
        warn(f"warning: {path}: runs[{i}] names no dataset, arch, variant, seed or workdir; "
             "ignored")
        continue
      plan.append(entry)
  return plan or None  # no usable entry: infer missing runs instead


_PLAN_KEYS = ("dataset", "arch", "variant", "seed")


def plan_matches(entry: dict, run: Run) -> bool:
  """A planned run is done by `run` when every key it names agrees (or, naming none of
  dataset/arch/variant/seed, when `run` lives in its workdir)."""
  named = [k for k in _PLAN_KEYS if entry[k] is not None]
  if named:
    return all(entry[k] == getattr(run, k) for k in named)
  wd = os.path.realpath(entry["workdir"])
  here = os.path.realpath(run.workdir)
  return here == wd or here.startswith(wd + os.sep)


def missing_runs(runs, plan: Optional[list]) -> list:
  """Planned (or, without a plan, inferred) runs that have no results.json.

  Inferred: within each (dataset, arch), a variant lacking a seed that another variant has.
  Returns dicts with dataset, arch, variant, seed, workdir and source ('sweep.json'|'inferred').
  """
  if plan is not None:
    return [dict(e, source="sweep.json") for e in plan
            if not any(plan_matches(e, r) for r in runs)]
  missing = []
  for group in sorted({r.group for r in runs}):
    members = [r for r in runs if r.group == group]
    seeds = sorted({r.seed for r in members}, key=_seed_sort)
    for variant in sorted({r.variant for r in members}, key=variant_sort):
      have = {r.seed for r in members if r.variant == variant}
      missing += [dict(dataset=group[0], arch=group[1], variant=variant, seed=s, workdir=None,
                       source="inferred") for s in seeds if s not in have]
  return missing


# ----------------------------------------------------------------------------- aggregation


def mean_std(values) -> tuple:
  """(mean, sample std (ddof=1) or None when n < 2, n); (None, None, 0) when empty."""
  values = [v for v in values if v is not None]
  if not values:
    return None, None, 0
  arr = np.asarray(values, dtype=float)
  return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None), int(arr.size)


def paired_comparison(runs, group: tuple, metric: str, a: str = "multi",
                      b: str = "multi_cos") -> dict:
  """b - a on `metric` ('best' or 'final', in % points), paired by seed over finished runs.

  Returns n, mean, std (of the differences), t, p (None where no test is possible), reason
  (why not), seeds (paired) and unpaired (list of 'variant seed S (why)').
  """
  def of(variant):
    return {r.seed: r for r in runs if r.group == group and r.variant == variant}
  ra, rb = of(a), of(b)
  pairs, unpaired = [], []
  for seed in sorted(set(ra) | set(rb), key=_seed_sort):
    x, y = ra.get(seed), rb.get(seed)
    if x is None or y is None:
      have = a if x is not None else b
      unpaired.append(f"{have} seed {seed} (no {b if x is not None else a} run)")
    elif not (x.finished and y.finished):
      running = [v.variant for v in (x, y) if not v.finished]
      unpaired.append(f"seed {seed} ({' and '.join(running)} still running)")
    elif getattr(x, metric) is None or getattr(y, metric) is None:
      unpaired.append(f"seed {seed} (no eval yet)")
    else:
      pairs.append((seed, 100 * getattr(x, metric), 100 * getattr(y, metric)))
  result = dict(n=len(pairs), mean=None, std=None, t=None, p=None, reason=None,
                seeds=[s for s, _, _ in pairs], unpaired=unpaired, a=a, b=b, metric=metric)
  if not pairs:
    result["reason"] = "no seed with finished runs of both"
    return result
  xa = np.array([p[1] for p in pairs])
  xb = np.array([p[2] for p in pairs])
  diffs = xb - xa
  result["mean"] = float(diffs.mean())
  if len(pairs) < 2:
    result["reason"] = "n=1 pair: a paired t-test needs n>=2"
    return result
  result["std"] = float(diffs.std(ddof=1))
  if result["std"] <= 1e-9 * max(1.0, abs(result["mean"])):
    result["reason"] = "every difference is the same: std of differences is 0"
    return result
  t, p = stats.ttest_rel(xb, xa)
  result["t"], result["p"] = float(t), float(p)
  return result


def summarize(runs_v: list, planned: Optional[int]) -> dict:
  """One table row from one variant's runs of one (dataset, arch)."""
  fin = [r for r in runs_v if r.finished]
  heads = sorted({r.num_heads for r in runs_v if r.num_heads is not None})
  params = sorted({r.num_params for r in runs_v if r.num_params is not None})
  return dict(
      heads=heads, params=params,
      best=mean_std([100 * r.best for r in fin if r.best is not None]),
      final=mean_std([100 * r.final for r in fin if r.final is not None]),
      finished=len(fin), running=len(runs_v) - len(fin), found=len(runs_v), planned=planned,
      images_per_s=mean_std([r.images_per_s for r in runs_v])[0],
      head_cosine=mean_std([r.final_head_cosine for r in fin])[0],
      running_runs=[r for r in runs_v if not r.finished],
      smoke=any(r.smoke for r in runs_v))


def aggregate(runs, plan: Optional[list] = None) -> list:
  """The report's table: one dict per (dataset, arch), sorted, with `rows` per variant (in
  VARIANT_ORDER), the paired multi_cos - multi comparisons and the published numbers."""
  planned = {}
  for e in plan or []:
    if e["dataset"] is not None and e["arch"] is not None and e["variant"] is not None:
      k = (e["dataset"], e["arch"], e["variant"])
      planned[k] = planned.get(k, 0) + 1
  groups = sorted({r.group for r in runs} | {k[:2] for k in planned})
  table = []
  for group in groups:
    variants = sorted({r.variant for r in runs if r.group == group}
                      | {k[2] for k in planned if k[:2] == group}, key=variant_sort)
    rows = []
    for v in variants:
      row = summarize([r for r in runs if r.group == group and r.variant == v],
                      planned.get(group + (v,)) if plan is not None else None)
      row["variant"] = v
      row["published"] = PUBLISHED.get(group[0], {}).get((v, group[1]))
      rows.append(row)
    table.append(dict(dataset=group[0], arch=group[1], rows=rows,
                      paired=[paired_comparison(runs, group, m) for m in ("best", "final")],
                      published=PUBLISHED.get(group[0])))
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


def plot_comparison(table: list, runs: list, path: str) -> None:
  """Best test accuracy per variant, grouped by (dataset, arch): mean, std, seeds, published.

  The y axis is scaled to the data (it does not start at 0), as the accuracies of the variants
  usually differ by less than a point."""
  n_groups = max(1, len(table))
  fig, ax = plt.subplots(figsize=(min(16, 2.5 + 2.2 * n_groups), 3.6), dpi=DPI)
  shown = set()
  for gi, group in enumerate(table):
    rows = group["rows"]
    width = 0.8 / max(1, len(rows))
    for vi, row in enumerate(rows):
      v = row["variant"]
      x = gi - 0.4 + width * (vi + 0.5)
      color = COLORS.get(v, "tab:gray")
      mean, std, _ = row["best"]
      label = v if v not in shown else None
      shown.add(v)
      if mean is not None:  # a mean marker, not a bar: the differences are fractions of a point
        ax.errorbar(x, mean, yerr=std if std is not None else None, fmt="_", markersize=22,
                    markeredgewidth=2.5, color=color, ecolor="black", elinewidth=1, capsize=4,
                    label=label, zorder=2)
      members = [r for r in runs if r.group == (group["dataset"], group["arch"])
                 and r.variant == v and r.best is not None]
      offsets = np.linspace(-width / 4, width / 4, len(members)) if len(members) > 1 else [0.0]
      for r, dx in zip(members, offsets):
        running = not r.finished
        ax.scatter(x + dx, 100 * r.best, s=14, zorder=3, edgecolors="black", linewidths=0.6,
                   facecolors="none" if running else color,
                   label=("seed, still running" if running and "running" not in shown else None))
        shown.update({"running"} if running else set())
      if row["published"] is not None:
        ax.scatter(x, row["published"], marker="*", s=60, color="black", zorder=4,
                   label=PUBLISHED_LABEL if "published" not in shown else None)
        shown.add("published")
  ax.set_xticks(range(len(table)))
  ax.set_xticklabels([f"{g['dataset']}\n{g['arch']}" for g in table], fontsize=8)
  ax.set_ylabel("best test accuracy (%)")
  ax.set_title("Best test accuracy: mean ± std, dots = seeds", fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  if shown:
    ax.legend(fontsize=7, loc="best")
  _save(fig, path)


def plot_curves(runs: list, path: str) -> None:
  """Eval accuracy against epoch: one panel per (dataset, arch), one line + band per variant."""
  groups = sorted({r.group for r in runs})
  fig, axes = _panel_grid(len(groups))
  for ax, group in zip(axes, groups):
    members = [r for r in runs if r.group == group]
    for v in sorted({r.variant for r in members}, key=variant_sort):
      vr = [r for r in members if r.variant == v and r.accuracies]
      n_run = sum(not r.finished for r in vr)
      label = f"{v} (n={len(vr)}{f', {n_run} running' if n_run else ''})"
      _line_with_band(ax, [(r.epochs, r.accuracies) for r in vr], label,
                      COLORS.get(v, "tab:gray"), scale=100)
    ax.set_title(f"{group[0]} / {group[1]}", fontsize=9)
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
  fin = [r for r in members if r.finished and r.cos_matrix is not None]
  use = fin or [r for r in members if r.cos_matrix is not None]
  if not use:
    return None, 0, ""
  mats = [np.asarray(r.cos_matrix, dtype=float) for r in use]
  shapes = [m.shape for m in mats]
  common = max(set(shapes), key=shapes.count)
  mats = [m for m in mats if m.shape == common]
  return np.mean(mats, axis=0), len(mats), ("finished" if fin else "running")


def plot_diversity(runs: list, path: str) -> None:
  """Per (dataset, arch) with multi-head runs: head cosine vs epoch, and the mean final matrix
  of each multi-head variant as a heatmap."""
  groups = [g for g in sorted({r.group for r in runs})
            if _multihead_variants([r for r in runs if r.group == g])]
  if not groups:
    fig, ax = plt.subplots(figsize=(4, 2), dpi=DPI)
    ax.axis("off")
    ax.text(0.5, 0.5, "no multi-head runs: no head cosine to show", ha="center", va="center")
    _save(fig, path)
    return
  n_var = max(len(_multihead_variants([r for r in runs if r.group == g])) for g in groups)
  fig, axes = plt.subplots(len(groups), 1 + n_var, figsize=(4 + 3.2 * n_var, 3 * len(groups)),
                           dpi=DPI, squeeze=False)
  for row, group in zip(axes, groups):
    members = [r for r in runs if r.group == group]
    variants = _multihead_variants(members)
    ax = row[0]
    for v in variants:
      vr = [r for r in members if r.variant == v]
      _line_with_band(ax, [(r.epochs, r.head_cosines) for r in vr], f"{v} (n={len(vr)})",
                      COLORS.get(v, "tab:gray"))
    ax.set_title(f"{group[0]} / {group[1]}: mean cosine between heads", fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("eval head cosine")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for ax in row[1 + len(variants):]:
      ax.axis("off")
    for ax, v in zip(row[1:], variants):
      matrix, n, note = mean_matrix([r for r in members if r.variant == v])
      if matrix is None:
        ax.axis("off")
        continue
      im = ax.imshow(matrix, vmin=min(0.0, float(matrix.min())), vmax=1.0, cmap="viridis")
      k = matrix.shape[0]
      if k <= 6:
        for i in range(k):
          for j in range(k):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if matrix[i, j] < 0.6 else "black")
      ax.set_xticks(range(k))
      ax.set_yticks(range(k))
      ax.set_xlabel("head")
      ax.set_ylabel("head")
      ax.set_title(f"{v}: final head cosine (mean of {n} {note})", fontsize=8)
      fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  _save(fig, path)


# ----------------------------------------------------------------------------- markdown


def fmt_pm(ms: tuple) -> str:
  """'76.20 ± 0.31' (n>=2), '76.20 (n=1)', or '–'."""
  mean, std, n = ms
  if n == 0:
    return "–"
  return f"{mean:.2f} (n=1)" if std is None else f"{mean:.2f} ± {std:.2f}"


def fmt_seeds(row: dict) -> str:
  text = f"{row['finished']} finished"
  if row["running"]:
    text += f" + {row['running']} running"
  text += f" / {row['found']} found"
  if row["planned"] is not None:
    text += f" (of {row['planned']} planned)"
  return text


def _fmt_list(values: list, fmt) -> str:
  if not values:
    return "–"
  return fmt(values[0]) if len(values) == 1 else f"{fmt(values[0])}–{fmt(values[-1])}"


def _fmt_p(p: float) -> str:
  return f"{p:.3g}" if p >= 1e-4 else f"{p:.1e}"


def paired_sentence(pc: dict) -> str:
  """Plain words for one paired comparison."""
  what = f"{pc['b']} − {pc['a']} ({pc['metric']} accuracy)"
  n = pc["n"]
  if n == 0:
    return f"{what}: no seed has finished runs of both, nothing to compare."
  if pc["p"] is None:
    return (f"{what}: {pc['mean']:+.2f} points at n={n}; no test possible ({pc['reason']}), "
            "so no conclusion either way.")
  if pc["p"] < ALPHA:
    direction = "higher" if pc["mean"] > 0 else "lower"
    return (f"{what}: {pc['b']} is significantly {direction} than {pc['a']} at n={n} "
            f"(mean {pc['mean']:+.2f} points, paired t-test two-sided p={_fmt_p(pc['p'])} "
            f"< {ALPHA}).")
  return (f"{what}: no significant difference at n={n} (mean {pc['mean']:+.2f} points, "
          f"paired t-test two-sided p={_fmt_p(pc['p'])} ≥ {ALPHA}).")


def _published_line(dataset: str) -> str:
  numbers = PUBLISHED[dataset]
  parts = [f"{v} {a} {numbers[(v, a)]:.2f}" for v, a in
           sorted(numbers, key=lambda k: (variant_sort(k[0]), int(k[1].replace("seresnet", ""))))]
  return (f"{PUBLISHED_LABEL}, {PAPER_NAMES[dataset]}, best test accuracy (%): "
          + ", ".join(parts) + ". The paper's multi and multi_cos models have 2 heads; it trained "
          "from scratch with timm's ImageNet stem and its own recipe (REFERENCE.md): compare "
          "recipes before comparing numbers.")


def render_group(group: dict) -> list:
  """Markdown lines of one (dataset, arch) section."""
  published = group["published"] is not None
  lines = [f"## {group['dataset']} / {group['arch']}", ""]
  if any(r["smoke"] for r in group["rows"]):
    lines += ["**Includes smoke runs** (shrunk model, data and steps): not comparable.", ""]
  header = ["variant", "heads", "best acc (%)", "final acc (%)", "seeds", "params", "images/s",
            "final head cos"]
  if published:
    header.append(f"{PUBLISHED_LABEL} (%)")
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in group["rows"]:
    cells = [row["variant"], _fmt_list(row["heads"], str), fmt_pm(row["best"]),
             fmt_pm(row["final"]), fmt_seeds(row), _fmt_list(row["params"], "{:,}".format),
             "–" if row["images_per_s"] is None else f"{row['images_per_s']:.0f}",
             "–" if row["head_cosine"] is None else f"{row['head_cosine']:.3f}"]
    if published:
      cells.append("–" if row["published"] is None else f"{row['published']:.2f}")
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  for row in group["rows"]:
    for r in row["running_runs"]:
      best = "no eval yet" if r.best is None else f"current best {100 * r.best:.2f}"
      lines.append(f"- running (not in the statistics): {row['variant']} seed {r.seed}, "
                   f"{r.progress()}, {best}")
  if any(row["running_runs"] for row in group["rows"]):
    lines.append("")
  if published:
    lines += [_published_line(group["dataset"]), ""]
  else:
    lines += [f"No published numbers: {group['dataset']} is not one of the paper's data sets.",
              ""]
  variants = {row["variant"] for row in group["rows"]}
  if {"multi", "multi_cos"} <= variants:
    lines += ["### multi_cos − multi, paired by seed", "",
              "| metric | mean diff (points) | std of diffs | n pairs | t | p (two-sided) |",
              "|---|---|---|---|---|---|"]
    for pc in group["paired"]:
      mean = "–" if pc["mean"] is None else f"{pc['mean']:+.2f}"
      std = "–" if pc["std"] is None else f"{pc['std']:.2f}"
      if pc["t"] is None:
        t = p = f"n/a ({pc['reason']})"
      else:
        t, p = f"{pc['t']:.3f}", _fmt_p(pc["p"])
      lines.append(f"| {pc['metric']} acc | {mean} | {std} | {pc['n']} | {t} | {p} |")
    lines.append("")
    lines += [paired_sentence(pc) for pc in group["paired"]]
    unpaired = group["paired"][0]["unpaired"]
    if unpaired:
      lines.append("Left out of the pairing: " + "; ".join(unpaired) + ".")
    lines.append("")
  return lines


def _fmt_missing(m: dict) -> str:
  what = " / ".join("?" if m[k] is None else str(m[k]) for k in ("dataset", "arch", "variant"))
  text = f"- {what}, seed {'?' if m['seed'] is None else m['seed']}"
  if m["workdir"]:
    text += f" (workdir `{m['workdir']}`)"
  return text + (" — planned in sweep.json, no results.json" if m["source"] == "sweep.json"
                 else " — inferred: other variants have this seed (no sweep.json)")


def render_markdown(table: list, runs: list, missing: list, dirs: list,
                    plan: Optional[list]) -> str:
  """The whole report.md."""
  n_fin = sum(r.finished for r in runs)
  lines = ["# Sweep report", "",
           f"Sources: {', '.join(f'`{d}`' for d in dirs)}: {len(runs)} runs "
           f"({n_fin} finished, {len(runs) - n_fin} running); "
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
  running = [r for r in runs if not r.finished]
  lines += ["## Missing / in progress", ""]
  if not running and not missing:
    lines += ["none", ""]
    return "\n".join(lines)
  lines += ["### In progress", ""]
  lines += [f"- {r.dataset} / {r.arch} / {r.variant}, seed {r.seed}: {r.progress()}, "
            + ("no eval yet" if r.best is None else f"current best {100 * r.best:.2f}")
            + f" — `{r.path}`" for r in running] or ["none"]
  lines += ["", "### Missing runs", ""]
  lines += [_fmt_missing(m) for m in missing] or ["none"]
  lines.append("")
  return "\n".join(lines)


def summary_text(table: list, runs: list, missing: list, out: str) -> str:
  """A few lines for stdout."""
  lines = []
  for group in table:
    parts = [f"{row['variant']} {fmt_pm(row['best'])} ({fmt_seeds(row)})"
             for row in group["rows"]]
    lines.append(f"{group['dataset']}/{group['arch']}: " + "; ".join(parts))
    if {"multi", "multi_cos"} <= {row["variant"] for row in group["rows"]}:
      lines.append("  " + paired_sentence(group["paired"][0]))
  n_run = sum(not r.finished for r in runs)
  lines.append(f"{len(runs)} runs ({len(runs) - n_run} finished, {n_run} running), "
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
  plan = load_plan(dirs, warn)
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
