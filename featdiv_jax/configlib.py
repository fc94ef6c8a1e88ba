"""The base config, the `file.py:arg` parser, the three model variants and config validation.

Every `configs/*.py` builds on `default_config()` and finishes with `apply_arg(config, arg)`:
`configs/caltech101.py:multi_cos,arch=seresnet34,heads=3,smoke` picks a variant, overrides a few
common fields by short name and shrinks everything for a quick CPU run. Any field can also be set
with `--config.field=value`.
"""

import importlib.util
import math
import os

import ml_collections

VARIANTS = ("single", "multi", "multi_cos")
COMPARE = "compare"  # runs every variant in `compare_variants`, one sub-workdir each

# Short names accepted after the colon -> (config field, type).
ARG_KEYS = {
    "arch": ("model.arch", str),
    "heads": ("model.num_heads", int),
    "fusion": ("model.fusion", str),
    "classifier": ("model.classifier", str),
    "stem": ("model.stem", str),
    "dtype": ("model.dtype", str),
    "weight": ("penalty.weight", float),
    "kind": ("penalty.kind", str),
    "seed": ("seed", int),
    "epochs": ("num_epochs", float),
    "steps": ("total_steps", int),
    "batch": ("batch_size", int),
    "lr": ("optimizer.learning_rate", float),
}
FLAGS_WORDS = ("smoke",)


class ConfigError(ValueError):
  """A config value that cannot work, with the field, the value and what would be valid."""


def default_config() -> ml_collections.ConfigDict:
  """The paper's README recipe; data set configs override the `dataset` block."""
  c = ml_collections.ConfigDict()
  c.variant = "multi_cos"             # single | multi | multi_cos | compare
  c.compare_variants = VARIANTS       # what `compare` runs, in this order
  c.seed = 0                          # init, data order, augmentation and dropout
  c.num_epochs = 30.0                 # training length in epochs of dataset.train_split ...
  c.total_steps = 0                   # ... unless > 0: training length in steps
  c.batch_size = 64                   # global batch, split over the `data` mesh axis
  c.eval_batch_size = 0               # 0: same as batch_size
  c.eval_every_steps = 0              # 0: once per epoch (and always at the end)
  c.checkpoint_every_steps = 0        # 0: once per epoch (and always at the end)
  c.log_every_steps = 50              # train metrics / progress cadence
  c.keep_checkpoints = 3              # orbax keeps this many most recent steps
  c.mesh = (-1, 1)                    # (data, heads) device mesh; -1: all remaining devices
  c.distributed = "auto"              # jax.distributed: auto (SLURM / TPU pod / coordinator env), on, off
  c.smoke = False                     # set by the `smoke` word: tiny model, data and steps
  c.skip_nonfinite = False            # False: stop at a NaN/inf loss; True: skip such updates

  c.model = ml_collections.ConfigDict()
  c.model.arch = "seresnet18"         # seresnet18/34/50/101/152 (seresnet_tiny* for tests)
  c.model.num_heads = 2               # K heads (1 for the single baseline)
  c.model.fusion = "concat"           # concat (reference models.py) | sum (its Flowers notebook)
  c.model.classifier = "flatten_mlp"  # flatten_mlp (the paper's) | pool_linear | pool_mlp
  c.model.hidden = 512                # width of the MLP classifier
  c.model.dropout = 0.5               # dropout in the MLP classifier
  c.model.stem = "imagenet"           # imagenet (timm's 7x7/2 + max-pool) | cifar (3x3/1)
  c.model.dtype = "auto"              # compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU (params stay float32)
  c.model.conv_impl = "auto"          # xla (lax conv) | im2col (slices + matmul) | auto (by backend)
  c.model.init_from = ""              # a timm .safetensors / .npz to load into init_heads
  c.model.init_heads = (0,)           # heads that receive init_from
  c.model.frozen_heads = ()           # heads whose params and BN statistics never change

  c.penalty = ml_collections.ConfigDict()
  c.penalty.weight = 1.0              # loss = cross-entropy + weight * cosine_diversity
  c.penalty.kind = "cos"              # cos (push apart) | abs | square | align (pull together)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"          # adamw | sgd (weight decay on every parameter, as torch)
  c.optimizer.learning_rate = 4e-4    # peak learning rate
  c.optimizer.weight_decay = 5e-4
  c.optimizer.momentum = 0.9          # sgd only
  c.optimizer.schedule = "cosine"     # cosine (to 0 over training) | constant
  c.optimizer.warmup_steps = 0        # linear warm-up before the schedule

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "digits"           # digits | cifar10 | caltech101 | oxford_flowers102 | imagefolder
  c.dataset.data_dir = ""             # TFDS data dir ('' = TFDS default); imagefolder: its root
  c.dataset.train_split = "train"
  c.dataset.eval_split = "test"
  c.dataset.download = False          # True: download + prepare with TFDS when missing (network)
  c.dataset.image_size = 32           # square crop fed to the model
  c.dataset.resize_size = 0           # resize the shorter side first (0: no resize)
  c.dataset.pad = 0                   # zero padding before the random train crop
  c.dataset.flip = False              # random horizontal flips in training
  c.dataset.mean = (0.5, 0.5, 0.5)    # normalisation, in [0, 1] pixel units
  c.dataset.std = (0.5, 0.5, 0.5)
  c.dataset.shuffle_buffer = 10_000
  return c


