"""Data parallelism divides the work with XLA's convolutions: the compiled train step's HLO.

Under `nn.vmap`, per-head kernels make each convolution one grouped convolution, and XLA's SPMD
partitioner gathers the whole global batch onto every device for it (openxla/xla#47945): numbers
stay right, so only the compiled program shows it. These tests compile the project's train step
(`steps.make_trainer`) for abstract inputs on 8 simulated CPU devices with `conv_impl="xla"` (the
default on GPUs and TPUs) and read the partitioned HLO and XLA's per-device FLOP count. The last
test runs the same compiled steps on one device and on both meshes and compares the numbers.

Compiling is what costs (XLA:CPU, 2 cores), so each (heads, mesh) program compiles once, at
backend optimisation level 0: that setting changes LLVM's code generation only, not the HLO
passes (SPMD partitioning, cost analysis) read here, and halves the compile time.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from featdiv_jax import checkpoint, configlib, models, sharding, steps

BATCH, SIZE, CLASSES = 16, 16, 10
FEATURE_MAP = (2, 2, 64)  # seresnet_tiny, CIFAR stem, 16 px: maps 16, 8, 4, 2
COMPILE_OPTIONS = {"xla_backend_optimization_level": 0}


def config(num_heads):
  c = configlib.apply_arg(configlib.default_config(), f"multi_cos,heads={num_heads},smoke")
  c.model.conv_impl = "xla"
  c.model.stem = "cifar"
  c.dataset.image_size = SIZE
  c.batch_size = BATCH
  c.optimizer.name = "sgd"  # fewer update ops to compile than AdamW; the update is replicated
  return c


@functools.lru_cache(maxsize=None)
def compiled(num_heads, mesh_shape):
  """(trainer, compiled train step) of `num_heads` heads on a mesh of the first devices."""
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  trainer = steps.make_trainer(config(num_heads), CLASSES,
                               sharding.make_mesh(mesh_shape, devices=devices), total_steps=10)
  state = checkpoint.abstract_with_shardings(trainer.abstract_state, trainer.state_shardings)
  batch = {"image": jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32,
                                         sharding=trainer.batch_sharding),
           "label": jax.ShapeDtypeStruct((BATCH,), jnp.int32, sharding=trainer.batch_sharding)}
  return trainer, trainer.train_step.lower(state, batch).compile(COMPILE_OPTIONS)


def gathered_shapes(step) -> list:
  """The result shape of every all-gather in the compiled (per-device) program."""
  shapes = []
  for result in re.findall(r"=\s*(.*?)\s+all-gather(?:-start)?\(", step.as_text()):
    dims = re.findall(r"[a-z]\w*\[([\d,]*)\]", result)[-1]
    shapes.append(tuple(int(d) for d in dims.split(",") if d))
  return shapes


def flops(step) -> float:
  analysis = step.cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)["flops"]


def flop_ratio(num_heads, mesh_shape) -> float:
  """Per-device FLOPs of the step on `mesh_shape` over those of the one-device step."""
  return flops(compiled(num_heads, mesh_shape)[1]) / flops(compiled(num_heads, (1, 1))[1])


@pytest.mark.parametrize("num_heads", [2, 4])
def test_data_axis_gathers_no_activations_and_divides_the_work(num_heads):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
  _, step = compiled(num_heads, (8, 1))
  # Rank >= 4: activations, the input batch, convolution kernels. Before the heads were computed
  # in turn: 22 such all-gathers, of the global batch's activations (f32[16,16,16,8K], ...).
  big = [s for s in gathered_shapes(step) if len(s) >= 4]
  assert not big, f"all-gathers of activations on the (8, 1) mesh: {big}"
  if num_heads == 2:  # the one-device compile is the costly part; K=2 stands for both
    # Ideal 1/8; the replicated optimizer update and the tiny model's 2 images per device make
    # it 0.14. Before: 0.64, every device computing every image's convolutions.
    assert flop_ratio(num_heads, (8, 1)) < 0.25


def test_heads_axis_splits_the_heads_between_device_groups():
  """Mesh (4, 2), 2 heads: each group of 4 devices runs its own head on the batch split 4 ways."""
  num_heads, (data, heads) = 2, (4, 2)
  _, step = compiled(num_heads, (data, heads))
  # All that crosses the heads axis is the heads' final feature maps (K, B/data, H, W, C), which
  # the penalty and the fused classifier compare. Before: 70 all-gathers, of the global batch and
  # of the activations and kernels of every head onto every device.
  features = sorted((num_heads, BATCH // data) + FEATURE_MAP)
  other = [s for s in gathered_shapes(step) if sorted(s) != features]
  assert not other, f"all-gathers besides the final feature maps on the (4, 2) mesh: {other}"
  # Both heads on every device would be 1/4 of the one-device step; each its own head, 1/8
  # (0.13 measured). Before: 0.63.
  assert flop_ratio(num_heads, (data, heads)) < 0.2


def synthetic_state(abstract):
  """Deterministic values of a state's (or variables') shapes, without an init to compile: params
  normal, every other float (BatchNorm statistics, Adam moments) in [0.5, 1.5], integers 0."""
  rng = np.random.default_rng(0)

  def leaf(path, a):
    if not jnp.issubdtype(a.dtype, jnp.floating):
      return np.zeros(a.shape, a.dtype)
    if jax.tree_util.keystr(path).startswith((".params", "['params']")):
      return (0.3 * rng.normal(size=a.shape)).astype(a.dtype)
    return rng.uniform(0.5, 1.5, size=a.shape).astype(a.dtype)

  return jax.tree.map_with_path(leaf, abstract)


def test_partitioned_steps_compute_what_one_device_computes():
  num_heads = 2
  trainer, _ = compiled(num_heads, (1, 1))
  host_state = synthetic_state(trainer.abstract_state)
  rng = np.random.default_rng(1)
  batch = {"image": rng.normal(size=(BATCH, SIZE, SIZE, 3)).astype(np.float32),
           "label": rng.integers(0, CLASSES, size=BATCH).astype(np.int32)}

  def run(mesh_shape):
    trainer, step = compiled(num_heads, mesh_shape)
    state = jax.device_put(host_state, trainer.state_shardings)
    # The compiled program takes the run's seed key too (`steps.SeededStep`).
    new, metrics = step(state, jax.device_put(batch, trainer.batch_sharding),
                        trainer.train_step.seed_key)
    return jax.device_get((new.params, new.batch_stats, metrics))

  ref = run((1, 1))
  for mesh_shape in [(8, 1), (4, 2)]:
    params, stats, metrics = run(mesh_shape)
    for k in ("loss", "cross_entropy", "penalty", "accuracy"):
      np.testing.assert_allclose(metrics[k], ref[2][k], rtol=2e-5, atol=1e-6,
                                 err_msg=f"{mesh_shape} {k}")
    close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5,
                              err_msg=f"{mesh_shape}")
    jax.tree.map(close, params, ref[0])
    jax.tree.map(close, stats, ref[1])


def test_heads_in_turn_compute_what_each_head_computes_alone():
  """The path XLA's convolutions take (no grouped convolution left): each head's features and
  BatchNorm updates are those of a single SE-ResNet with its variables; a frozen head normalises
  with its running statistics and keeps them."""
  x = np.random.default_rng(2).normal(size=(4, SIZE, SIZE, 3)).astype(np.float32)
  net = models.create_multihead("seresnet_tiny", 2, CLASSES, stem="cifar", conv_impl="xla",
                                frozen_heads=(1,))
  variables = synthetic_state(jax.eval_shape(net.init, jax.random.key(0), x))

  def compile_apply(model, train):
    fn = functools.partial(model.apply, train=train, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(1)})
    return jax.jit(fn).lower(variables if model is net else models.extract_head(variables, 0),
                             x).compile(COMPILE_OPTIONS)

  multi = compile_apply(net, True)
  assert "feature_group_count=2" not in multi.as_text().replace(" ", "")
  (_, features), updates = multi(variables, x)
  single = models.create_model("seresnet_tiny", 0, stem="cifar", conv_impl="xla")
  for k, train in [(0, True), (1, False)]:  # head 1 is frozen
    feats, head_updates = compile_apply(single, train)(models.extract_head(variables, k), x)
    np.testing.assert_allclose(features[k], feats, rtol=1e-5, atol=1e-5, err_msg=f"head {k}")
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
                 models.extract_head(updates, k)["batch_stats"], head_updates["batch_stats"])
