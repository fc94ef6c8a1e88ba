"""K SE-ResNet heads as one `nn.vmap`-ed module, their feature maps fused and classified.

The heads' params and batch_stats carry a leading axis of size K (`params["heads"]`), so the K
backbones run as one batched computation, can be sharded over a `heads` mesh axis, and head k is
`tree.map(lambda a: a[k], ...)` of the stacked variables.
"""

from typing import Any, Mapping, Sequence

import flax.linen as nn
from flax.core import FrozenDict
import jax
import jax.numpy as jnp
import numpy as np

from featdiv_jax.models.resnet import SEResNet, backbone_fields

FUSIONS = ("concat", "sum")
CLASSIFIERS = ("flatten_mlp", "pool_linear", "pool_mlp")


def fuse(features: jax.Array, fusion: str) -> jax.Array:
  """(K, B, H, W, C) -> (B, H, W, C) for `sum`, (B, H, W, K*C) for `concat` (head-major)."""
  if fusion == "sum":
    return jnp.sum(features, axis=0)
  if fusion == "concat":
    k, b, h, w, c = features.shape
    return jnp.transpose(features, (1, 2, 3, 0, 4)).reshape(b, h, w, k * c)
  raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")


class MultiHeadNet(nn.Module):
  """K vmapped SE-ResNet feature extractors, fused and classified.

  Returns `(logits, features)` with features stacked as (K, B, H, W, C), which is what the
  cosine diversity penalty reads. Heads listed in `frozen_heads` normalise with their running
  BatchNorm statistics, leave them unchanged and pass no gradient; the optimizer side of freezing
  is `featdiv_jax.optim.freeze_heads`. K=1 with `pool_linear` is exactly a single SE-ResNet.
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

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(
          f"unknown classifier {self.classifier!r}; valid: {', '.join(CLASSIFIERS)}")
    dtype = self.backbone.get("dtype", jnp.float32)
    frozen = None
    args = (x, train)
    if self.frozen_heads:
      frozen = jnp.asarray(np.isin(np.arange(self.num_heads), self.frozen_heads))
      args += (frozen,)
    if self.heads_impl == "loop":
      features = jnp.stack([
          SEResNet(**dict(self.backbone), num_classes=0, name=f"head_{k}")(
              x, train, None if frozen is None else frozen[k])
          for k in range(self.num_heads)])
    elif self.heads_impl == "vmap" and self.num_heads == 1 and not self.is_initializing():
      # One head: the same stacked variables (initialised by nn.vmap below, so identical), but
      # computed without the size-1 vmap, whose batched matmuls XLA:CPU ran 1.25x slower.
      head = nn.map_variables(
          SEResNet, ("params", "batch_stats", "intermediates"),
          trans_in_fn=lambda tree: jax.tree.map(lambda a: a[0], tree),
          trans_out_fn=lambda tree: jax.tree.map(lambda a: a[None], tree), mutable=True,
      )(**dict(self.backbone), num_classes=0, name="heads")
      features = head(x, train, None if frozen is None else frozen[0])[None]
    elif self.heads_impl == "vmap":
      heads = nn.vmap(
          SEResNet,
          variable_axes={"params": 0, "batch_stats": 0, "intermediates": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(None, None) + ((0,) if frozen is not None else ()),
          axis_size=self.num_heads,
      )(**dict(self.backbone), num_classes=0, name="heads")
      # `train` goes positionally: nn.vmap drops keyword arguments.
      features = heads(*args)
    else:
      raise ValueError(f"heads_impl={self.heads_impl!r}; valid: vmap, loop")
    if frozen is not None:
      features = jnp.where(frozen[:, None, None, None, None],
                           jax.lax.stop_gradient(features), features)

    y = fuse(features, self.fusion)
    if self.classifier == "flatten_mlp":
      y = y.reshape(y.shape[0], -1)
    else:
      y = jnp.mean(y, axis=(1, 2))
    if self.classifier != "pool_linear":
      y = nn.Dense(self.hidden, dtype=dtype, name="hidden")(y)
      y = nn.gelu(y, approximate=False)  # torch's nn.GELU default is the exact erf form
      y = nn.Dropout(self.dropout, deterministic=not train)(y)
    logits = nn.Dense(self.num_classes, dtype=dtype, name="fc")(y)
    return logits.astype(jnp.float32), features


def create_multihead(arch: str, num_heads: int, num_classes: int, *, fusion: str = "concat",
                     classifier: str = "flatten_mlp", hidden: int = 512, dropout: float = 0.5,
                     frozen_heads: Sequence[int] = (), heads_impl: str = "vmap",
                     **options) -> MultiHeadNet:
  """A MultiHeadNet of `num_heads` `arch` backbones; `options` as for `create_model`."""
  if num_heads < 1:
    raise ValueError(f"num_heads must be >= 1, got {num_heads}")
  if fusion not in FUSIONS:
    raise ValueError(f"unknown fusion {fusion!r}; valid: {', '.join(FUSIONS)}")
  if classifier not in CLASSIFIERS:
    raise ValueError(f"unknown classifier {classifier!r}; valid: {', '.join(CLASSIFIERS)}")
  if heads_impl == "loop" and frozen_heads:
    raise ValueError("frozen_heads needs heads_impl='vmap' (the stacked `heads` parameters)")
  bad = [k for k in frozen_heads if not 0 <= int(k) < num_heads]
  if bad:
    raise ValueError(f"frozen_heads {list(frozen_heads)} has index(es) {bad} outside "
                     f"0..{num_heads - 1} for num_heads={num_heads}")
  return MultiHeadNet(
      backbone=FrozenDict(backbone_fields(arch, **options)), num_heads=num_heads, num_classes=num_classes,
      fusion=fusion, classifier=classifier, hidden=hidden, dropout=dropout,
      frozen_heads=tuple(sorted({int(k) for k in frozen_heads})), heads_impl=heads_impl)


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
