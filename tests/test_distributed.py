"""Two real processes: `jax.distributed` on 127.0.0.1 with CPU (gloo) collectives, one shared
workdir, each process reading its own slice of the data -- the code path of a TPU pod slice or
a multi-node GPU job -- against one process with the same devices and the same global batches.

Why the one-process reference is fed the two processes' slices: the pipeline gives each process
its own shard of the split (shuffled within the shard), so a 2-process global batch is process
0's local batch followed by process 1's, not the batch one process would draw from the whole
split. The reference runs the same entry point (`featdiv_jax.main.main`) in one process with as
many devices, its `data.train_batches` replaced by that concatenation; everything else (eval
over the whole split, mesh, jit, checkpoints, results.json) is the unchanged one-process path.
So any difference is the multi-process machinery: global arrays from process-local data,
cross-process collectives, eval padding and aggregation, multi-process orbax saves.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from featdiv_jax import data, distributed, guards
from tests_util import ROOT, load_config

CONFIG = "--config=configs/digits.py:multi_cos,smoke"
TIMEOUT_S = 240  # per run; a healthy one takes a fraction of this
# Observed: train metrics and the whole final state (params, BN statistics, optimizer moments)
# bit-identical; eval metrics within ~1e-7, as eval batches are grouped differently (padded
# per-process shards vs one stream) and summed in another order. A real fault (a batch in the
# wrong order, which changes the dropout masks, or a missing cross-process reduction) moves the
# losses by ~1e-2; the margin is for reduction order on other CPUs and XLA versions.
RTOL, ATOL = 1e-5, 1e-6

# The one-process reference: main.main unchanged, the train stream made of both processes' slices.
REFERENCE = r"""
import sys
import numpy as np
from featdiv_jax import data, main

one_process = data.train_batches

def two_slices(dc, *, global_batch_size, seed, start_step=0, process_index=None,
               process_count=None):
  slices = [one_process(dc, global_batch_size=global_batch_size, seed=seed,
                        start_step=start_step, process_index=p, process_count=2) for p in (0, 1)]
  for parts in zip(*slices):
    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

