"""SE-ResNets in Flax linen, NHWC, built to match timm's `seresnet*` layer for layer.

One generic `SEResNet` takes the block type, stage sizes and widths as fields, so the five
published variants and tiny test models share every code path. Submodule names follow timm's
state-dict names (`conv1`, `bn1`, `layer1_0/conv1`, `.../se/fc1`, `.../downsample_conv`, `fc`),
which keeps the weight import a renaming, not a translation.
"""

import functools
from typing import Any, Callable, ClassVar, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
ModuleDef = Any

# timm initialises every conv with kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def se_reduced_width(channels: int) -> int:
  """timm's `make_divisible(channels / 16, 8, round_limit=0)`: 64->8, 256->16, 2048->128."""
  return max(8, int(channels / 16 + 4) // 8 * 8)


class BatchNorm(nn.Module):
  """BatchNorm with torch's semantics (eps 1e-5, momentum 0.1, unbiased running variance).

  Variables are named like flax's BatchNorm (params scale/bias, batch_stats mean/var). Statistics
  are computed in float32 whatever the compute dtype. `frozen` (a traced boolean, one per head
  under `nn.vmap`) makes a head normalise with its running statistics and leave them unchanged
  even in training, which is what freezing a pretrained head means.
  """
  use_running_average: bool
  frozen: Optional[jax.Array] = None
  momentum: float = 0.9
  epsilon: float = 1e-5
  scale_init: Callable = nn.initializers.ones
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", self.scale_init, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))

    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axes)
      var = jnp.mean(jnp.square(x32 - mean), axes)
      n = x.size // c
      new_mean = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      new_var = self.momentum * ra_var.value + (1 - self.momentum) * var * (n / max(n - 1, 1))
      if self.frozen is not None:
        mean = jnp.where(self.frozen, ra_mean.value, mean)
        var = jnp.where(self.frozen, ra_var.value, var)
        new_mean = jnp.where(self.frozen, ra_mean.value, new_mean)
        new_var = jnp.where(self.frozen, ra_var.value, new_var)
      if not self.is_initializing():
        ra_mean.value, ra_var.value = new_mean, new_var

    # Fold into one multiply-add in the compute dtype; the per-channel terms stay float32.
    mul = scale * jax.lax.rsqrt(var + self.epsilon)
    add = bias - mean * mul
    return x * mul.astype(self.dtype) + add.astype(self.dtype)


def _taps_reading_data(k: int, stride: int, out: int, pad: int, size: int):
  """Kernel offsets (along one axis) that read at least one real, not padded, input pixel."""
  return [i for i in range(k)
          if any(pad <= i + stride * o < pad + size for o in range(out))]


class PatchConv(nn.Module):
  """nn.Conv's parameters and result, computed as shifted slices + one matmul (im2col).

  Under `nn.vmap` over heads a convolution with a per-head kernel becomes a grouped convolution,
  which XLA:CPU runs several times slower than K separate ones; this form becomes a batched
  matmul instead. Kernel offsets that only ever see padding (8 of 9 of a 3x3 kernel on a 1x1
  map, 5 of 9 for a stride-2 3x3 conv from 2x2 to 1x1) are left out of the matmul: exact, and
  less work for the small maps a 32 px image reaches (docs/performance.md). Symmetric integer
  padding only (all timm SE-ResNet convs).
  """
  features: int
  kernel_size: Sequence[int]
  strides: int = 1
  padding: int = 0
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  kernel_init: Callable = conv_init

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    s, p = int(self.strides), int(self.padding)
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        jnp.float32).astype(self.dtype)
    x = x.astype(self.dtype)
    h, w = x.shape[1:3]
    ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
    rows = _taps_reading_data(kh, s, ho, p, h)
    cols = _taps_reading_data(kw, s, wo, p, w)
    if p:
      x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    patches = [x[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :]
               for i in rows for j in cols]
    patches = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
    if (len(rows), len(cols)) != (kh, kw):
      kernel = jnp.take(jnp.take(kernel, np.asarray(rows), axis=0), np.asarray(cols), axis=1)
    return patches @ kernel.reshape(-1, self.features)


class SqueezeExcite(nn.Module):
  """timm's SEModule: mean -> 1x1 conv (bias) -> ReLU -> 1x1 conv (bias) -> sigmoid -> scale."""
  reduced: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=conv_init)
    s = jnp.mean(x, axis=(1, 2))
    s = nn.relu(dense(self.reduced, name="fc1")(s))
    s = nn.sigmoid(dense(x.shape[-1], name="fc2")(s))
    return x * s[:, None, None, :].astype(x.dtype)


def drop_path_rates(rate: float, num_blocks: int) -> tuple:
  """Per-block stochastic-depth rates: timm's resnet `make_blocks`, `drop_path_rate *
  net_block_idx / (net_num_blocks - 1)` over the network's blocks in order, from 0 for the first
  block to `rate` for the last. A one-block network (where timm divides by zero) gets 0."""
  return tuple(rate * i / max(num_blocks - 1, 1) for i in range(num_blocks))


