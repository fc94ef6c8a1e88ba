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
              protocol=None):
  """Writes a results.json shaped like train._results() writes it; returns its path. Without
  `protocol` its config has no protocol key, as results.json files older than it."""
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
  matrix = np.full((heads, heads), history[-1]["eval_head_cosine"] or 1.0)
  np.fill_diagonal(matrix, 1.0)
  results = dict(
      config=dict(dataset=dict(name=dataset, image_size=32), seed=seed, variant=variant,
                  smoke=smoke, model=dict(arch=arch, num_heads=heads)),
      variant=variant, history=history, best_eval_accuracy=max(a for a in accs),
      final_eval_accuracy=accs[-1], eval_head_cosine_matrix=matrix.tolist(),
      num_params=11_271_754 * heads, wall_time_s=123.0, train_images_per_s=1000.0 + seed,
      skipped_steps=0, step=done * steps_per_epoch, total_steps=epochs * steps_per_epoch,
      steps_per_epoch=steps_per_epoch, finished=finished)
  if protocol is not None:
    results["config"]["protocol"] = protocol
  path = os.path.join(root, rel, "results.json")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(results, f)
  return path


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
