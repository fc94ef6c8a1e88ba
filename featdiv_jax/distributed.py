"""Starting JAX's own distributed runtime (`jax.distributed`) for multi-host runs, and checking
that the job sees the devices its launcher asked for.

It must start before jax touches a device, so the entry point calls `maybe_initialize` right
after the command line is parsed and before the config is validated against the device count;
then `check_devices` logs the device counts and refuses a job that sees fewer devices than the
launcher asked for (`FEATDIV_EXPECT_DEVICES`).

What the launchers in `launch/` export for a job (all optional; a plain `python -m
featdiv_jax.main` sets none of them):
  FEATDIV_EXPECT_DEVICES  the number of devices the whole job should see (jax.device_count())
  FEATDIV_NUM_PROCESSES   the number of processes of the job (a Cloud TPU VM pod slice's workers,
                          from the VM's metadata server); more than 1 makes `distributed=auto`
                          start jax.distributed, which then finds the workers by itself
  FEATDIV_PROCESS_ID      this process's index among them (the sweep's primary-worker check)
"""

import os
from typing import Mapping, Optional

import jax
from absl import logging

EXPECT_DEVICES_VAR = "FEATDIV_EXPECT_DEVICES"
NUM_PROCESSES_VAR = "FEATDIV_NUM_PROCESSES"
PROCESS_ID_VAR = "FEATDIV_PROCESS_ID"

# Environment variables that say this process is one of several in a cluster job.
_CLUSTER_COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")
# GKE's TPU pods list their workers in the environment (Cloud TPU VMs do not: JAX asks the
# metadata server there, and launch/tpu_vm.sh exports FEATDIV_NUM_PROCESSES instead).
_TPU_WORKER_LIST_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES")


class DeviceCountError(ValueError):
  """The job sees fewer devices than its launcher asked for, or a launcher variable is bad."""


def _count(environ: Mapping[str, str], name: str, default: int) -> int:
  """An integer environment variable; `default` when unset, empty or not an integer."""
  try:
    return int(environ.get(name, "").strip())
  except ValueError:
    return default


def cluster_detected(environ: Optional[Mapping[str, str]] = None) -> bool:
  """A multi-task SLURM job step, a multi-worker TPU pod (launch/tpu_vm.sh's
  FEATDIV_NUM_PROCESSES, or GKE's worker list), or a coordinator set in the environment."""
  env = os.environ if environ is None else environ
  multi_slurm = _count(env, "SLURM_NTASKS", 1) > 1
  launcher = _count(env, NUM_PROCESSES_VAR, 1) > 1
  gke_tpu_pod = any("," in env.get(v, "") for v in _TPU_WORKER_LIST_VARS)
  return (multi_slurm or launcher or gke_tpu_pod
          or any(env.get(v) for v in _CLUSTER_COORDINATOR_VARS))


def maybe_initialize(mode: str, coordinator_address: Optional[str] = None,
                     num_processes: Optional[int] = None,
                     process_id: Optional[int] = None) -> bool:
  """Starts jax.distributed when `mode` (config.distributed) or the flags ask for it.

  mode: `on` always, `off` never (unless a coordinator address is given), `auto` when
  `cluster_detected()`. Returns whether the runtime is (now) running. JAX finds what is not
  given itself: SLURM's variables, or a Cloud TPU VM's metadata server.
  """
  explicit = coordinator_address is not None
  if not explicit and (mode == "off" or (mode == "auto" and not cluster_detected())):
    return False
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return True


def expected_devices(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
  """FEATDIV_EXPECT_DEVICES as a positive int; None when unset or empty. DeviceCountError,
  in one line, for any other value."""
  env = os.environ if environ is None else environ
  text = env.get(EXPECT_DEVICES_VAR, "").strip()
  if not text:
    return None
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise DeviceCountError(
        f"{EXPECT_DEVICES_VAR}={env[EXPECT_DEVICES_VAR]!r} is invalid; valid: a positive "
        "integer (the number of devices the launcher asked for), or unset for no check")
  return value


def check_devices(expected: Optional[int], device_count: int, local_count: int,
                  process_count: int, platform: Optional[str] = None) -> str:
  """The log line of the devices this job sees; DeviceCountError (one line: the expected and
  seen counts and the likely cause) when it sees fewer than `expected` (None: no check).

  device_count, local_count, process_count: jax.device_count(), jax.local_device_count(),
  jax.process_count(); platform: jax.default_backend() (only used to name the cause).
  """
  if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int)
                               or expected < 1):
    raise DeviceCountError(f"expected device count {expected!r} is invalid; valid: a positive "
                           "integer or None")
  seen = (f"{device_count} device{'s' * (device_count != 1)} in {process_count} "
          f"process{'es' * (process_count != 1)} ({local_count} local"
          f"{f', {platform}' if platform else ''})")
  if expected is None:
    return f"devices: {seen}; no expected count ({EXPECT_DEVICES_VAR} unset)"
  if device_count >= expected:
    more = "" if device_count == expected else " (more than expected)"
    return f"devices: {seen}; expected {expected}{more}"
  raise DeviceCountError(
      f"this job sees {seen} but its launcher asked for {expected} "
      f"({EXPECT_DEVICES_VAR}={expected}); refusing to train on fewer: "
      f"{_likely_cause(expected, local_count, process_count, platform)}")


def _likely_cause(expected: int, local_count: int, process_count: int,
                  platform: Optional[str]) -> str:
  if platform == "cpu":
    return ("jax runs on the CPU, not on the accelerators: jax's GPU/TPU build is missing or "
            "cannot open them (pip install -e '.[cuda12]' or '.[tpu]'; check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES)")
  if process_count == 1:
    return ("one process: jax.distributed did not start, so this host trains alone (check "
            "--config.distributed, and that every host runs the job from the same launcher)")
  if local_count == 1 and expected >= 2 * process_count:
    return (f"each of the {process_count} processes sees one device: under SLURM, JAX gives "
            "a process only the GPU of its SLURM_LOCALID, so one task per node uses one GPU; "
            "start one task per GPU (launch/slurm.sh does) or set JAX_LOCAL_DEVICE_IDS")
  return (f"{process_count} processes with {local_count} device(s) each: a host, task or "
          "device of the allocation is missing (check the job's node and GPU counts and "
          "CUDA_VISIBLE_DEVICES)")
