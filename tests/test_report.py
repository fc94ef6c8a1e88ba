"""The sweep report (`python -m featdiv_jax.report`) on hand-written results.json files."""

import json
import math
import os
import subprocess
import sys

import numpy as np
from scipy import stats

from featdiv_jax import report
from featdiv_jax import sweep
from featdiv_jax import sweepfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# cifar10 / seresnet18, best and final test accuracy (fractions) per variant and seed.
BEST = {"single": [0.7512, 0.7433, 0.7561],
        "multi": [0.7712, 0.7655, 0.7803],
        "multi_cos": [0.7790, 0.7701, 0.7850]}
FINAL = {"single": [0.7480, 0.7401, 0.7550],
         "multi": [0.7700, 0.7611, 0.7790],
         "multi_cos": [0.7760, 0.7688, 0.7801]}


def write_run(root, rel, *, dataset, arch, variant, seed, best, final, finished=True,
              heads=None, epochs=4, steps_per_epoch=10, smoke=False, with_epoch_key=True,
              protocol=None, penalty=None, measures=None, num_params=None):
  """Writes a results.json shaped like train._results() writes it; returns its path. Without
  `protocol` its config has no protocol key, as results.json files older than it; likewise
  `penalty` ((kind, weight): config.penalty) and `measures` (the per-head measures at the
  last eval, `head_measures`)."""
  heads = heads or (1 if variant == "single" else 2)
  done = epochs if finished else epochs - 2
  accs = list(np.linspace(0.3, best, done - 1)) + [final] if done > 1 else [best]
  cos_end = None if heads == 1 else (0.6 if variant == "multi" else 0.05)
  history = []
  for i, acc in enumerate(accs):
    step = (i + 1) * steps_per_epoch
    cos = None if cos_end is None else 0.4 + (cos_end - 0.4) * (i + 1) / len(accs)
    entry = dict(step=step, train_loss=2.0 - i * 0.1, train_accuracy=acc,
                 train_head_cosine=cos or 0.0, eval_loss=1.5 - i * 0.1, eval_accuracy=float(acc),
                 eval_count=1000, eval_head_cosine=cos)
    if with_epoch_key:
      entry["epoch"] = step / steps_per_epoch
    history.append(entry)
  if measures is not None:
    add_head_measures(history, measures)
  matrix = np.full((heads, heads), history[-1]["eval_head_cosine"] or 1.0)
  np.fill_diagonal(matrix, 1.0)
  results = dict(
      config=dict(dataset=dict(name=dataset, image_size=32), seed=seed, variant=variant,
                  smoke=smoke, model=dict(arch=arch, num_heads=heads)),
      variant=variant, history=history, best_eval_accuracy=max(a for a in accs),
      final_eval_accuracy=accs[-1], eval_head_cosine_matrix=matrix.tolist(),
      num_params=num_params or 11_271_754 * heads, wall_time_s=123.0,
      train_images_per_s=1000.0 + seed, skipped_steps=0, step=done * steps_per_epoch,
      total_steps=epochs * steps_per_epoch, steps_per_epoch=steps_per_epoch, finished=finished)
  if protocol is not None:
    results["config"]["protocol"] = protocol
  if penalty is not None:
    results["config"]["penalty"] = dict(kind=penalty[0], weight=penalty[1])
  if measures is not None:
    cka = measures["cka"]
    results["eval_head_cka_matrix"] = None if cka is None else [[1.0, cka], [cka, 1.0]]
  path = os.path.join(root, rel, "results.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f)
  return path


def head_measures(cka, probe, probe_all, drops):
  """The per-head measures of a run's last eval, as `write_run(measures=...)` takes them."""
  return dict(cka=cka, probe=probe, probe_all=probe_all, drops=drops)


def add_head_measures(history, measures):
  """Adds the per-head measures to history entries as train writes them: CKA and ablation at
  every eval (other values before the last, which the report must not read), the probe where
  it ran: at the last eval, and at the first as a probe run by hand might."""
  cka, drops = measures["cka"], measures["drops"]
  for i, entry in enumerate(history):
    last = i == len(history) - 1
    entry_drops = None if drops is None else [d if last else d + 0.3 for d in drops]
    entry.update(
        eval_head_cka=None if cka is None else (cka if last else 0.99),
        eval_head_ablation_drop=entry_drops, eval_time_s=1.5,
        eval_head_ablation_accuracy=None if drops is None else [
            entry["eval_accuracy"] - d for d in entry_drops])
  history[-1].update(eval_head_probe_accuracy=measures["probe"],
                     eval_probe_all_accuracy=measures["probe_all"])
  if len(history) > 1:
    history[0].update(eval_head_probe_accuracy=[0.01] * len(measures["probe"]),
                      eval_probe_all_accuracy=0.01)


def make_sweep(root, plan=True):
  """cifar10/seresnet18: 3 variants x seeds 0-2 finished, multi seed 3 running, multi_cos seed
  3 planned but never started; digits/seresnet_tiny: one seed of each variant."""
  planned = []
  for variant in report.VARIANT_ORDER:
    for seed in range(3):
      rel = f"cifar10/seresnet18/{variant}/s{seed}"
      write_run(root, rel, dataset="cifar10", arch="seresnet18", variant=variant, seed=seed,
                best=BEST[variant][seed], final=FINAL[variant][seed])
      planned.append(dict(dataset="cifar10", arch="seresnet18", variant=variant, seed=seed,
                          workdir=rel))
  # Running, with a current best far above the rest: the statistics must leave it out.
  write_run(root, "cifar10/seresnet18/multi/s3", dataset="cifar10", arch="seresnet18",
            variant="multi", seed=3, best=0.95, final=0.95, finished=False)
  planned.append(dict(dataset="cifar10", arch="seresnet18", variant="multi", seed=3,
                      workdir="cifar10/seresnet18/multi/s3"))
  planned.append(dict(dataset="cifar10", arch="seresnet18", variant="multi_cos", seed=3,
                      workdir="cifar10/seresnet18/multi_cos/s3"))
  for variant, best in (("single", 0.9011), ("multi", 0.9123), ("multi_cos", 0.9234)):
    rel = f"digits/{variant}"
    write_run(root, rel, dataset="digits", arch="seresnet_tiny", variant=variant, seed=0,
              best=best, final=best - 0.001, smoke=True)
    planned.append(dict(dataset="digits", arch="seresnet_tiny", variant=variant, seed=0,
                        workdir=rel))
  if plan:
    with open(os.path.join(root, "sweep.json"), "w") as f:
      json.dump({"runs": planned}, f)


# Per-head measures at the last eval, per variant and seed, beside BEST / FINAL (fractions).
CKA = {"single": [None] * 3, "multi": [0.61, 0.58, 0.66], "multi_cos": [0.12, 0.20, 0.17]}
PROBE = {"single": [[0.70], [0.71], [0.69]],
         "multi": [[0.72, 0.70], [0.71, 0.69], [0.73, 0.72]],
         "multi_cos": [[0.66, 0.61], [0.65, 0.63], [0.67, 0.60]]}
PROBE_ALL = {"single": [0.70, 0.71, 0.69], "multi": [0.74, 0.73, 0.75],
             "multi_cos": [0.75, 0.74, 0.77]}
DROPS = {"single": [None] * 3, "multi": [[0.02, 0.01], [0.03, 0.00], [0.02, 0.02]],
         "multi_cos": [[0.08, 0.05], [0.07, 0.06], [0.09, 0.04]]}


def make_heads_sweep(root):
  """cifar10/seresnet18: 3 variants x seeds 0-2, finished, with the per-head measures."""
  for variant in report.VARIANT_ORDER:
    for seed in range(3):
      write_run(root, f"{variant}/s{seed}", dataset="cifar10", arch="seresnet18",
                variant=variant, seed=seed, best=BEST[variant][seed], final=FINAL[variant][seed],
                measures=head_measures(CKA[variant][seed], PROBE[variant][seed],
                                       PROBE_ALL[variant][seed], DROPS[variant][seed]))


def render(root):
  """report.md's text for the results.json under `root`, without the figures."""
  runs = report.load_runs(report.find_results([str(root)]), print)
  table = report.aggregate(runs)
  return report.render_markdown(table, runs, report.missing_runs(runs, None), [str(root)], None)


def sections(md):
  """{'## heading': text} of report.md's level-2 sections."""
  out, name = {}, None
  for line in md.splitlines():
    if line.startswith("## "):
      name = line[3:].strip()
      out[name] = []
    elif name:
      out[name].append(line)
  return {k: "\n".join(v) for k, v in out.items()}


def row(section, variant):
  lines = [l for l in section.splitlines() if l.startswith(f"| {variant} |")]
  assert len(lines) == 1, section
  return [c.strip() for c in lines[0].strip("|").split("|")]


def pm(values):
  x = 100 * np.asarray(values)
  return f"{x.mean():.2f} ± {x.std(ddof=1):.2f}"


def assert_png(path):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG_SIGNATURE, path
  assert len(data) > 5000, (path, len(data))


def test_report_numbers_published_missing_and_running(tmp_path, capsys):
  sweep = tmp_path / "sweep"
  make_sweep(str(sweep))
  assert report.main([str(sweep)]) == 0
  out = capsys.readouterr().out
  assert "cifar10/seresnet18:" in out and "1 missing" in out
  for name in report.FIGURES:
    assert_png(sweep / name)
  md = (sweep / "report.md").read_text()
  sec = sections(md)
  assert list(sec) == ["cifar10 / seresnet18", "digits / seresnet_tiny", "Missing / in progress"]
  c10 = sec["cifar10 / seresnet18"]

  # Mean ± sample std over finished seeds only (the running seed 3 at 95% is left out).
  for variant in report.VARIANT_ORDER:
    cells = row(c10, variant)
    assert cells[2] == pm(BEST[variant]), cells
    assert cells[3] == pm(FINAL[variant]), cells
  multi = row(c10, "multi")
  assert multi[1] == "2"
  assert multi[4] == "3 finished + 1 running / 4 found (of 4 planned)"
  assert row(c10, "multi_cos")[4] == "3 finished / 3 found (of 4 planned)"
  assert multi[5] == f"{2 * 11_271_754:,}"
  assert multi[6] == f"{np.mean([1000.0, 1001.0, 1002.0, 1003.0]):.0f}"
  assert multi[7] == "0.600" and row(c10, "multi_cos")[7] == "0.050"
  assert row(c10, "single")[7] == "–"
  assert "running (not in the statistics): multi seed 3, step 20/40 (epoch 2.0 of 4.0)" in c10
  assert "current best 95.00" in c10

  # Published numbers, labelled, in the row of the matching model; none for digits.
  header = [l for l in c10.splitlines() if l.startswith("| variant |")][0]
  assert "published (paper's PyTorch code, single run)" in header
  assert multi[-1] == "76.97" and row(c10, "multi_cos")[-1] == "77.11"
  assert row(c10, "single")[-1] == "–"  # the paper has no single seresnet18
  digits = sec["digits / seresnet_tiny"]
  assert "published (paper" not in digits and "77.11" not in digits
  assert "No published numbers" in digits and "smoke" in digits

  # Paired multi_cos - multi by seed, over seeds 0-2 (seed 3: multi running, no multi_cos).
  diffs = 100 * (np.array(BEST["multi_cos"]) - np.array(BEST["multi"]))
  t = diffs.mean() / (diffs.std(ddof=1) / math.sqrt(3))
  p = 2 * stats.t.sf(abs(t), df=2)
  paired = [l for l in c10.splitlines() if l.startswith("| best acc |")][0]
  cells = [c.strip() for c in paired.strip("|").split("|")]
  assert cells == ["best acc", f"{diffs.mean():+.2f}", f"{diffs.std(ddof=1):.2f}", "3",
                   f"{t:.3f}", f"{p:.3g}"]
  assert p < 0.05 and "multi_cos is significantly higher than multi at n=3" in c10
  final_diffs = 100 * (np.array(FINAL["multi_cos"]) - np.array(FINAL["multi"]))
  assert stats.ttest_rel(FINAL["multi_cos"], FINAL["multi"]).pvalue >= 0.05
  assert ("(final accuracy): no significant difference at n=3 "
          f"(mean {final_diffs.mean():+.2f} points") in c10
  assert "multi seed 3 (no multi_cos run)" in c10
  # One pair only: no t-test, with the reason.
  digits_pair = [l for l in digits.splitlines() if l.startswith("| best acc |")][0]
  assert "| 1 |" in digits_pair and "n/a (n=1 pair" in digits_pair
  assert f"{100 * (0.9234 - 0.9123):+.2f}" in digits_pair

  # The closing section: the running run and the planned run that never wrote results.
  tail = sec["Missing / in progress"]
  assert md.rstrip().splitlines()[-1].startswith("- ")
  in_progress, missing = tail.split("### Missing runs")
  assert "cifar10 / seresnet18 / multi, seed 3: step 20/40" in in_progress
  assert "multi/s3/results.json" in in_progress
  assert "- cifar10 / seresnet18 / multi_cos, seed 3" in missing
  assert "planned in sweep.json" in missing
  assert missing.count("\n- ") == 1


def test_paired_comparison_matches_ttest_rel_and_flags_zero_spread():
  runs = []
  for variant, accs in (("multi", [0.50, 0.60, 0.70]), ("multi_cos", [0.52, 0.66, 0.71])):
    for seed, acc in enumerate(accs):
      runs.append(report.parse_results(
          dict(config=dict(dataset=dict(name="d"), model=dict(arch="a", num_heads=2), seed=seed),
               variant=variant, history=[dict(step=1, epoch=1.0, eval_accuracy=acc)],
               finished=True), f"{variant}{seed}"))
  pc = report.paired_comparison(runs, ("d", "a"), "best")
  t, p = stats.ttest_rel([52, 66, 71], [50, 60, 70])
  assert pc.n == 3 and math.isclose(pc.t, t) and math.isclose(pc.p, p)
  assert math.isclose(pc.mean, 3.0)
  for r in runs[3:]:  # every difference +2 points: no spread, no t statistic
    r.best = next(x for x in runs if x.variant == "multi" and x.seed == r.seed).best + 0.02
  pc = report.paired_comparison(runs, ("d", "a"), "best")
  assert pc.t is None and "std of differences is 0" in pc.reason
  assert "no test possible" in report.paired_sentence(pc)


def test_cli_writes_to_out_and_empty_dir_fails_with_one_line(tmp_path, capsys):
  sweep, out = tmp_path / "sweep", tmp_path / "out"
  make_sweep(str(sweep))
  run = subprocess.run([sys.executable, "-m", "featdiv_jax.report", str(sweep), "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
  assert run.returncode == 0, run.stderr
  assert "wrote" in run.stdout and "multi_cos − multi" in run.stdout
  for name in report.FIGURES:
    assert_png(out / name)
  assert "## Missing / in progress" in (out / "report.md").read_text()
  assert not (sweep / "report.md").exists()

  empty = tmp_path / "nothing here"
  empty.mkdir()
  capsys.readouterr()
  assert report.main([str(empty)]) == 2
  captured = capsys.readouterr()
  assert captured.err.splitlines() == [f"error: no results.json found under {empty}"]
  assert captured.out == "" and not os.listdir(empty)
  assert report.main([str(tmp_path / "absent")]) == 2
  assert capsys.readouterr().err.startswith("error: not a directory: ")


def test_malformed_results_are_skipped_with_a_warning(tmp_path, capsys):
  good = write_run(str(tmp_path), "good", dataset="cifar10", arch="seresnet18",
                   variant="single", seed=0, best=0.5, final=0.49)
  broken = tmp_path / "broken" / "results.json"
  broken.parent.mkdir()
  broken.write_text('{"config": ')
  no_config = tmp_path / "no_config" / "results.json"
  no_config.parent.mkdir()
  no_config.write_text(json.dumps({"history": []}))
  assert report.main([str(tmp_path)]) == 0
  err = capsys.readouterr().err
  assert f"warning: skipping {broken}" in err and f"warning: skipping {no_config}" in err
  assert good not in err
  md = (tmp_path / "report.md").read_text()
  assert "| single | 1 | 50.00 (n=1) | 49.00 (n=1) | 1 finished / 1 found |" in md
  assert md.rstrip().endswith("none")  # nothing missing, nothing running

  only_bad = tmp_path / "broken"
  assert report.main([str(only_bad)]) == 2
  assert "error: no readable results.json under" in capsys.readouterr().err


def test_missing_runs_inferred_without_sweep_json_and_epochs_from_steps(tmp_path):
  make_sweep(str(tmp_path), plan=False)
  os.remove(tmp_path / "cifar10/seresnet18/single/s1/results.json")
  write_run(str(tmp_path), "extra", dataset="oxford_flowers102", arch="seresnet34",
            variant="multi_cos", seed=7, best=0.4, final=0.39, with_epoch_key=False,
            steps_per_epoch=5)
  runs = report.load_runs(report.find_results([str(tmp_path)]), print)
  plan = sweepfile.planned_runs([str(tmp_path)], print)
  assert plan is None
  missing = report.missing_runs(runs, plan)
  md = report.render_markdown(report.aggregate(runs, plan), runs, missing, [str(tmp_path)], plan)
  missing = md.split("### Missing runs")[1]
  # seeds 0-3 exist in cifar10/seresnet18: single lacks 1 and 3, multi_cos lacks 3.
  assert [l.split(" — ")[0] for l in missing.strip().splitlines()] == [
      "- cifar10 / seresnet18 / single, seed 1", "- cifar10 / seresnet18 / single, seed 3",
      "- cifar10 / seresnet18 / multi_cos, seed 3"]
  assert "inferred" in missing
  flowers_sec = sections(md)["oxford_flowers102 / seresnet34"]
  assert "Flowers-102" in flowers_sec and "| multi_cos | 2 | 40.00 (n=1) |" in flowers_sec
  assert row(flowers_sec, "multi_cos")[-1] == "47.35"  # the paper's 2 heads + cosine seresnet34
  flowers = report.load_runs(report.find_results([str(tmp_path / "extra")]), print)
  assert flowers[0].epochs == [1.0, 2.0, 3.0, 4.0]  # step / steps_per_epoch, no epoch key


def test_report_on_a_real_sweep_of_smoke_runs(tmp_path):
  """The sweep runs real (smoke) trainings; the report's numbers are theirs, missing runs listed."""
  sweep_dir = tmp_path / "sweep"
  grid = ["--sweep-dir", str(sweep_dir), "--datasets", "digits", "--archs", "seresnet_tiny",
          "--extra", "smoke", f"--main-flag=--config.dataset.data_dir={tmp_path / 'tfds'}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", TF_CPP_MIN_LOG_LEVEL="2")
  env.pop("FEATDIV_FAULT", None)
  cli = lambda *a: subprocess.run([sys.executable, "-m", "featdiv_jax.sweep", *a], cwd=REPO,
                                  env=env, capture_output=True, text=True, timeout=600)
  r = cli("run", *grid, "--variants", "multi,multi_cos", "--seeds", "0,1")
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert cli("plan", *grid, "--variants", "single", "--seeds", "0").returncode == 0  # not run

  assert report.main([str(sweep_dir)]) == 0
  for name in ("comparison.png", "curves.png", "diversity.png"):
    assert (sweep_dir / name).read_bytes()[:8] == PNG_SIGNATURE
  md = (sweep_dir / "report.md").read_text()
  runs = {(v, s): json.loads((sweep_dir / "digits" / "seresnet_tiny" / v / f"seed{s}" /
                              "results.json").read_text())
          for v in ("multi", "multi_cos") for s in (0, 1)}
  assert all(r_["finished"] and r_["config"]["smoke"] for r_ in runs.values())
  for v in ("multi", "multi_cos"):
    best = [100 * runs[v, s]["best_eval_accuracy"] for s in (0, 1)]
    row = next(line for line in md.splitlines() if line.startswith(f"| {v} |"))
    assert report.fmt_pm((np.mean(best), np.std(best, ddof=1), 2)) in row
    assert f"{runs[v, 0]['num_params']:,}" in row
  diffs = [100 * (runs["multi_cos", s]["best_eval_accuracy"] - runs["multi", s]["best_eval_accuracy"])
           for s in (0, 1)]
  best_row = next(line for line in md.splitlines() if line.startswith("| best acc |"))
  assert f"{np.mean(diffs):+.2f}" in best_row and "| 2 |" in best_row
  missing = md[md.index("## Missing"):]
  assert "single" in missing and "seed 0" in missing


def test_the_protocol_is_part_of_a_runs_identity(tmp_path, capsys):
  """A scratch and a pretrained_head run of the same grid point are two runs in two sections,
  neither merged nor paired across protocols; the published column names its protocol."""
  accs = {("scratch", "multi"): 0.70, ("scratch", "multi_cos"): 0.71,
          ("pretrained_head", "multi"): 0.76, ("pretrained_head", "multi_cos"): 0.78}
  for (protocol, variant), acc in accs.items():
    # The scratch runs have no protocol key, as results.json files written before it.
    write_run(str(tmp_path), f"{protocol}/{variant}", dataset="cifar10", arch="seresnet18",
              variant=variant, seed=0, best=acc, final=acc,
              protocol=None if protocol == "scratch" else protocol)
  assert report.main([str(tmp_path)]) == 0
  captured = capsys.readouterr()
  assert "same run" not in captured.err
  assert "cifar10/seresnet18: " in captured.out
  assert "cifar10/seresnet18/pretrained_head: " in captured.out
  sec = sections((tmp_path / "report.md").read_text())
  assert list(sec) == ["cifar10 / seresnet18", "cifar10 / seresnet18 / pretrained_head",
                       "Missing / in progress"]
  for protocol, title in (("scratch", "cifar10 / seresnet18"),
                          ("pretrained_head", "cifar10 / seresnet18 / pretrained_head")):
    for variant in ("multi", "multi_cos"):
      cells = row(sec[title], variant)
      assert cells[2] == f"{100 * accs[protocol, variant]:.2f} (n=1)", (title, cells)
      assert cells[4] == "1 finished / 1 found", (title, cells)
      assert cells[-1] == {"multi": "76.97", "multi_cos": "77.11"}[variant]
    # paired within the protocol only: one pair, this protocol's difference
    pair = [l for l in sec[title].splitlines() if l.startswith("| best acc |")][0]
    diff = 100 * (accs[protocol, "multi_cos"] - accs[protocol, "multi"])
    assert f"| {diff:+.2f} |" in pair and "| 1 |" in pair, pair
  header = lambda title: [l for l in sec[title].splitlines() if l.startswith("| variant |")][0]
  assert header("cifar10 / seresnet18").endswith("(%), protocol pretrained_head |")
  assert header("cifar10 / seresnet18 / pretrained_head").endswith("single run) (%) |")
  assert "this section's runs are protocol scratch" in sec["cifar10 / seresnet18"]
  assert "protocol scratch" not in sec["cifar10 / seresnet18 / pretrained_head"]

  runs = report.load_runs(report.find_results([str(tmp_path)]), print)
  assert sorted(r.key for r in runs) == sorted(
      ("cifar10", protocol, "seresnet18", variant, 0) for protocol, variant in accs)
  assert report.missing_runs(runs, None) == []  # no seed lacks across protocols either


def test_a_planned_run_is_done_only_by_a_result_of_its_protocol(tmp_path):
  """sweep.json as the sweep writes it: a pretrained_head plan is done by pretrained_head results
  only, and an entry without a protocol (an older sweep) by scratch results only."""
  runs = sweep.expand(str(tmp_path), "cifar10", "single,multi", "seresnet18", "0", ["paper"])
  assert {r["protocol"] for r in runs} == {"pretrained_head"}
  sweepfile.add_runs(str(tmp_path), runs, ["plan"], print)
  plan_file = tmp_path / "sweep.json"
  plan = json.loads(plan_file.read_text())
  plan["runs"].append(dict(dataset="cifar10", arch="seresnet18", variant="multi_cos", seed=0,
                           workdir="old/multi_cos"))  # an older sweep's entry: scratch
  plan_file.write_text(json.dumps(plan))
  # Results of the same grid points under the other protocol: none of them does a planned run.
  write_run(str(tmp_path), "elsewhere/single", dataset="cifar10", arch="seresnet18",
            variant="single", seed=0, best=0.7, final=0.7, protocol="scratch")
  write_run(str(tmp_path), "elsewhere/multi", dataset="cifar10", arch="seresnet18",
            variant="multi", seed=0, best=0.7, final=0.7)  # no protocol key: scratch
  write_run(str(tmp_path), "elsewhere/multi_cos", dataset="cifar10", arch="seresnet18",
            variant="multi_cos", seed=0, best=0.7, final=0.7, protocol="pretrained_head")
  planned = sweepfile.planned_runs([str(tmp_path)], print)
  assert [p.protocol for p in planned] == ["pretrained_head", "pretrained_head", "scratch"]

  def missing():
    found = report.load_runs(report.find_results([str(tmp_path)]), print)
    return [(m.protocol, m.variant) for m in report.missing_runs(found, planned)]
  assert missing() == [("pretrained_head", "single"), ("pretrained_head", "multi"),
                       ("scratch", "multi_cos")]
  # The planned pretrained_head single, done where the sweep put it.
  write_run(str(tmp_path), runs[0]["workdir"], dataset="cifar10", arch="seresnet18",
            variant="single", seed=0, best=0.75, final=0.75, protocol="pretrained_head")
  assert runs[0]["workdir"] == "cifar10/pretrained_head/seresnet18/single/seed0"
  assert missing() == [("pretrained_head", "multi"), ("scratch", "multi_cos")]
  found = report.load_runs(report.find_results([str(tmp_path)]), print)
  md = report.render_markdown(report.aggregate(found, planned), found,
                              report.missing_runs(found, planned), [str(tmp_path)], planned)
  sec = sections(md)
  assert row(sec["cifar10 / seresnet18 / pretrained_head"], "single")[4] == (
      "1 finished / 1 found (of 1 planned)")
  assert row(sec["cifar10 / seresnet18 / pretrained_head"], "multi")[4] == (
      "0 finished / 0 found (of 1 planned)")
  assert row(sec["cifar10 / seresnet18"], "multi_cos")[4] == "0 finished / 0 found (of 1 planned)"
  assert row(sec["cifar10 / seresnet18 / pretrained_head"], "multi_cos")[4] == (
      "1 finished / 1 found")
  assert "- cifar10 / seresnet18 / pretrained_head / multi, seed 0" in sec["Missing / in progress"]


def heads_table(section):
  return section.split("### Heads")[1].split("###")[0]


def test_heads_table_per_head_mean_std_and_the_fused_gap(tmp_path):
  make_heads_sweep(str(tmp_path))
  heads = heads_table(sections(render(tmp_path))["cifar10 / seresnet18"])
  # By hand: CKA 0.12, 0.20, 0.17; final 77.60, 76.88, 78.01 minus the best head's probe 66, 65,
  # 67: gaps 11.60, 11.88, 11.01. The report reads the last eval, not the earlier decoys.
  assert row(heads, "multi_cos × 2") == [
      "multi_cos × 2", "0.163 ± 0.040", "h0 66.00 ± 1.00, h1 61.33 ± 1.53", "75.33 ± 1.53",
      "h0 +8.00 ± 1.00, h1 +5.00 ± 1.00", "+11.50 ± 0.44"]
  probe = 100 * np.array(PROBE["multi"])
  cells = row(heads, "multi × 2")
  assert cells[2] == f"h0 {pm(probe[:, 0] / 100)}, h1 {pm(probe[:, 1] / 100)}"
  gap = 100 * np.array(FINAL["multi"]) - probe.max(axis=1)
  assert cells[5] == f"{gap.mean():+.2f} ± {gap.std(ddof=1):.2f}"
  # One head: a probe and a gap, no CKA and no ablation.
  assert row(heads, "single × 1") == ["single × 1", "–", "h0 70.00 ± 1.00", "70.00 ± 1.00", "–",
                                      "+4.77 ± 1.75"]

  runs = report.load_runs(report.find_results([str(tmp_path)]), print)
  report.plot_heads(runs, str(tmp_path / "heads.png"))
  assert_png(tmp_path / "heads.png")
  report.plot_heads([r for r in runs if r.variant == "single"], str(tmp_path / "none.png"))
  assert (tmp_path / "none.png").read_bytes()[:8] == PNG_SIGNATURE  # "no multi-head runs"


def test_multi_cos_minus_multi_is_paired_on_the_head_measures(tmp_path):
  make_heads_sweep(str(tmp_path))
  c10 = sections(render(tmp_path))["cifar10 / seresnet18"]
  cos, multi = 100 * np.array(CKA["multi_cos"]), 100 * np.array(CKA["multi"])
  t, p = stats.ttest_rel(cos, multi)
  diffs = cos - multi
  assert row(c10, "head CKA (×100)") == ["head CKA (×100)", f"{diffs.mean():+.2f}",
                                         f"{diffs.std(ddof=1):.2f}", "3", f"{t:.3f}", f"{p:.3g}"]
  assert "multi_cos − multi (final head CKA ×100): multi_cos is significantly lower" in c10
  gaps = {v: 100 * (np.array(FINAL[v]) - np.array(PROBE[v]).max(axis=1))
          for v in ("multi", "multi_cos")}
  assert row(c10, "fused − best head")[1] == f"{(gaps['multi_cos'] - gaps['multi']).mean():+.2f}"
  probe_all = 100 * (np.array(PROBE_ALL["multi_cos"]) - np.array(PROBE_ALL["multi"]))
  assert row(c10, "all-heads probe acc")[1:4] == [f"{probe_all.mean():+.2f}",
                                                  f"{probe_all.std(ddof=1):.2f}", "3"]
  for label in ("mean head probe acc", "mean ablation drop"):
    assert row(c10, label)[3] == "3"


def test_old_results_without_head_measures_show_dashes(tmp_path):
  make_sweep(str(tmp_path))
  c10 = sections(render(tmp_path))["cifar10 / seresnet18"]
  for variant, heads in (("single", 1), ("multi", 2), ("multi_cos", 2)):
    assert row(heads_table(c10), f"{variant} × {heads}")[1:] == ["–"] * 5
  for label in ("head CKA (×100)", "mean head probe acc", "all-heads probe acc",
                "mean ablation drop", "fused − best head"):
    assert row(c10, label)[1:4] == ["–", "–", "0"]
  assert "(final head CKA" not in c10  # no sentence on what no run has


def write_dose_sweep(root, settings):
  """cifar10/seresnet18 seeds 0-1: multi (weight 0), and multi_cos at each (kind, weight) of
  `settings`, {setting: (final accuracies, final head CKAs)}."""
  for seed in (0, 1):
    write_run(root, f"multi/s{seed}", dataset="cifar10", arch="seresnet18", variant="multi",
              seed=seed, best=0.75, final=0.75 + 0.01 * seed, penalty=("cos", 0.0),
              measures=head_measures(0.6, [0.7, 0.7], 0.72, [0.01, 0.01]))
    for (kind, weight), (accs, ckas) in settings.items():
      write_run(root, f"{kind}{weight}/s{seed}", dataset="cifar10", arch="seresnet18",
                variant="multi_cos", seed=seed, best=accs[seed], final=accs[seed],
                penalty=(kind, weight),
                measures=head_measures(ckas[seed], [0.7, 0.7], 0.72, [0.01, 0.01]))


def test_penalty_settings_are_rows_of_their_own_with_a_dose(tmp_path):
  settings = {("cos", 0.1): ([0.76, 0.78], [0.5, 0.4]),
              ("cos", 1.0): ([0.77, 0.80], [0.2, 0.1]),
              ("cka", 1.0): ([0.74, 0.73], [0.05, 0.03])}
  write_dose_sweep(str(tmp_path), settings)
  point = dict(dataset="cifar10", arch="seresnet18")
  planned = [dict(point, variant="multi", seed=seed, workdir=f"multi/s{seed}") for seed in (0, 1)]
  planned += [dict(point, variant="multi_cos", kind=kind, weight=weight, seed=seed,
                   workdir=f"{kind}{weight}/s{seed}")
              for kind, weight in settings for seed in (0, 1, 2)]
  (tmp_path / "sweep.json").write_text(json.dumps({"runs": planned}))
  assert report.main([str(tmp_path)]) == 0
  assert_png(tmp_path / "dose.png")
  md = (tmp_path / "report.md").read_text()
  assert "heads.png, dose.png." in md
  missing = sections(md)["Missing / in progress"]
  for label in ("multi_cos cos w=0.1", "multi_cos cos w=1", "multi_cos cka w=1"):
    assert f"- cifar10 / seresnet18 / {label}, seed 2" in missing   # each point named
  c10 = sections(md)["cifar10 / seresnet18"]
  table = c10.split("###")[0]
  assert [l.split(" | ")[0] for l in table.splitlines() if l.startswith("| multi")] == [
      "| multi", "| multi_cos cka w=1", "| multi_cos cos w=0.1", "| multi_cos cos w=1"]
  for (kind, weight), (accs, _) in settings.items():
    cells = row(table, f"multi_cos {kind} w={weight:g}")
    assert cells[3] == pm(accs) and cells[4] == "2 finished / 2 found (of 3 planned)", cells
    # The paper's number goes with the paper's penalty only.
    assert cells[-1] == ("77.11" if (kind, weight) == ("cos", 1.0) else "–")
    # Each setting paired with multi on its own.
    paired = c10.split(f"### multi_cos {kind} w={weight:g} − multi, paired by seed")[1]
    diffs = 100 * (np.array(accs) - [0.75, 0.76])
    assert row(paired.split("###")[0], "final acc")[1:4] == [
        f"{diffs.mean():+.2f}", f"{diffs.std(ddof=1):.2f}", "2"]
  dose = c10.split("### Dose")[1].split("###")[0]
  lines = [l for l in dose.splitlines() if l.startswith("| ") and "---" not in l][1:]
  assert [l.split(" | ")[:2] for l in lines] == [
      ["| – (multi)", "0"], ["| cka", "1"], ["| cos", "0.1"], ["| cos", "1"]]
  assert lines[1].split(" | ")[2:] == [pm([0.74, 0.73]), "0.050 ± 0.000", "0.040 ± 0.014",
                                       "2 |"]
  runs = report.load_runs(report.find_results([str(tmp_path)]), print)
  summary = report.summary_text(report.aggregate(runs), runs, [], str(tmp_path))
  assert "  multi_cos cka w=1 − multi (best accuracy): " in summary


def test_one_penalty_setting_is_one_multi_cos_row_and_no_dose(tmp_path):
  write_dose_sweep(str(tmp_path), {("cka", 0.1): ([0.76, 0.78], [0.5, 0.4])})
  assert report.main([str(tmp_path)]) == 0
  md = (tmp_path / "report.md").read_text()
  assert not (tmp_path / "dose.png").exists()
  assert "Figures: comparison.png, curves.png, diversity.png, heads.png." in md  # no dose.png
  c10 = sections(md)["cifar10 / seresnet18"]
  assert row(c10, "multi_cos")[3] == pm([0.76, 0.78]) and "### Dose" not in c10
  assert "### multi_cos − multi, paired by seed" in c10


def test_parameter_matched_pairs_close_param_counts_across_archs(tmp_path):
  def write(arch, variant, params, accs, dataset="cifar10"):
    for seed, acc in enumerate(accs):
      write_run(str(tmp_path), f"{dataset}/{arch}/{variant}/s{seed}", dataset=dataset,
                arch=arch, variant=variant, seed=seed, best=acc, final=acc - 0.01,
                num_params=params)
  write("seresnet18", "multi", 22_543_508, [0.77, 0.78])  # two 11.27M heads
  write("seresnet34", "single", 21_289_802, [0.76, 0.765, 0.77])  # within 20%: matched
  write("seresnet101", "single", 42_490_000, [0.79, 0.80])  # 88% more: not matched
  write("seresnet34", "single", 21_289_802, [0.5, 0.5], dataset="caltech101")  # other data
  sec = sections(render(tmp_path))
  assert list(sec)[-2:] == ["Parameter-matched", "Missing / in progress"]
  matched = sec["Parameter-matched"]
  assert "no test" in matched
  lines = [l for l in matched.splitlines() if l.startswith("| cifar10 ")]
  assert len(lines) == 1 and "seresnet101" not in matched and "caltech101" not in matched
  cells = [c.strip() for c in lines[0].strip("|").split("|")]
  assert cells == ["cifar10", "seresnet18 × 2 (multi)", "22,543,508", pm([0.77, 0.78]),
                   pm([0.76, 0.77]), "2", "seresnet34 × 1", "21,289,802",
                   pm([0.76, 0.765, 0.77]), pm([0.75, 0.755, 0.76]), "3"]

  for path in report.find_results([str(tmp_path / "cifar10" / "seresnet34")]):
    os.remove(path)
  assert "Parameter-matched" not in sections(render(tmp_path))  # seresnet101 only: too far
