"""hostmem: XLA:CPU's per-execution buffers are reused instead of page-faulted in every step."""

import json
import os
import subprocess
import sys

import pytest

from featdiv_jax import hostmem

# A jitted function whose temporaries (a 9x "im2col" patch matrix, ~75 MB) exceed every
# mmap threshold; page faults counted over executions after the heap has reached its size.
_PROBE = r"""
import json, resource, sys
from featdiv_jax import hostmem
applied = hostmem.reuse_freed_memory()
import jax, jax.numpy as jnp
x = jnp.ones((32, 32, 32, 64), jnp.float32)
@jax.jit
def f(x):
  p = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate([p[:, i:i + 32, j:j + 32] for i in range(3) for j in range(3)], -1)
  return (cols @ jnp.ones((cols.shape[-1], 8), jnp.float32)).sum()
for _ in range(4):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
  f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print(json.dumps(dict(applied=applied, faults=faults)))
"""


def _probe(setting):
  env = dict(os.environ, FEATDIV_MALLOC=setting, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, check=True, capture_output=True,
                       text=True, timeout=300).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_removes_per_step_page_faults():
  default, reuse = _probe("default"), _probe("reuse")
  assert not default["applied"] and reuse["applied"]
  # glibc's defaults: the ~85 MB of temporaries are a fresh mmap in every execution (~35,000
  # 4 KiB pages each time). Reused, most executions fault in nothing; now and then the heap is
  # faulted in again once (seen: 0 to 4 times in 40 executions), hence a ratio, not zero.
  assert default["faults"] > 10_000, default
  assert reuse["faults"] < default["faults"] / 2, (reuse, default)


def test_bad_setting_is_one_clear_error(monkeypatch):
  monkeypatch.setenv(hostmem.ENV, "jemalloc")
  with pytest.raises(ValueError, match=r"FEATDIV_MALLOC='jemalloc' is not one of \('reuse', "
                                       r"'default'\)"):
    hostmem.reuse_freed_memory()


@pytest.mark.parametrize("platforms, expected",
                         [("cpu", True), ("cuda", False), ("tpu,cpu", False)])
def test_only_where_jax_computes_on_the_cpu(monkeypatch, platforms, expected):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  assert hostmem._computes_on_cpu() is expected


@pytest.mark.parametrize("nodes, expected", [
    ([], True), (["vfio/vfio"], True),  # the VFIO control node alone: no accelerator
    (["nvidia0", "nvidiactl"], False), (["accel0"], False),
    (["vfio/vfio", "vfio/0"], False)])  # TPU v5e / v5p / v6e
def test_accelerator_device_nodes_turn_it_off(monkeypatch, tmp_path, nodes, expected):
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  for node in nodes:
    (tmp_path / node).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / node).touch()
  assert hostmem._computes_on_cpu(str(tmp_path)) is expected


@pytest.mark.parametrize("module", ["featdiv_jax.main", "featdiv_jax.bench"])
def test_entry_points_reject_a_bad_setting(module):
  env = dict(os.environ, FEATDIV_MALLOC="jemalloc")
  r = subprocess.run([sys.executable, "-m", module, "--help"], env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 1
  assert r.stderr.strip().splitlines() == [
      "featdiv_jax: error: FEATDIV_MALLOC='jemalloc' is not one of ('reuse', 'default')"]
