"""K SE-ResNet heads as one module over stacked variables, their feature maps fused and classified.

The heads' params and batch_stats carry a leading axis of size K (`params["heads"]`), so they can
be sharded over a `heads` mesh axis, and head k is `tree.map(lambda a: a[k], ...)` of the stacked
variables. They are created by one `nn.vmap` of SEResNet; how they are computed depends on the
convolution (docs/performance.md, "Data parallelism and grouped convolutions"):

- im2col convolutions: the same `nn.vmap`, whose convolutions become batched matmuls.
- XLA's convolutions: the heads one after another (`nn.scan` over the stacked variables). Under
  `nn.vmap` a per-head kernel makes one grouped convolution (`feature_group_count=K`), and XLA's
  SPMD partitioner cannot keep a batch sharding through it: it gathers the whole global batch onto
  every device (openxla/xla#47945), so data parallelism stopped dividing the work.
  When the input is laid out on a mesh whose `heads` axis has n > 1 devices, that scan runs
  under `jax.shard_map` over the axis: each device group computes its own K/n heads, on the
  batch as split over `data`, from the variables it holds (the partitioner alone would gather the
  stacked kernels onto every device instead).
"""

from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax.core import FrozenDict, lift
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from featdiv_jax.models.resnet import SEResNet, backbone_fields
from featdiv_jax.sharding import HEADS_AXIS

FUSIONS = ("concat", "sum")
CLASSIFIERS = ("flatten_mlp", "pool_linear", "pool_mlp")
FROZEN_BN = ("running", "batch")  # how a frozen head's BatchNorm normalises (MultiHeadNet)
HEADS_IMPLS = ("vmap", "loop")  # loop: K separate modules, for benchmarking against vmap
HEAD_COLLECTIONS = ("params", "batch_stats", "intermediates")  # stacked on a leading K axis


def fuse(features: jax.Array, fusion: str) -> jax.Array:
  """(K, B, H, W, C) -> (B, H, W, C) for `sum`, (B, H, W, K*C) for `concat` (head-major)."""
  if fusion == "sum":
    return jnp.sum(features, axis=0)
  if fusion == "concat":
    k, b, h, w, c = features.shape
    return jnp.transpose(features, (1, 2, 3, 0, 4)).reshape(b, h, w, k * c)
  raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")


def heads_mesh(x: jax.Array):
  """The mesh `x` is laid out on (as `jax.jit` traces it, or of a sharded array) if its `heads`
  axis has more than one device; else None (one device, or a mesh without such an axis)."""
  try:
    mesh = jax.typeof(x).sharding.mesh
    size = dict(zip(mesh.axis_names, mesh.axis_sizes)).get(HEADS_AXIS, 1)
  except (AttributeError, TypeError, ValueError):
    return None
  return mesh if size > 1 else None


def _heads_in_turn(heads: nn.Module, x, train: bool, flags: tuple, num_heads: int):
  """(num_heads, B, H, W, C): the stacked heads applied one after another.

  An `nn.scan` over the leading axis of the heads' variables: each step is one SE-ResNet with
  head k's variables, so its convolutions are plain ones, not the grouped convolution `nn.vmap`
  makes of per-head kernels. Variables, BatchNorm updates and intermediates come out stacked as
  under `nn.vmap`. Fully unrolled: XLA's cost analysis counts a while loop's body once, so a
  rolled scan would under-report the step's FLOPs K-fold (bench's `flops_per_step`); unrolling
  costs compile time (1.7x for K=4 on XLA:CPU; docs/performance.md). `flags`: the heads'
  per-head SEResNet arguments after `train` (`_head_flags`), scanned over with the variables.
  """

  def step(head, carry, x, *flag):
    return carry, head(x, train, *flag)

  scan = nn.scan(step, variable_axes={c: 0 for c in HEAD_COLLECTIONS},
                 split_rngs={"params": True, "dropout": True},
                 in_axes=(nn.broadcast,) + (0,) * len(flags), length=num_heads,
                 unroll=num_heads)
  _, features = scan(heads, (), x, *flags)
  return features