def smoke(c: ml_collections.ConfigDict) -> None:
  """Shrinks model, data and steps so a whole run takes seconds on a CPU."""
  c.smoke = True
  c.model.arch = "seresnet_tiny"
  c.model.hidden = 32
  c.batch_size = 8
  c.total_steps = 6
  c.eval_every_steps = 3
  c.checkpoint_every_steps = 3
  c.log_every_steps = 2
  c.dataset.shuffle_buffer = 64
  if c.dataset.image_size > 32:
    c.dataset.resize_size, c.dataset.image_size = 40, 32


def _field(c, dotted):
  *parents, leaf = dotted.split(".")
  for p in parents:
    c = c[p]
  return c, leaf


def load_config_file(path, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file such as configs/digits.py, loaded by path."""
  path = os.fspath(path)
  spec = importlib.util.spec_from_file_location(
      "_featdiv_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def apply_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Parses `variant[,key=value...][,smoke]` into `c` (see ARG_KEYS) and applies the variant."""
  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  variant = c.variant
  if tokens and "=" not in tokens[0] and tokens[0] not in FLAGS_WORDS:
    variant = tokens.pop(0)
  if variant not in VARIANTS + (COMPARE,):
    raise ConfigError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS + (COMPARE,))}")
  for token in tokens:
    if token in FLAGS_WORDS:
      smoke(c)
      continue
    key, sep, value = token.partition("=")
    if not sep or key not in ARG_KEYS:
      raise ConfigError(f"unknown config argument {token!r}; valid: a variant "
                       f"({', '.join(VARIANTS + (COMPARE,))}), 'smoke', or key=value with key "
                       f"in {', '.join(ARG_KEYS)}")
    dotted, typ = ARG_KEYS[key]
    try:
      parsed = typ(value)
    except ValueError:
      raise ConfigError(f"config argument {key}={value!r}: expected {typ.__name__}") from None
    parent, leaf = _field(c, dotted)
    parent[leaf] = parsed
  c.variant = variant
  return c if variant == COMPARE else with_variant(c, variant)


