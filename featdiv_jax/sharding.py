"""The (data, heads) device mesh and where each array lives on it.

Batches are split over `data`. Everything that carries the stacked head axis (params, BatchNorm
statistics and optimizer moments under a `heads` key) is split over `heads` when that axis has
more than one device; all else is replicated. `jax.jit` with these shardings is what pjit became.
The work follows the same split: each device computes its slice of the batch and, over a heads
axis of n devices, only its own K/n heads (`models.multihead`; docs/performance.md, "Data
parallelism and grouped convolutions").
"""

import collections
import itertools
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "heads")
DATA_AXIS, HEADS_AXIS = AXES


class MeshError(ValueError):
  pass


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple:
  """(data, heads) with one -1 filled in from the device count; raises MeshError if it can't."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != 2 or shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise MeshError(f"mesh={shape}: expected (data, heads) of positive sizes, at most one -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if num_devices % known:
      raise MeshError(f"mesh={shape}: {known} does not divide the {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if int(np.prod(shape)) != num_devices:
    raise MeshError(f"mesh={shape} has {int(np.prod(shape))} devices, but there are "
                    f"{num_devices}; use sizes whose product is {num_devices}, or -1")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1), devices=None) -> jax.sharding.Mesh:
  devices = devices if devices is not None else jax.devices()
  shape = resolve_mesh_shape(shape, len(devices))
  kwargs = {}
  if hasattr(jax.sharding, "AxisType"):  # classic (auto) sharding propagation under jit
    kwargs["axis_types"] = (jax.sharding.AxisType.Auto,) * len(AXES)
  return jax.make_mesh(shape, AXES, devices=devices, **kwargs)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def state_shardings(mesh, abstract_state: Any, num_heads: int) -> Any:
  """A NamedSharding per leaf: the head axis over `heads`, everything else replicated."""
  split_heads = mesh.shape[HEADS_AXIS] > 1

  def spec(path, leaf):
    under_heads = any(getattr(p, "key", None) == "heads" for p in path)
    shape = getattr(leaf, "shape", ())
    if split_heads and under_heads and len(shape) >= 1 and shape[0] == num_heads:
      return NamedSharding(mesh, P(HEADS_AXIS))
    return NamedSharding(mesh, P())

  return jax.tree.map_with_path(spec, abstract_state)


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """This process's slice of the batch -> global arrays sharded over `data`."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


PREFETCH = 2  # batches on the device ahead of the one a step is running on


def prefetch(local_batches: Iterator[dict], sharding: NamedSharding, size: int = PREFETCH
             ) -> Iterator[dict]:
  """`global_batch` of each local batch, made `size` batches ahead of the one yielded.

  The loop asks for batch t just before dispatching step t, while step t - 1 still runs on the
  device (dispatch is asynchronous): this takes batch t + size from the host pipeline and
  starts its transfer then, so the transfers overlap the running steps. Same batches, same order.
  """
  queue = collections.deque(global_batch(b, sharding)
                            for b in itertools.islice(local_batches, size))
  while queue:
    queue.extend(global_batch(b, sharding) for b in itertools.islice(local_batches, 1))
    yield queue.popleft()