def _lifted_shard_map(fn, mesh, rngs: tuple):
  """flax.core's form of `jax.shard_map` over the mesh's heads axis (manual), its other axes
  left to the partitioner: `fn(scope, x, flags)` sees its device group's slice of every stacked
  variable (`HEAD_COLLECTIONS`, leading axis) and of the per-head `flags`, and the whole `x`.
  Its output and the variables it writes are concatenated back along their leading axis.

  The rngs named in `rngs` (("dropout",) for drop path, else none) go in with the device
  group's index folded in: the heads' scan splits them by the local head index, which alone
  would give head k of every group the same masks. So the masks' bits, not their distribution,
  depend on the heads' split over groups (a resumed run keeps its mesh: it repeats them)."""

  def inner(scope_fn, repack_fn, variable_groups, rng_groups, x, flags):
    heads = P(HEADS_AXIS)

    def local(variable_groups, rng_groups, x, flags):
      rng_groups = lift.tree_map_rngs(
          lambda key: jax.random.fold_in(key, jax.lax.axis_index(HEADS_AXIS)), rng_groups)
      scope = scope_fn(variable_groups, rng_groups)
      y = fn(scope, x, flags)
      return y, repack_fn(scope)

    return jax.shard_map(local, mesh=mesh, in_specs=(heads, P(), P(), heads),
                         out_specs=(heads, heads), axis_names=frozenset({HEADS_AXIS}))(
                             variable_groups, rng_groups, x, flags)

  return lift.pack(inner, HEAD_COLLECTIONS, HEAD_COLLECTIONS, rngs, name="shard_map")


def _heads_per_device_group(heads: nn.Module, x, train: bool, flags: tuple, num_heads: int,
                            mesh):
  """`_heads_in_turn` under a shard_map over the `heads` mesh axis: each device group runs its
  own num_heads / n heads, on the batch as split over the other axes."""
  groups = dict(zip(mesh.axis_names, mesh.axis_sizes))[HEADS_AXIS]
  if num_heads % groups:
    raise ValueError(f"{num_heads} heads do not split over a '{HEADS_AXIS}' mesh axis of "
                     f"{groups} devices; use a heads axis that divides num_heads")
  local_heads = num_heads // groups

  def per_group(head, x, flags):
    return _heads_in_turn(head, x, train, flags, local_heads)

  rngs = ("dropout",) if heads.drop_path > 0.0 else ()  # only drop path draws in the heads
  return nn.transforms.lift_transform(_lifted_shard_map, per_group, mesh, rngs)(
      heads, x, flags)


def _head_flags(bn_frozen, spared) -> tuple:
  """The per-head SEResNet arguments after `train` (`frozen`, `spared`), trailing Nones left
  out: none at all for heads that are not frozen, so the traced program is unchanged."""
  flags = (bn_frozen, spared)
  while flags and flags[-1] is None:
    flags = flags[:-1]
  return flags