data.train_batches = two_slices
sys.argv[0] = "featdiv_jax.main"
main.run_cli()
"""


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_with(devices: int) -> dict:
  """The test session's env (conftest: rbg PRNG, compilation cache) with `devices` CPU devices.

  XLA's backend optimisations are off: the runs compile in about half the time on the 2-core CI
  machine, and both sides of the comparison are compiled the same way.
  """
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                       "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  for name in ("FEATDIV_FAULT", "JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS",
               "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS",
               "FEATDIV_NUM_PROCESSES", "FEATDIV_PROCESS_ID", "FEATDIV_EXPECT_DEVICES"):
    env.pop(name, None)
  return env


def start(args, env, log: pathlib.Path):
  out = open(log, "w")  # a file, not a pipe: a chatty process can never block on a full pipe
  proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=out,
                          stderr=subprocess.STDOUT, text=True)
  out.close()
  return proc


def tail(log: pathlib.Path, n: int = 4000) -> str:
  return log.read_text(errors="replace")[-n:] if log.exists() else "<no output>"


def wait_all(procs: dict, timeout: float, expected: dict | None = None) -> dict:
  """{name: returncode}; on a timeout every process still running is killed and the test fails
  with each one's output tail (a dead peer leaves the other blocked in a collective).
  `expected`: {name: exit code} where one is not 0."""
  expected = expected or {}
  deadline = time.time() + timeout
  while time.time() < deadline and any(p.poll() is None for p, _ in procs.values()):
    if any(p.poll() not in (None, expected.get(name, 0)) for name, (p, _) in procs.items()):
      break  # one failed: its peer would wait for it until the timeout
    time.sleep(0.2)
  hung = [name for name, (p, _) in procs.items() if p.poll() is None]
  for name in hung:
    procs[name][0].kill()
  codes = {name: p.wait(timeout=30) for name, (p, _) in procs.items()}
  if hung or any(code != expected.get(name, 0) for name, code in codes.items()):
    report = "\n".join(f"===== {name}: exit {codes[name]}{' (killed: hung)' if name in hung else ''}"
                       f"\n{tail(log)}" for name, (_, log) in procs.items())
    pytest.fail(f"runs did not all finish cleanly (limit {timeout:.0f} s):\n{report}")
  return codes


def restore_params(workdir: pathlib.Path, step: int) -> dict:
  """The saved train state of `step` as host NumPy arrays, whatever mesh wrote it."""
  import jax
  import orbax.checkpoint as ocp
  path = workdir / "checkpoints" / str(step) / "state"
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
    return jax.tree.map(np.asarray, ckptr.restore(path, target))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """Digits prepared once, before the runs. Two processes preparing the same empty TFDS dir at
  once race: the second to finish fails renaming its `incomplete.*` dir (FileExistsError)."""
  d = str(tmp_path_factory.mktemp("tfds"))
  data.dataset_info(load_config("digits", "multi_cos,smoke", **{"dataset.data_dir": d}).dataset)
  return d


def test_two_processes_agree_with_one_process(data_dir, tmp_path):
  # Eval batches of 40 (20 per process): 9 per eval instead of 45.
  flags = [CONFIG, f"--config.dataset.data_dir={data_dir}", "--config.eval_batch_size=40"]
  ref_dir, dist_dir = tmp_path / "one_process", tmp_path / "two_processes"
  address = f"127.0.0.1:{free_port()}"
  procs = {
      "reference (1 process, 2 devices)": (
          start(["-c", REFERENCE, *flags, f"--workdir={ref_dir}"], env_with(2),
                tmp_path / "reference.log"),
          tmp_path / "reference.log"),
  }
  for i in (0, 1):
    log = tmp_path / f"process{i}.log"
    procs[f"process {i} of 2"] = (
        start(["-m", "featdiv_jax.main", *flags, f"--workdir={dist_dir}",
               f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
              env_with(1), log), log)
  wait_all(procs, TIMEOUT_S)

  # Really one job of two processes, not two independent one-process runs; each logs the detail
  # to its own file in the workdir, and only process 0 shows progress on its terminal.
  for i, name in ((0, "train.log"), (1, "train.process1.log")):
    assert f"jax.distributed: process {i} of 2" in (dist_dir / name).read_text(), name
  terminals = [tail(tmp_path / f"process{i}.log", 10**7) for i in (0, 1)]
  assert "multi_cos step 6/6: eval accuracy" in terminals[0], terminals[0]
  assert "eval accuracy" not in terminals[1], terminals[1]
  assert not re.search(r"^I\d{4} ", terminals[1], re.M), terminals[1]  # no absl INFO line

  # Only process 0 prints the summary table and writes results.json (whole, no temporaries left) into the shared workdir.
  logs = [(tmp_path / f"process{i}.log").read_text(errors="replace") for i in (0, 1)]
  assert "multi_cos" in logs[0].split("variant     heads")[-1] and "variant     heads" not in logs[1]
  assert not list(dist_dir.glob("results.json.tmp*"))
  got = json.loads((dist_dir / "results.json").read_text())
  want = json.loads((ref_dir / "results.json").read_text())
  assert got["finished"] and want["finished"] and got["step"] == want["step"] == 6
  assert got["num_params"] == want["num_params"]
  assert [h["step"] for h in got["history"]] == [h["step"] for h in want["history"]] == [3, 6]
  for g, w in zip(got["history"], want["history"]):
    assert g["eval_count"] == w["eval_count"] == 360  # every test example once, padding masked
    for key in ("train_loss", "train_accuracy", "train_head_cosine", "eval_loss",
                "eval_accuracy", "eval_head_cosine"):
      np.testing.assert_allclose(g[key], w[key], rtol=RTOL, atol=ATOL,
                                 err_msg=f"step {g['step']} {key}")
  np.testing.assert_allclose(got["eval_head_cosine_matrix"], want["eval_head_cosine_matrix"],
                             rtol=RTOL, atol=ATOL)

  # The multi-process orbax save holds the same final state as the one-process save.
  steps = lambda d: sorted(int(p.name) for p in (d / "checkpoints").iterdir() if p.name.isdigit())
  assert steps(dist_dir) == steps(ref_dir) == [3, 6]
  # Each process wrote its part of the save (orbax's per-process OCDBT stores), process 0 the rest.
  assert {p.name for p in (dist_dir / "checkpoints/6/state").glob("ocdbt.process_*")} == \
      {"ocdbt.process_0", "ocdbt.process_1"}
  got_state, want_state = restore_params(dist_dir, 6), restore_params(ref_dir, 6)
  import jax
  paths = lambda t: [jax.tree_util.keystr(p) for p, _ in jax.tree.leaves_with_path(t)]
  assert paths(got_state) == paths(want_state)
  for (path, g), w in zip(jax.tree.leaves_with_path(got_state),
                          jax.tree.leaves(want_state)):
    np.testing.assert_allclose(g, w, rtol=RTOL, atol=ATOL, err_msg=jax.tree_util.keystr(path))




def one_line_error(call, *args, **kwargs) -> str:
  with pytest.raises(distributed.DeviceCountError) as e:
    call(*args, **kwargs)
  message = str(e.value)
  assert "\n" not in message, message
  return message


def test_check_devices_logs_the_counts_and_refuses_fewer_than_the_launcher_asked_for():
  check = distributed.check_devices
  assert check(None, 1, 1, 1, "cpu") == (
      "devices: 1 device in 1 process (1 local, cpu); no expected count "
      "(FEATDIV_EXPECT_DEVICES unset)")
  assert check(8, 8, 1, 8, "gpu") == "devices: 8 devices in 8 processes (1 local, gpu); expected 8"
  assert check(4, 8, 8, 1).endswith("expected 4 (more than expected)")
  # launch/slurm.sh's old layout: one task per node, and JAX gave each the GPU of SLURM_LOCALID
  message = one_line_error(check, 8, 2, 1, 2, "gpu")
  for part in ("sees 2 devices in 2 processes (1 local, gpu)", "asked for 8",
               "FEATDIV_EXPECT_DEVICES=8", "SLURM_LOCALID", "one task per GPU"):
    assert part in message, message
  # jax without its CUDA build falls back to the CPU; a TPU pod whose jax.distributed never
  # started; a missing host
  assert "jax runs on the CPU" in one_line_error(check, 4, 1, 1, 1, "cpu")
  assert "jax.distributed did not start" in one_line_error(check, 16, 4, 4, 1, "tpu")
  assert "missing" in one_line_error(check, 16, 12, 4, 3, "tpu")
  for bad in (0, -1, "8", 2.0, True):
    assert "invalid" in one_line_error(check, bad, 8, 8, 1)


def test_expected_devices_reads_the_launchers_variable_and_refuses_a_bad_value():
  expected = distributed.expected_devices
  assert expected({}) is None and expected({"FEATDIV_EXPECT_DEVICES": ""}) is None
  assert expected({"FEATDIV_EXPECT_DEVICES": "8"}) == 8
  assert expected({"FEATDIV_EXPECT_DEVICES": " 16\n"}) == 16
  for bad in ("eight", "0", "-4", "8.0", "8,8"):
    message = one_line_error(expected, {"FEATDIV_EXPECT_DEVICES": bad})
    assert f"FEATDIV_EXPECT_DEVICES={bad!r} is invalid" in message and "positive" in message


@pytest.mark.parametrize("env, detected", [
    ({}, False),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "8"}, True),
    ({"SLURM_NTASKS": "lots"}, False),
    ({"FEATDIV_NUM_PROCESSES": "1", "FEATDIV_PROCESS_ID": "0"}, False),  # a one-worker TPU VM
    ({"FEATDIV_NUM_PROCESSES": "4", "FEATDIV_PROCESS_ID": "0"}, True),   # launch/tpu_vm.sh pod
    ({"FEATDIV_NUM_PROCESSES": ""}, False),     # no metadata server answered
    ({"TPU_WORKER_HOSTNAMES": "a"}, False),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, True),   # GKE
    ({"TPU_PROCESS_ADDRESSES": "a:1,b:1"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"JAX_COORDINATOR_ADDRESS": ""}, False),
])
def test_cluster_detected(env, detected):
  assert distributed.cluster_detected(env) is detected


def test_one_process_without_jax_distributed_watches_sigterm_with_a_python_handler():
  import signal
  before = signal.getsignal(signal.SIGTERM)
  with guards.PreemptionWatch() as watch:
    assert watch.mode == "local" and signal.getsignal(signal.SIGTERM) == watch._handle
    watch.start(0)
    assert not watch.should_stop(1)
    signal.raise_signal(signal.SIGTERM)
    assert watch.should_stop(2)
  assert signal.getsignal(signal.SIGTERM) == before


PREEMPT_STEPS = 300  # never reached: the preemption stops the run within a few steps
SIGNAL_AT = 3


def test_ctrl_c_on_one_process_stops_both_at_the_same_step_and_a_rerun_resumes(data_dir,
                                                                                tmp_path):
  """A stop request on one process -- here a Ctrl-C (SIGINT), which featdiv_jax's handler passes
  on as the SIGTERM a VM's preemption notice is -- reaches JAX's own SIGTERM notifier (no Python
  SIGTERM handler once jax.distributed runs), spreads to the other process through the
  coordination service, and both stop at the same sync step: each saves its part of that step's
  checkpoint; process 1 says 'interrupted' and exits 130, process 0 (which had only the
  notice) says 'preempted' and exits 0. Re-running resumes from that step.

  The notice needs about a second to spread (JAX's notifier polls its flag once a second), so
  the sync step is some steps after the signal; an eval every 2 steps (9 batches) keeps that to
  a few steps on a loaded 2-core machine and well under PREEMPT_STEPS on a fast one. The re-run
  is the same command with the last step 2 after the saved one, not the rest of the 300.
  """
  workdir = tmp_path / "run"
  flags = [CONFIG, f"--config.dataset.data_dir={data_dir}", f"--workdir={workdir}",
           "--config.eval_every_steps=2",
           "--config.eval_batch_size=40", "--config.log_every_steps=10",
           # no checkpoint before the last step: the one saved is the preemption's
           f"--config.checkpoint_every_steps={PREEMPT_STEPS}"]

  def run_both(name, total_steps, fault=None):
    address = f"127.0.0.1:{free_port()}"
    procs = {}
    for i in (0, 1):
      env = env_with(1)
      if fault and i == 1:
        env["FEATDIV_FAULT"] = fault
      log = tmp_path / f"{name}{i}.log"
      procs[f"{name}: process {i} of 2"] = (
          start(["-m", "featdiv_jax.main", *flags, f"--config.total_steps={total_steps}",
                 f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
                env, log), log)
    wait_all(procs, TIMEOUT_S, expected={f"{name}: process 1 of 2": 130} if fault else None)
    return [(tmp_path / f"{name}{i}.log").read_text(errors="replace") for i in (0, 1)]

  # SIGINT to process 1 only, at step 3 (its own os.kill).
  logs = run_both("stopped", PREEMPT_STEPS, fault=f"step:{SIGNAL_AT}:INT")
  stopped = []
  for i, (log, said) in enumerate(zip(logs, (r"preempted \(SIGTERM\)", "interrupted"))):
    found = re.findall(rf"featdiv_jax: {said} at step (\d+) of {PREEMPT_STEPS}: checkpoint "
                       "saved", log)
    assert len(found) == 1 and "Traceback" not in log, f"process {i}:\n{log[-4000:]}"
    stopped.append(int(found[0]))
  step = stopped[0]
  assert stopped == [step, step] and SIGNAL_AT < step < PREEMPT_STEPS, stopped
  saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert saved == [step], saved
  assert {p.name for p in (workdir / f"checkpoints/{step}/state").glob("ocdbt.process_*")} == \
      {"ocdbt.process_0", "ocdbt.process_1"}
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == step and not results["finished"]

  logs = run_both("resumed", step + 2)
  assert f"resuming from step {step} of {step + 2}" in logs[0], logs[0][-4000:]
  for i, name in enumerate(("train.log", "train.process1.log")):  # each process's own log
    log = (workdir / name).read_text()
    assert f"Resuming {workdir} from step {step}" in log, f"process {i}:\n{log[-4000:]}"
  results = json.loads((workdir / "results.json").read_text())
  assert results["finished"] and results["step"] == step + 2
  # the evals before the preemption come back with the checkpoint; the re-run adds its own
  evals = [s for s in range(2, step + 3, 2)] + ([step + 2] if step % 2 else [])
  assert [h["step"] for h in results["history"]] == evals