def with_variant(c: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """A copy of `c` set up as one of the paper's three models.

  single: one SE-ResNet with timm's pool + linear head; multi: K heads, no penalty;
  multi_cos: K heads with the penalty at `penalty.weight`.
  """
  if variant not in VARIANTS:
    raise ConfigError(f"compare_variants has unknown variant {variant!r}; valid: "
                      f"{', '.join(VARIANTS)}")
  c = ml_collections.ConfigDict(c.to_dict())
  c.variant = variant
  if variant == "single":
    c.model.num_heads = 1
    c.model.classifier = "pool_linear"
    c.model.frozen_heads = ()
    c.penalty.weight = 0.0
  elif variant == "multi":
    c.penalty.weight = 0.0
  return c


def model_signature(c) -> dict:
  """The fields that decide the shapes and meaning of a checkpoint's state."""
  model = {k: v for k, v in c.model.to_dict().items()
           if k not in ("init_from", "init_heads", "dtype")}  # only matter at init / speed
  return {"model": model, "dataset.name": c.dataset.name,
          "dataset.image_size": c.dataset.image_size, "optimizer.name": c.optimizer.name}


DTYPES = ("auto", "float32", "bfloat16", "float16")
CONV_IMPLS = ("auto", "xla", "im2col")
# Smallest input each stem turns into at least a 1x1 final map by design (total stride).
MIN_IMAGE_SIZE = {"imagenet": 32, "cifar": 8}


def unknown_field(c, dotted: str) -> str | None:
  """Why `dotted` names no field of `c` (listing the valid ones), or None when it does."""
  node, path = c, []
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return f"unknown config field {dotted!r}: {'.'.join(path)} is a value, not a block of fields"
    if part not in node:
      where = f"fields of {'.'.join(path)}" if path else "top-level fields"
      return f"unknown config field {dotted!r}; valid {where}: {', '.join(node.keys())}"
    node, path = node[part], path + [part]
  return None


def _describe_type(value) -> str:
  """What a field now holding `value` accepts: ConfigDict keeps each field's type."""
  if isinstance(value, bool):
    return "True or False"
  if isinstance(value, int):
    return "an integer"
  if isinstance(value, float):
    return "a number"
  if isinstance(value, str):
    return "a string"
  if isinstance(value, (tuple, list)):
    return "a tuple, e.g. (0, 1)"
  return f"a {type(value).__name__}"


def override(c: ml_collections.ConfigDict, dotted: str, value) -> None:
  """Sets `c.<dotted>` like `--config.<dotted>=value` does, as a ConfigError if it can't."""
  why = unknown_field(c, dotted)
  if why:
    raise ConfigError(why)
  parent, leaf = _field(c, dotted)
  before = parent[leaf]
  try:
    parent[leaf] = value
  except TypeError:  # ConfigDict refuses a value of another type than the field's
    raise ConfigError(f"{dotted}={value!r} has the wrong type ({type(value).__name__}); "
                      f"valid: {_describe_type(before)}") from None


def expected_type(c, dotted: str) -> str:
  """What values the field `dotted` of `c` accepts, in words ("an integer", "a string", ...)."""
  return _describe_type(_get(c, dotted))


def _check(ok: bool, field: str, value, valid: str) -> None:
  if not ok:
    raise ConfigError(f"{field}={value!r} is invalid; valid: {valid}")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  """A finite int or float: inf or NaN as a weight or length only fails later, mid-run."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get(c, field):
  parent, leaf = _field(c, field)
  return parent[leaf]


def _one_of(c, field, options):
  value = _get(c, field)
  _check(value in options, field, value, ", ".join(map(str, options)))


def _int_at_least(c, field, low, why=""):
  value = _get(c, field)
  _check(_is_int(value) and value >= low, field, value, f"an integer >= {low}{why}")


def _number_at_least(c, field, low, why=""):
  value = _get(c, field)
  _check(_is_number(value) and value >= low, field, value, f"a finite number >= {low}{why}")


def _sequence(c, field, valid) -> tuple:
  """The field as a tuple; a field ConfigDict let become None or a scalar is refused."""
  value = _get(c, field)
  _check(isinstance(value, (tuple, list)), field, value, valid)
  return tuple(value)


def check_distributed(c) -> None:
  """The one field main needs before jax starts (jax.distributed must come first)."""
  _one_of(c, "distributed", ("auto", "on", "off"))


def validate(c, num_devices: int | None = None, process_count: int = 1) -> None:
  """Raises ConfigError for the first field that cannot work; checks every field first."""
  # Imported here so configs stay importable without jax's device initialisation.
  from featdiv_jax import losses
  from featdiv_jax.models import ARCHS, CLASSIFIERS, FUSIONS, STEMS
  from featdiv_jax.data.errors import DATASETS

  _one_of(c, "variant", VARIANTS + (COMPARE,))
  valid = f"a non-empty tuple of {', '.join(VARIANTS)}"
  variants = _sequence(c, "compare_variants", valid)
  _check(all(v in VARIANTS for v in variants) and (variants or c.variant != COMPARE),
         "compare_variants", variants, valid)
  # The data pipeline takes seeds as int64.
  _check(_is_int(c.seed) and -2**63 <= c.seed < 2**63, "seed", c.seed, "a 64-bit integer")
  _number_at_least(c, "num_epochs", 0)
  _int_at_least(c, "total_steps", 0)
  _check(c.num_epochs > 0 or c.total_steps > 0, "num_epochs", c.num_epochs,
         "> 0 (or total_steps > 0)")
  for field in ("eval_batch_size", "eval_every_steps", "checkpoint_every_steps"):
    _int_at_least(c, field, 0)
  for field in ("batch_size", "log_every_steps", "keep_checkpoints"):
    _int_at_least(c, field, 1)
  _one_of(c, "distributed", ("auto", "on", "off"))
  _check(isinstance(c.skip_nonfinite, bool), "skip_nonfinite", c.skip_nonfinite, "True or False")

  m = c.model
  _one_of(c, "model.arch", tuple(ARCHS))
  _int_at_least(c, "model.num_heads", 1)
  _one_of(c, "model.fusion", FUSIONS)
  _one_of(c, "model.classifier", CLASSIFIERS)
  _one_of(c, "model.stem", STEMS)
  _one_of(c, "model.dtype", DTYPES)
  _one_of(c, "model.conv_impl", CONV_IMPLS)
  _int_at_least(c, "model.hidden", 1)
  _check(_is_number(m.dropout) and 0 <= m.dropout < 1, "model.dropout", m.dropout,
         "a number in [0, 1)")
  _check(isinstance(m.init_from, str), "model.init_from", m.init_from,
         "a path to a .safetensors or .npz file, or '' for none")
  for field in ("frozen_heads", "init_heads"):
    valid = f"head indices in 0..{m.num_heads - 1} (model.num_heads={m.num_heads})"
    heads = _sequence(c, f"model.{field}", f"a tuple of {valid}")
    _check(all(_is_int(k) and 0 <= k < m.num_heads for k in heads), f"model.{field}", heads,
           valid)
  # Every head frozen is allowed: the classifier still trains (a linear probe).

  _one_of(c, "penalty.kind", losses.PENALTY_KINDS)
  _number_at_least(c, "penalty.weight", 0, " (kind='align' pulls heads together)")
  _check(not (c.penalty.weight > 0 and m.num_heads < 2), "penalty.weight", c.penalty.weight,
         f"0 with model.num_heads={m.num_heads}: the penalty compares heads and needs "
         f"num_heads >= 2")

  o = c.optimizer
  _one_of(c, "optimizer.name", ("adamw", "sgd"))
  _one_of(c, "optimizer.schedule", ("cosine", "constant"))
  for field in ("learning_rate", "weight_decay", "momentum"):
    _number_at_least(c, f"optimizer.{field}", 0)
  _check(o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "a number > 0")
  _int_at_least(c, "optimizer.warmup_steps", 0)

  d = c.dataset
  _one_of(c, "dataset.name", DATASETS)
  _check(isinstance(d.data_dir, str), "dataset.data_dir", d.data_dir,
         "a directory path, or '' for the TFDS default")
  for field in ("train_split", "eval_split"):
    _check(isinstance(d[field], str) and d[field], f"dataset.{field}", d[field],
           "a split name such as 'train' or 'test'")
  for field in ("download", "flip"):
    _check(isinstance(d[field], bool), f"dataset.{field}", d[field], "True or False")
  others = ", ".join(f"{s!r}: >= {n}" for s, n in MIN_IMAGE_SIZE.items() if s != m.stem)
  _int_at_least(c, "dataset.image_size", MIN_IMAGE_SIZE[m.stem],
                f" for model.stem={m.stem!r}, its total stride (other stems: {others})")
  _int_at_least(c, "dataset.resize_size", 0)
  _int_at_least(c, "dataset.pad", 0)
  _int_at_least(c, "dataset.shuffle_buffer", 1)
  for field in ("mean", "std"):
    value = _sequence(c, f"dataset.{field}", "three numbers (R, G, B)")
    _check(len(value) == 3 and all(_is_number(v) for v in value),
           f"dataset.{field}", value, "three finite numbers (R, G, B)")
  _check(all(s > 0 for s in d.std), "dataset.std", tuple(d.std), "three numbers > 0")

  _validate_mesh(c, num_devices, process_count)
  if m.init_from:
    _validate_init_from(c)


def _valid_meshes(c, num_devices) -> str:
  """Every explicit (data, heads) mesh that fits the devices, the heads and the batch sizes."""
  batches = {c.batch_size, c.eval_batch_size or c.batch_size}
  shapes = [(num_devices // h, h) for h in range(1, num_devices + 1)
            if num_devices % h == 0 and c.model.num_heads % h == 0
            and all(b % (num_devices // h) == 0 for b in batches)]
  fits = ", ".join(map(str, shapes)) or "none: change model.num_heads or batch_size"
  return (f"(data, heads) with data * heads = {num_devices} devices, heads dividing "
          f"model.num_heads={c.model.num_heads} and data dividing batch_size={c.batch_size}"
          f" (one size may be -1): {fits}")


def _validate_mesh(c, num_devices, process_count):
  from featdiv_jax import sharding
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  valid = _valid_meshes(c, num_devices)
  mesh = _sequence(c, "mesh", valid)
  # Checked here: resolve_mesh_shape would turn 2.5 into 2, and '(a,1)' into a ValueError.
  _check(len(mesh) == 2 and all(_is_int(s) for s in mesh), "mesh", mesh, valid)
  try:
    data, heads = sharding.resolve_mesh_shape(mesh, num_devices)
  except sharding.MeshError as e:
    raise ConfigError(f"{e}; valid: {valid}") from None
  _check(c.model.num_heads % heads == 0, "mesh", mesh, valid)
  for field in ("batch_size", "eval_batch_size"):
    value = c[field] or c.batch_size
    _check(value % data == 0 and value % process_count == 0, field, value,
           f"a multiple of the data axis ({data} devices) and of the {process_count} processes")


def _validate_init_from(c):
  import os
  from featdiv_jax import models
  path, arch, stem = c.model.init_from, c.model.arch, c.model.stem
  _check(os.path.isfile(path), "model.init_from", path, "an existing .safetensors or .npz file")
  try:
    state = models.read_state_dict(path)
  # safetensors, zipfile and numpy each raise their own exception types for a damaged file, and
  # any of them means the same to the user: this is not a readable weights file.
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"model.init_from={path!r} could not be read ({type(e).__name__}: {e}); "
                      f"valid: a timm state dict saved as .safetensors or .npz") from None
  try:
    # The heads are feature extractors: the class count of the file's `fc` (if any) is free.
    models.load_timm_weights(state, arch, stem=stem)
  except ValueError as e:
    raise ConfigError(f"model.init_from={path!r} does not fit model.arch={arch!r} with "
                      f"model.stem={stem!r}: {e}; valid: the weights of a timm {arch} "
                      f"(any class count)") from None