class MultiHeadNet(nn.Module):
  """K SE-ResNet feature extractors on stacked variables (module docstring), fused, classified.

  Returns `(logits, features)` with features stacked as (K, B, H, W, C), which is what the
  cosine diversity penalty reads. Heads listed in `frozen_heads` pass no gradient; the optimizer
  side of freezing is `featdiv_jax.optim.freeze_heads`. How they normalise is `frozen_bn`:
  "running", with their running BatchNorm statistics, left unchanged; "batch" (the paper's
  notebooks, whose frozen head stays in train mode), with the batch's statistics, their running
  statistics updating as any head's. K=1 with `pool_linear` is exactly a single SE-ResNet.

  Stochastic depth (the backbone's `drop_path`) draws from the `dropout` rng, split over heads
  so that each head drops its own paths. Frozen heads drop none, whatever `frozen_bn`: their
  features stay those of the fixed pretrained network, as in the paper's protocol (with
  "batch" only the normalisation follows the batch, as the notebooks' train-mode head does).
  """
  backbone: Mapping[str, Any]  # SEResNet fields (a FrozenDict keeps the module hashable)
  num_heads: int
  num_classes: int
  fusion: str = "concat"
  classifier: str = "flatten_mlp"
  hidden: int = 512
  dropout: float = 0.5
  frozen_heads: Sequence[int] = ()
  heads_impl: str = "vmap"  # "loop": K separate modules, for benchmarking against vmap
  frozen_bn: str = "running"  # FROZEN_BN

  @nn.compact
  def __call__(self, x, train: bool = False, ablation_mask=None):
    """(logits, features); with `ablation_mask` (B,) also the (K, B, classes) logits of the
    model with head k's map replaced by its mean over the batch's masked-in examples (the
    classifier unchanged): what each head contributes (`featdiv_jax.analysis`)."""
    dtype = self.backbone.get("dtype", jnp.float32)
    frozen = None
    if self.frozen_heads:
      frozen = jnp.asarray(np.isin(np.arange(self.num_heads), self.frozen_heads))
    # What the heads' BatchNorm is told is frozen: nothing, when frozen heads normalise as in
    # training; the gradient is stopped below either way.
    bn_frozen = frozen if self.frozen_bn == "running" else None
    # What DropPath is told is frozen (class docstring): only needed when it drops paths.
    spared = frozen if self.backbone.get("drop_path", 0.0) > 0.0 else None
    flags = _head_flags(bn_frozen, spared)
    if self.heads_impl == "loop":
      features = jnp.stack([
          SEResNet(**dict(self.backbone), num_classes=0, name=f"head_{k}")(
              x, train, *(None if f is None else f[k] for f in flags))
          for k in range(self.num_heads)])
    elif self.num_heads == 1 and not self.is_initializing():
      # One head: the same stacked variables (initialised by nn.vmap below, so identical), but
      # computed without a size-1 vmap or scan, whose batched matmuls XLA:CPU runs slower
      # (docs/performance.md).
      head = nn.map_variables(
          SEResNet, HEAD_COLLECTIONS,
          trans_in_fn=lambda tree: jax.tree.map(lambda a: a[0], tree),
          trans_out_fn=lambda tree: jax.tree.map(lambda a: a[None], tree), mutable=True,
      )(**dict(self.backbone), num_classes=0, name="heads")
      features = head(x, train, *(None if f is None else f[0] for f in flags))[None]
    elif self.is_initializing() or self.backbone.get("conv_impl", SEResNet.conv_impl) != "xla":
      # Initialisation, whatever the convolution (so every path computes on the same variables
      # from the same rng), and im2col convolutions, which nn.vmap turns into batched matmuls
      # that XLA splits over `data` and `heads` as it should.
      heads = nn.vmap(
          SEResNet,
          variable_axes={c: 0 for c in HEAD_COLLECTIONS},
          split_rngs={"params": True, "dropout": True},
          in_axes=(None, None) + (0,) * len(flags),
          axis_size=self.num_heads,
      )(**dict(self.backbone), num_classes=0, name="heads")
      # `train` goes positionally: nn.vmap drops keyword arguments.
      features = heads(x, train, *flags)
    else:
      # XLA's convolutions: the heads in turn, so that no grouped convolution meets the batch
      # split over `data`; over a heads mesh axis, each device group runs its own heads.
      heads = SEResNet(**dict(self.backbone), num_classes=0, name="heads")
      mesh = heads_mesh(x)
      if mesh is not None:
        features = _heads_per_device_group(heads, x, train, flags, self.num_heads, mesh)
      else:
        features = _heads_in_turn(heads, x, train, flags, self.num_heads)
    if frozen is not None:
      features = jnp.where(frozen[:, None, None, None, None],
                           jax.lax.stop_gradient(features), features)

    # One set of classifier layers, applied to the features and to each head ablation.
    hidden = (nn.Dense(self.hidden, dtype=dtype, name="hidden")
              if self.classifier != "pool_linear" else None)
    dropout = nn.Dropout(self.dropout, deterministic=not train)
    fc = nn.Dense(self.num_classes, dtype=dtype, name="fc")

    def classify(maps):
      y = fuse(maps, self.fusion)
      if self.classifier == "flatten_mlp":
        y = y.reshape(y.shape[0], -1)
      else:
        y = jnp.mean(y, axis=(1, 2))
      if hidden is not None:
        y = dropout(nn.gelu(hidden(y), approximate=False))  # torch's nn.GELU: the erf form
      return fc(y).astype(jnp.float32)

    logits = classify(features)
    if ablation_mask is None:
      return logits, features
    weights = ablation_mask.astype(jnp.float32)
    means = (jnp.einsum("kbhwc,b->khwc", features.astype(jnp.float32), weights)
             / jnp.maximum(jnp.sum(weights), 1.0)).astype(features.dtype)
    ablated = jnp.stack([
        classify(features.at[k].set(jnp.broadcast_to(means[k], features.shape[1:])))
        for k in range(self.num_heads)])
    return logits, features, ablated