class DropPath(nn.Module):
  """timm's DropPath (stochastic depth): in training, each example's input is zeroed with
  probability `rate` and scaled by 1 / (1 - rate) otherwise, one draw per example (mask shape
  (B, 1, ..., 1)); the identity when `deterministic`. Noise comes from the `dropout` rng, which
  `nn.vmap` / `nn.scan` over heads split, so every head draws its own masks. `spared` (a traced
  boolean, one per head under `nn.vmap`) passes the input through unchanged: a frozen head.
  """
  rate: float
  deterministic: Optional[bool] = None
  spared: Optional[jax.Array] = None
  rng_collection: str = "dropout"

  @nn.compact
  def __call__(self, x, deterministic: Optional[bool] = None):
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return x
    keep_prob = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep = jax.random.bernoulli(self.make_rng(self.rng_collection), keep_prob, shape)
    scale = keep.astype(jnp.float32)
    if keep_prob > 0.0:
      scale = scale / keep_prob
    if self.spared is not None:
      scale = jnp.where(self.spared, 1.0, scale)
    return x * scale.astype(x.dtype)


class _Block(nn.Module):
  """Shared shortcut / SE / residual logic of timm's BasicBlock and Bottleneck.

  `drop_path` makes the block's DropPath (a partial with its rate), applied to the residual
  branch after squeeze-excite, before the shortcut is added, as in timm; None (rate 0): none.
  """
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  dtype: Dtype = jnp.float32
  zero_init_last: bool = True
  drop_path: Optional[ModuleDef] = None
  expansion: ClassVar[int] = 1

  def last_norm(self, name):
    init = nn.initializers.zeros if self.zero_init_last else nn.initializers.ones
    return self.norm(scale_init=init, name=name)

  def finish(self, x, y):
    out = self.features * self.expansion
    y = SqueezeExcite(se_reduced_width(out), dtype=self.dtype, name="se")(y)
    if self.drop_path is not None:
      y = self.drop_path(name="drop_path")(y)
    if self.strides != 1 or x.shape[-1] != out:
      x = self.conv(out, (1, 1), self.strides, padding=0, name="downsample_conv")(x)
      x = self.norm(name="downsample_bn")(x)
    return nn.relu(x + y)


class BasicBlock(_Block):
  expansion: ClassVar[int] = 1

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (3, 3), self.strides, padding=1, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.features, (3, 3), 1, padding=1, name="conv2")(y)
    y = self.last_norm("bn2")(y)
    return self.finish(x, y)


class Bottleneck(_Block):
  expansion: ClassVar[int] = 4

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (1, 1), 1, padding=0, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.features, (3, 3), self.strides, padding=1, name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.features * 4, (1, 1), 1, padding=0, name="conv3")(y)
    y = self.last_norm("bn3")(y)
    return self.finish(x, y)


STEMS = ("imagenet", "cifar")
CONV_IMPLS = ("xla", "im2col")  # plus "auto" in create_model: see default_conv_impl
DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes; plus "auto": see default_dtype


class SEResNet(nn.Module):
  """A timm SE-ResNet. With `num_classes=0` it returns the pre-pool feature map (B, H, W, C).

  `stem="imagenet"` is timm's 7x7/2 conv + 3x3/2 max-pool; `stem="cifar"` is a 3x3/1 conv with
  no pooling, the usual choice for 32x32 images (the ImageNet stem leaves a 1x1 final map there).
  `dtype` is the compute dtype; parameters and BatchNorm statistics stay float32.
  `drop_path` is timm's `drop_path_rate`: stochastic depth in training, at rates rising linearly
  over the blocks to it (`drop_path_rates`); no variables, and rate 0 adds no operation at all.
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  stem: str = "imagenet"
  num_classes: int = 1000
  zero_init_last: bool = True
  dtype: Dtype = jnp.float32
  conv_impl: str = "xla"
  drop_path: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False, frozen: Optional[jax.Array] = None,
               spared: Optional[jax.Array] = None):
    """`frozen`: BatchNorm's (see there); `spared`: DropPath's, drop no paths (a frozen head)."""
    conv = functools.partial(nn.Conv if self.conv_impl == "xla" else PatchConv,
                             use_bias=False, dtype=self.dtype, kernel_init=conv_init)
    norm = functools.partial(
        BatchNorm, use_running_average=not train, frozen=frozen, dtype=self.dtype)

    x = x.astype(self.dtype)
    if self.stem == "imagenet":
      x = conv(self.stem_width, (7, 7), 2, padding=3, name="conv1")(x)
      x = nn.relu(norm(name="bn1")(x))
      # torch pads max-pool with -inf, as reduce_window's init value does here.
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(self.stem_width, (3, 3), 1, padding=1, name="conv1")(x)
      x = nn.relu(norm(name="bn1")(x))

    rates = iter(drop_path_rates(self.drop_path, sum(self.stage_sizes)))
    for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(blocks):
        rate = next(rates)
        drop_path = (functools.partial(DropPath, rate, deterministic=not train, spared=spared)
                     if rate > 0.0 else None)
        x = self.block_cls(
            width, 2 if i > 0 and j == 0 else 1, conv, norm, dtype=self.dtype,
            zero_init_last=self.zero_init_last, drop_path=drop_path,
            name=f"layer{i + 1}_{j}")(x)

    self.sow("intermediates", "features", x)
    if self.num_classes == 0:
      return x
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return x.astype(jnp.float32)


ARCHS = {
    "seresnet18": dict(block_cls=BasicBlock, stage_sizes=(2, 2, 2, 2)),
    "seresnet34": dict(block_cls=BasicBlock, stage_sizes=(3, 4, 6, 3)),
    "seresnet50": dict(block_cls=Bottleneck, stage_sizes=(3, 4, 6, 3)),
    "seresnet101": dict(block_cls=Bottleneck, stage_sizes=(3, 4, 23, 3)),
    "seresnet152": dict(block_cls=Bottleneck, stage_sizes=(3, 8, 36, 3)),
    # Same code paths at a fraction of the size, for tests and smoke runs.
    "seresnet_tiny": dict(block_cls=BasicBlock, stage_sizes=(1, 1, 1, 1),
                          widths=(8, 16, 32, 64), stem_width=8),
    "seresnet_tiny_bottleneck": dict(block_cls=Bottleneck, stage_sizes=(1, 1, 1, 1),
                                     widths=(8, 16, 32, 64), stem_width=8),
}

BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
BACKBONE_OPTIONS = ("stem", "dtype", "widths", "stage_sizes", "stem_width", "block",
                    "zero_init_last", "conv_impl", "drop_path")


def default_conv_impl() -> str:
  """im2col on CPU, where vmapped (grouped) convolutions are slow; XLA's conv elsewhere."""
  return "im2col" if jax.default_backend() == "cpu" else "xla"


