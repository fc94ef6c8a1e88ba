"""Test setup: 8 simulated CPU devices (sharding tests need them), before jax is imported."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# XLA:CPU compiles threefry random-number code slowly (about 0.8 s per parameter initialiser on
# the 2-core CI machine, 14 s for a tiny 3-head model's init); the RngBitGenerator-based key is
# compiled in a fraction of that. Tests only need determinism, not threefry's bit stream.
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
# Compiling is most of what the suite does; XLA's backend optimisation (LLVM) is what costs, and
# it changes how fast the code runs, not what it computes, nor the HLO passes (sharding, fusion)
# that tests read. Without it the suite's compile-bound tests take 0.7x the time (2-core CPU).
# Subprocesses (the CLI tests) inherit it. JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns it back on.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# Many tests compile the same tiny models; a per-session persistent cache lets identical
# programs (same HLO) compile once. A fresh directory each session: nothing stale carries over.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="featdiv-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