def create_multihead(arch: str, num_heads: int, num_classes: int, *, fusion: str = "concat",
                     classifier: str = "flatten_mlp", hidden: int = 512, dropout: float = 0.5,
                     frozen_heads: Sequence[int] = (), heads_impl: str = "vmap",
                     frozen_bn: str = "running", drop_path: float = 0.0,
                     **options) -> MultiHeadNet:
  """A MultiHeadNet of `num_heads` `arch` backbones; `options` as for `create_model`.
  `drop_path`: every head's stochastic-depth rate (timm's `drop_path_rate`; SEResNet)."""
  if num_heads < 1:
    raise ValueError(f"num_heads must be >= 1, got {num_heads}")
  if fusion not in FUSIONS:
    raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
  if classifier not in CLASSIFIERS:
    raise ValueError(f"unknown classifier {classifier!r}; valid: {', '.join(CLASSIFIERS)}")
  if heads_impl not in HEADS_IMPLS:
    raise ValueError(f"heads_impl={heads_impl!r}; valid: {', '.join(HEADS_IMPLS)}")
  if frozen_bn not in FROZEN_BN:
    raise ValueError(f"frozen_bn={frozen_bn!r}; valid: {', '.join(FROZEN_BN)}")
  if heads_impl == "loop" and frozen_heads:
    raise ValueError("frozen_heads needs heads_impl='vmap' (the stacked `heads` parameters)")
  bad = [k for k in frozen_heads if not 0 <= int(k) < num_heads]
  if bad:
    raise ValueError(f"frozen_heads {list(frozen_heads)} has index(es) {bad} outside "
                     f"0..{num_heads - 1} for num_heads={num_heads}")
  return MultiHeadNet(
      backbone=FrozenDict(backbone_fields(arch, drop_path=drop_path, **options)),
      num_heads=num_heads, num_classes=num_classes,
      fusion=fusion, classifier=classifier, hidden=hidden, dropout=dropout,
      frozen_heads=tuple(sorted({int(k) for k in frozen_heads})), heads_impl=heads_impl,
      frozen_bn=frozen_bn)


def _check_same_tree(stacked, single, what):
  s_paths = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree.leaves_with_path(stacked)}
  h_paths = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree.leaves_with_path(single)}
  missing = sorted(set(s_paths) - set(h_paths))
  extra = sorted(set(h_paths) - set(s_paths))
  if missing or extra:
    raise ValueError(f"{what}: head variables do not match the multi-head backbone; "
                     f"missing {missing[:5]}, unexpected {extra[:5]}")
  for path, shape in s_paths.items():
    if tuple(shape[1:]) != tuple(h_paths[path]):
      raise ValueError(f"{what}{path}: head has shape {tuple(h_paths[path])}, the multi-head "
                       f"backbone expects {tuple(shape[1:])}")


def place_head(variables: Mapping, head_variables: Mapping, k: int) -> dict:
  """Returns `variables` of a MultiHeadNet with head k replaced by a single SE-ResNet's weights.

  `head_variables` come from `create_model(...)` (its `fc` is ignored) or `load_timm_weights`,
  so a pretrained timm model can be one of the heads.
  """
  num_heads = jax.tree.leaves(variables["params"]["heads"])[0].shape[0]
  if not 0 <= k < num_heads:
    raise ValueError(f"head index {k} outside 0..{num_heads - 1}")
  out = {name: dict(col) for name, col in variables.items()}
  for col in ("params", "batch_stats"):
    head = {n: v for n, v in head_variables.get(col, {}).items() if n != "fc"}
    _check_same_tree(variables[col]["heads"], head, f"{col}")
    out[col]["heads"] = jax.tree.map(lambda s, h: s.at[k].set(h.astype(s.dtype)),
                                     variables[col]["heads"], head)
  return out


def extract_head(variables: Mapping, k: int) -> dict:
  """Head k of a MultiHeadNet as variables of a feature-only SE-ResNet (`num_classes=0`)."""
  return {col: jax.tree.map(lambda a: a[k], variables[col]["heads"])
          for col in ("params", "batch_stats") if col in variables}
