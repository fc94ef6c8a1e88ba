"""Import a timm SE-ResNet state dict (safetensors / npz / mapping of arrays) without torch.

The Flax modules carry timm's names, so the import is a renaming plus layout changes: conv
kernels OIHW -> HWIO, linear weights (out, in) -> (in, out), SE 1x1 convs (out, in, 1, 1) ->
dense (in, out), BatchNorm weight/bias/running_* -> scale/bias and batch_stats mean/var.
"""

import os
from typing import Mapping, Union

import jax
import numpy as np
import safetensors.numpy

from featdiv_jax.models.resnet import create_model

Source = Union[str, os.PathLike, Mapping[str, np.ndarray]]

_LEAF_NAMES = {"kernel": "weight", "bias": "bias", "scale": "weight",
               "mean": "running_mean", "var": "running_var"}
_MODULE_NAMES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


def read_state_dict(source: Source) -> dict:
  """A timm state dict as {name: float32 numpy array}, from a file or a mapping."""
  if isinstance(source, Mapping):
    state = dict(source)
  else:
    path = os.fspath(source)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"timm weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
      state = safetensors.numpy.load_file(path)
    elif path.endswith(".npz"):
      with np.load(path) as f:
        state = dict(f)
    else:
      raise ValueError(f"timm weights file {path!r}: expected a .safetensors or .npz file")
  # State dicts saved from a DataParallel or wrapped model carry a common prefix.
  for prefix in ("module.", "model."):
    if state and all(k.startswith(prefix) for k in state):
      state = {k[len(prefix):]: v for k, v in state.items()}
  return {k: np.asarray(v) for k, v in state.items()}


def torch_key(path: tuple) -> str:
  """('layer1_0', 'se', 'fc1', 'kernel') -> 'layer1.0.se.fc1.weight'."""
  *modules, leaf = path
  names = [_MODULE_NAMES.get(m, m.replace("_", ".") if m.startswith("layer") else m)
           for m in modules]
  return ".".join(names + [_LEAF_NAMES[leaf]])


def _to_torch_shape(flax_shape: tuple, key: str) -> tuple:
  if len(flax_shape) == 4:  # HWIO -> OIHW
    h, w, i, o = flax_shape
    return (o, i, h, w)
  if len(flax_shape) == 2:  # dense (in, out); SE's are 1x1 convs in torch
    i, o = flax_shape
    return (o, i, 1, 1) if ".se." in key else (o, i)
  return tuple(flax_shape)


def _to_flax(value: np.ndarray, ndim: int) -> np.ndarray:
  if value.ndim == 4 and ndim == 2:  # SE 1x1 conv -> dense
    return value[:, :, 0, 0].T
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return value.T
  return value


def load_timm_weights(source: Source, arch: str, **options) -> dict:
  """Variables `{"params", "batch_stats"}` for `create_model(arch, num_classes, **options)`.

  The class count is read from `fc.weight` (a state dict without `fc` gives the feature-only
  model, num_classes=0). Raises ValueError naming any missing, unexpected or mis-shaped key.
  """
  state = read_state_dict(source)
  num_classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else 0
  model = create_model(arch, num_classes, **options)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32)))

  used, missing, misshaped = set(), [], []
  def convert(path, target):
    names = tuple(p.key for p in path[1:])  # path[0] is the collection
    key = torch_key(names)
    expected = _to_torch_shape(target.shape, key)
    if key not in state:
      missing.append(f"{key} (expected shape {expected})")
      return None
    used.add(key)
    if tuple(state[key].shape) != expected:
      misshaped.append(f"{key}: file has {tuple(state[key].shape)}, {arch} needs {expected}")
      return None
    return _to_flax(state[key], len(target.shape)).astype(np.float32)

  variables = jax.tree.map_with_path(
      convert, {c: abstract[c] for c in ("params", "batch_stats")})
  unexpected = sorted(k for k in set(state) - used if not k.endswith("num_batches_tracked"))
  problems = []
  if missing:
    problems.append(f"missing keys: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
  if unexpected:
    problems.append(f"unexpected keys: {', '.join(unexpected[:8])}"
                    + (" ..." if len(unexpected) > 8 else ""))
  if misshaped:
    problems.append(f"shape mismatches: {'; '.join(misshaped[:8])}")
  if problems:
    where = source if not isinstance(source, Mapping) else "the given state dict"
    raise ValueError(f"timm weights in {where} do not fit arch {arch!r} ({num_classes} "
                     f"classes, from fc.weight): " + " | ".join(problems))
  return variables


def _to_torch(value: np.ndarray, key: str) -> np.ndarray:
  """The inverse of `_to_flax`: HWIO -> OIHW, dense (in, out) -> (out, in), SE -> 1x1 conv."""
  if value.ndim == 4:
    value = value.transpose(3, 2, 0, 1)
  elif value.ndim == 2:
    value = value.T[:, :, None, None] if ".se." in key else value.T
  return np.ascontiguousarray(value)


def to_timm_state_dict(variables: Mapping, num_batches_tracked: int = 0) -> dict:
  """A timm state dict {name: numpy array} of a single SE-ResNet's variables: the inverse of
  `load_timm_weights`, bit for bit.

  `variables` are `{"params", "batch_stats"}` of `create_model(arch, num_classes)` (with `fc`)
  or of its feature extractor (num_classes=0; no `fc.*` keys then), e.g. `extract_head` of a
  MultiHeadNet. Every BatchNorm also gets timm's `num_batches_tracked` buffer (int64 scalar,
  `num_batches_tracked`), which `load_state_dict(strict=True)` expects and which only a
  BatchNorm with momentum=None reads.
  """
  state = {}
  tree = {c: variables[c] for c in ("params", "batch_stats") if c in variables}
  for path, value in jax.tree.leaves_with_path(tree):
    key = torch_key(tuple(p.key for p in path[1:]))  # path[0] is the collection
    state[key] = _to_torch(np.asarray(value), key)
    if key.endswith(".running_mean"):
      state[key[:-len("running_mean")] + "num_batches_tracked"] = np.asarray(
          num_batches_tracked, np.int64)
  return state