def default_dtype() -> str:
  """The compute dtype `dtype="auto"` picks: bfloat16 on TPUs and on GPUs with bfloat16 tensor
  cores, where it is the faster (docs/performance.md; parameters stay float32); float32 on CPUs
  and on older GPUs (T4, V100), where XLA emulates bfloat16 more slowly than float32."""
  backend = jax.default_backend()
  if backend == "cpu":
    return "float32"
  if backend == "gpu" and not has_bfloat16_tensor_cores(jax.devices()[0]):
    return "float32"
  return "bfloat16"


def has_bfloat16_tensor_cores(device) -> bool:
  """NVIDIA compute capability >= 8.0 (Ampere on). A capability that is not an NVIDIA version
  number (AMD's `gfx...`) counts as capable: the MI200/MI300 accelerators JAX runs on have them."""
  capability = getattr(device, "compute_capability", None)
  try:
    major = int(str(capability).split(".", maxsplit=1)[0])
  except ValueError:
    return True
  return major >= 8


def backbone_fields(arch: str, **options) -> dict:
  """SEResNet fields for a named arch, with `options` (see BACKBONE_OPTIONS) overriding them."""
  if arch not in ARCHS:
    raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
  unknown = sorted(set(options) - set(BACKBONE_OPTIONS))
  if unknown:
    raise ValueError(f"unknown model option(s) {unknown}; valid: {', '.join(BACKBONE_OPTIONS)}")
  fields = dict(ARCHS[arch])
  if "block" in options:
    block = options.pop("block")
    if block not in BLOCKS:
      raise ValueError(f"unknown block {block!r}; valid: {', '.join(BLOCKS)}")
    fields["block_cls"] = BLOCKS[block]
  options.setdefault("conv_impl", "auto")
  if options["conv_impl"] == "auto":
    options["conv_impl"] = default_conv_impl()
  if options.get("dtype") == "auto":
    options["dtype"] = default_dtype()
  if options.get("dtype") is not None:
    options["dtype"] = jnp.dtype(options["dtype"])
  for key in ("widths", "stage_sizes"):
    if key in options:
      options[key] = tuple(int(v) for v in options[key])
  if "drop_path" in options:
    rate = float(options.pop("drop_path"))
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"drop_path={rate} must be in [0, 1)")
    if rate:  # 0 leaves the fields, so the model, equal to one built without it
      options["drop_path"] = rate
  fields.update(options)
  stem = fields.get("stem", SEResNet.stem)
  if stem not in STEMS:
    raise ValueError(f"stem={stem!r} is not one of {STEMS}")
  if fields["conv_impl"] not in CONV_IMPLS:
    raise ValueError(f"conv_impl={fields['conv_impl']!r} is not one of {CONV_IMPLS}")
  widths = fields.get("widths", SEResNet.widths)
  if len(widths) != len(fields["stage_sizes"]):
    raise ValueError(f"widths {tuple(widths)} and stage_sizes {fields['stage_sizes']} "
                     "must have the same length")
  return fields


def create_model(arch: str, num_classes: int, **options) -> nn.Module:
  """A single-head SE-ResNet classifier (global average pool + linear), like timm's.

  Apply as `model.apply(variables, x_nhwc, train=False)` -> logits (B, num_classes).
  `num_classes=0` gives the feature extractor (pre-pool map).
  """
  if num_classes < 0:
    raise ValueError(f"num_classes must be >= 0, got {num_classes}")
  return SEResNet(num_classes=num_classes, **backbone_fields(arch, **options))
