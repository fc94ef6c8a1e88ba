"""Keep freed host memory for reuse, so XLA:CPU's per-step buffers do not page-fault every step.

XLA:CPU allocates each execution's temporaries as one block with `malloc` and frees it at the end.
The executions run on worker threads, whose glibc arenas serve any block that large with a fresh
`mmap` and give it back with `munmap`: every training step then touches hundreds of megabytes of
new pages, and the kernel faults in and zeroes each 4 KiB page again. For the 2-head seresnet18
step at 32 px on a 2-core machine that was about 60,000 page faults per step and a sixth of the
step time; with the CIFAR stem, 675,000 (docs/performance.md).

`reuse_freed_memory()` asks glibc for one arena (the main one, grown with `brk`), no `mmap` for
large blocks, and never to trim the heap (M_TRIM_THRESHOLD = -1; the largest positive value
mallopt takes, 2 GiB, still let the CIFAR-stem step's heap be trimmed): the block freed after
one step is the block the next step gets, already mapped. The price: the process keeps its peak
heap until it exits, which is what a training process does anyway.

Only where JAX will compute on the CPU: a machine with an NVIDIA GPU or a TPU device node keeps
glibc's defaults (its many tf.data threads keep their own arenas), unless JAX_PLATFORMS=cpu.
Call it before jax is imported -- the entry points (`python -m featdiv_jax.main`, `python -m
featdiv_jax.bench`) call it first thing. A no-op outside Linux/glibc, and when
`FEATDIV_MALLOC=default` is set in the environment.

Imports nothing but the standard library.
"""

import ctypes
import glob
import os
import platform
import sys

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# The same settings for a process started with them in its environment (glibc reads these at
# start-up): how `featdiv_jax.bench` runs the PyTorch reference, so both sides get them.
GLIBC_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
             "MALLOC_TRIM_THRESHOLD_": str(2**62)}

ENV = "FEATDIV_MALLOC"
applied = False  # whether reuse_freed_memory() changed glibc's settings in this process
CHOICES = ("reuse", "default")


# Device nodes of accelerators JAX computes on: NVIDIA GPUs, TPUs up to v4 (`accel`) and TPU
# v5e/v5p/v6e, which the TPU runtime reaches through VFIO groups (`/dev/vfio/<N>`).
ACCELERATOR_NODES = ("nvidia[0-9]*", "accel[0-9]*", "vfio/[0-9]*")


def _computes_on_cpu(dev: str = "/dev") -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(os.path.join(dev, pattern)) for pattern in ACCELERATOR_NODES)


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to reuse freed large blocks; returns whether it did."""
  choice = os.environ.get(ENV, "reuse")
  if choice not in CHOICES:
    raise ValueError(f"{ENV}={choice!r} is not one of {CHOICES}")
  if choice == "default" or not sys.platform.startswith("linux") or not _computes_on_cpu():
    return False
  if platform.libc_ver()[0] != "glibc":
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  global applied
  # One arena: blocks larger than a thread arena's heap (64 MiB) would be mmap-ed regardless of
  # M_MMAP_MAX; the main arena grows with brk instead. Then no mmap-ed blocks, and no trimming.
  applied = all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))  # -1: never trim (mallopt(3))
  return applied


def at_entry_point() -> None:
  """`reuse_freed_memory()` for a command-line entry point: a bad FEATDIV_MALLOC exits 1."""
  try:
    reuse_freed_memory()
  except ValueError as e:
    sys.exit(f"featdiv_jax: error: {e}")
