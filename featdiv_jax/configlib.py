"""The base config, the `file.py:arg` parser, the three model variants and config validation.

Every `configs/*.py` builds on `default_config()` and finishes with `apply_arg(config, arg)`:
`configs/caltech101.py:multi_cos,arch=seresnet34,heads=3,smoke` picks a variant, overrides a few
common fields by short name and shrinks everything for a quick CPU run. Any field can also be set
with `--config.field=value`.
"""

import importlib.util
import math
import os
from typing import Callable, Mapping

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
    "protocol": ("protocol", str),
}
FLAGS_WORDS = ("smoke",)  # words every config takes
PAPER = "paper"  # the word a data set's config takes for its notebook's recipe (paper_recipe)


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
  c.eval_every_steps = 0              # 0: every eval_every_epochs (and always at the end)
  c.eval_every_epochs = 1.0           # used when eval_every_steps is 0
  c.checkpoint_every_steps = 0        # 0: every checkpoint_every_epochs (and always at the end)
  c.checkpoint_every_epochs = 1.0     # used when checkpoint_every_steps is 0
  c.log_every_steps = 50              # train metrics / progress cadence
  c.keep_checkpoints = 3              # orbax keeps this many most recent steps
  c.mesh = (-1, 1)                    # (data, heads) device mesh; -1: all remaining devices
  c.distributed = "auto"              # jax.distributed: auto (SLURM / TPU pod / coordinator env), on, off
  c.smoke = False                     # set by the `smoke` word: tiny model, data and steps
  c.skip_nonfinite = False            # False: stop at a NaN/inf loss; True: skip such updates
  c.protocol = "scratch"              # scratch | pretrained_head (see PROTOCOLS)
  c.keep_best = False                 # also keep the best-accuracy checkpoint (in results.json)
  c.label_smoothing = 0.0             # train cross-entropy on (1 - e) one-hot + e / classes
  # Stage 1 (the `single` run) of protocol=pretrained_head, where it differs from the rest:
  c.stage1 = ml_collections.ConfigDict()
  c.stage1.num_epochs = 0.0           # its length in epochs (0: num_epochs)
  c.stage1.decay_epochs = 0.0         # its cosine horizon (0: optimizer.decay_epochs)

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
  c.model.init_from = ""              # timm .safetensors / .npz, or a featdiv workdir[@best|@N]
  c.model.init_from_head = 0          # which head of a featdiv workdir's run init_from takes
  c.model.init_heads = (0,)           # heads that receive init_from
  c.model.frozen_heads = ()           # heads whose params never change
  c.model.frozen_bn = "running"       # frozen heads' BN: running (fixed) | batch (notebooks)
  c.model.drop_path = 0.0             # stochastic depth: drop rate of the last block (linear in depth)

  c.penalty = ml_collections.ConfigDict()
  c.penalty.weight = 1.0              # loss = cross-entropy + weight * cosine_diversity
  c.penalty.kind = "cos"              # cos (push apart) | abs | square | align (pull together)
  #                                     | cka (pooled representations apart, linear CKA)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"          # adamw | sgd (weight decay on every parameter, as torch)
  c.optimizer.learning_rate = 4e-4    # peak learning rate
  c.optimizer.weight_decay = 5e-4
  c.optimizer.momentum = 0.9          # sgd only
  c.optimizer.schedule = "cosine"     # cosine (to 0 over training) | constant
  c.optimizer.warmup_steps = 0        # linear warm-up before the schedule
  c.optimizer.decay_epochs = 0.0      # cosine horizon in epochs (0: the run's length)
  c.optimizer.per_epoch = False       # True: the schedule steps once per epoch (torch's scheduler)
  c.optimizer.clip_norm = 0.0         # > 0: clip the gradients' global norm to this (0: off)
  c.optimizer.ema_decay = 0.0         # > 0: also keep an EMA of params and BN statistics (0: off)
  c.optimizer.accum_steps = 1         # micro-batches of batch_size / accum_steps per update
  c.optimizer.decay_norm_and_bias = True  # False: no weight decay on 1-D params (timm, big_vision)

  # Per-head measures at every evaluation (featdiv_jax.evaluation): head CKA and ablations
  # always; linear probes on pooled features of training examples as below.
  c.analysis = ml_collections.ConfigDict()
  c.analysis.probe_examples = 10_000  # training examples the probes fit on (0: no probes)
  c.analysis.probe_every_evals = 0    # 0: probes at the final evaluation only; N: also every Nth

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
  c.dataset.cache = "auto"            # decoded images in memory: auto (when they fit) | memory | none
  c.dataset.train_crop = "random"     # random (after pad) | center (the notebooks' CenterCrop)
  #                                     | random_resized (Inception-style, then resized)
  c.dataset.crop_scale = (0.08, 1.0)  # random_resized: range of the crop's area fraction
  c.dataset.crop_ratio = (0.75, 4 / 3)  # random_resized: range of its aspect ratio (w / h)
  c.dataset.mixup_alpha = 0.0         # > 0: mixup with Beta(alpha, alpha) mixing, per batch
  c.dataset.cutmix_alpha = 0.0        # > 0: cutmix (with mixup too: one of them per batch)
  c.dataset.grayscale = False         # convert to grayscale, repeated to 3 channels
  c.dataset.exclude_classes = ()      # class names or indices dropped from both splits
  c.dataset.holdout_fraction = 0.0    # > 0: a seeded split of train_split + eval_split ...
  c.dataset.holdout_seed = 0          # ... into train and this held-out fraction (eval)
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


def paper_recipe(c: ml_collections.ConfigDict, *, hidden: int, batch_size: int,
                 num_epochs: float, decay_epochs: float, stage1_epochs: float) -> None:
  """What the paper's three notebooks share (docs/reference.md, "How the published numbers were
  produced"), the data set's numbers passed in; each `configs/X.py` adds its data recipe and
  takes the word `paper` for both. Stage 1 trains a single SE-ResNet for `stage1_epochs` with
  its cosine horizon equal to its length; stage 2 freezes it as head 0, which normalises with
  batch statistics (the notebooks' train mode), sums the two maps, classifies them with a
  dropout-free MLP and runs `num_epochs` on a horizon of `decay_epochs`, the schedule stepped
  per epoch as torch's CosineAnnealingLR is. The best epoch's accuracy is what the table reports,
  so its checkpoint is kept."""
  c.protocol = "pretrained_head"
  c.model.fusion, c.model.classifier = "sum", "flatten_mlp"
  c.model.hidden, c.model.dropout = hidden, 0.0
  c.model.frozen_bn = "batch"
  c.penalty.kind, c.penalty.weight = "cos", 1.0
  c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay = "adamw", 4e-4, 5e-4
  c.optimizer.schedule, c.optimizer.warmup_steps = "cosine", 0
  c.optimizer.decay_epochs, c.optimizer.per_epoch = float(decay_epochs), True
  c.batch_size, c.num_epochs, c.total_steps = batch_size, float(num_epochs), 0
  c.stage1.num_epochs = c.stage1.decay_epochs = float(stage1_epochs)
  c.eval_every_epochs, c.eval_every_steps = 1.0, 0
  c.keep_best = True


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


def apply_arg(c: ml_collections.ConfigDict, arg: str | None,
              words: Mapping[str, Callable[[ml_collections.ConfigDict], None]] | None = None
              ) -> ml_collections.ConfigDict:
  """Parses `variant[,word...][,key=value...]` into `c` and applies the variant.

  Words are recipes: a data set config's own (`words`, e.g. {"paper": paper_recipe}) in the order
  given, then `smoke`, which shrinks whatever recipe came before it; the key=value overrides
  (ARG_KEYS) come last wherever they stand, so `compare,paper,batch=64` and
  `compare,batch=64,paper` both train the paper's recipe at batch 64.
  """
  words = dict(words or {})
  known_words = tuple(words) + FLAGS_WORDS
  tokens = [t.strip() for t in (arg or "").split(",") if t.strip()]
  variant = c.variant
  if tokens and "=" not in tokens[0] and tokens[0] not in known_words:
    variant = tokens.pop(0)
  if variant not in VARIANTS + (COMPARE,):
    raise ConfigError(f"unknown variant {variant!r}; valid: {', '.join(VARIANTS + (COMPARE,))}")
  settings = []
  for token in tokens:
    key, sep, value = token.partition("=")
    if token in known_words or (sep and key in ARG_KEYS):
      settings.append((key, value) if sep else (token, None))
      continue
    raise ConfigError(f"unknown config argument {token!r}; valid: a variant "
                      f"({', '.join(VARIANTS + (COMPARE,))}) first, a word "
                      f"({', '.join(known_words)}), or key=value with key in {', '.join(ARG_KEYS)}")
  for word, _ in settings:
    if word in words:
      words[word](c)
  if ("smoke", None) in settings:
    smoke(c)
  for key, value in settings:
    if value is None:
      continue
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


def validated_runs(c, num_devices: int, process_count: int, workdir: str = "") -> list:
  """(sub-workdir, config) of each model a command trains, all validated before any runs:
  ("", c) itself, or (variant, config) for each of a comparison's `compare_variants`.

  With protocol=pretrained_head a comparison is the paper's two stages: `single` first, from
  scratch; then each multi-head variant with head 0 initialised from WORKDIR/single (its last
  step) and frozen. A standalone multi-head run of that protocol takes head 0 from `init_from`.
  """
  c = with_protocol(c)
  validate(c, num_devices, process_count)
  if c.variant != COMPARE:
    return [("", c)]
  variants = list(c.compare_variants)
  if c.protocol == "pretrained_head":
    _check("single" in variants, "compare_variants", tuple(variants),
           "a tuple with 'single' (stage 1 of protocol='pretrained_head')")
    variants.sort(key=lambda v: v != "single")  # stage 1 first
  runs = [(v, with_protocol(with_variant(c, v))) for v in variants]
  for _, config in runs:
    stage_2 = c.protocol == "pretrained_head" and config.variant != "single"
    if stage_2:
      config.model.init_from = os.path.join(workdir, "single")
    # Stage 1 has not run yet: its workdir is checked when stage 2 starts.
    validate(config, num_devices, process_count, init_from_pending=stage_2)
  return runs


def with_protocol(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`c` with what its protocol implies: under pretrained_head a single run (stage 1) trains
  from scratch, for `stage1`'s epochs and horizon where set, and a multi-head run freezes head 0,
  which it takes from `init_from`."""
  if c.protocol != "pretrained_head" or c.variant == COMPARE:
    return c
  c = ml_collections.ConfigDict(c.to_dict())
  if c.variant == "single":
    c.model.init_from, c.model.frozen_heads = "", ()
    if c.stage1.num_epochs > 0:
      c.num_epochs = c.stage1.num_epochs
    if c.stage1.decay_epochs > 0:
      c.optimizer.decay_epochs = c.stage1.decay_epochs
  else:
    c.model.init_heads, c.model.frozen_heads = (0,), (0,)
  return c


def analysis_field(c, name: str):
  """`analysis.<name>`, or its default for a config saved before the analysis block."""
  block = c.get("analysis") if hasattr(c, "get") else None
  if block is None or name not in block:
    return default_config().analysis[name]
  return block[name]


def probe_examples(c) -> int:
  """How many training examples the linear probes fit on (0: no probes)."""
  return analysis_field(c, "probe_examples")


def model_signature(c) -> dict:
  """The fields that decide the shapes and meaning of a checkpoint's state."""
  model = {k: v for k, v in c.model.to_dict().items()
           if k not in ("init_from", "init_from_head", "init_heads", "dtype")}  # init / speed
  optimizer = c.optimizer
  return {"model": model, "dataset.name": c.dataset.name,
          "dataset.image_size": c.dataset.image_size, "optimizer.name": optimizer.name,
          # These two change the optimizer's or the state's structure (a checkpoint's shape).
          "optimizer.ema": bool(optimizer.get("ema_decay", 0.0)),
          "optimizer.decay_norm_and_bias": optimizer.get("decay_norm_and_bias", True)}


DISTRIBUTED_MODES = ("auto", "on", "off")
# scratch: every model from scratch; pretrained_head: the paper's notebooks -- `single` trained
# first, then the multi-head models with head 0 initialised from it and frozen.
PROTOCOLS = ("scratch", "pretrained_head")
# Compute dtypes a training run accepts: float16 would need loss scaling, which the step lacks.
TRAINING_DTYPES = ("auto", "float32", "bfloat16")
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
  return _describe_type(get_field(c, dotted))


def _check(ok: bool, field: str, value, valid: str) -> None:
  if not ok:
    raise ConfigError(f"{field}={value!r} is invalid; valid: {valid}")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  """A finite int or float: inf or NaN as a weight or length only fails later, mid-run."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def get_field(c, field: str):
  """`c.<field>` for a dotted field name."""
  parent, leaf = _field(c, field)
  return parent[leaf]


def _one_of(c, field, options):
  value = get_field(c, field)
  _check(value in options, field, value, ", ".join(map(str, options)))


def _int_at_least(c, field, low, why=""):
  value = get_field(c, field)
  _check(_is_int(value) and value >= low, field, value, f"an integer >= {low}{why}")


def _number_at_least(c, field, low, why=""):
  value = get_field(c, field)
  _check(_is_number(value) and value >= low, field, value, f"a finite number >= {low}{why}")


def _fraction(c, field, why=""):
  value = get_field(c, field)
  _check(_is_number(value) and 0 <= value < 1, field, value, f"a number in [0, 1){why}")


def _sequence(c, field, valid) -> tuple:
  """The field as a tuple; a field ConfigDict let become None or a scalar is refused."""
  value = get_field(c, field)
  _check(isinstance(value, (tuple, list)), field, value, valid)
  return tuple(value)


def check_distributed(c) -> None:
  """The one field main needs before jax starts (jax.distributed must come first)."""
  _one_of(c, "distributed", DISTRIBUTED_MODES)


def validate(c, num_devices: int, process_count: int = 1,
             init_from_pending: bool = False) -> None:
  """Raises ConfigError for the first field that cannot work; checks every field first.

  The one place a config is checked: the model, loss, optimizer and data code that it
  configures trusts what passed here. `init_from_pending`: model.init_from names a run the same
  command trains first (stage 1 of a comparison), not there yet.
  """
  # Imported here, not at the top: configs and the sweep import configlib without jax or TF.
  from featdiv_jax import losses, models, optim, sharding  # pylint: disable=import-outside-toplevel
  from featdiv_jax.data import errors as data_errors  # pylint: disable=g-import-not-at-top
  _validate_run(c)
  _validate_model(c, models)
  _validate_penalty(c, losses.PENALTY_KINDS)
  _validate_optimizer(c, optim)
  _validate_dataset(c, data_errors)
  _validate_mesh(c, num_devices, process_count, sharding)
  if c.model.init_from and not init_from_pending:
    _validate_init_from(c, models)


def _validate_run(c) -> None:
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
  for field in ("eval_every_epochs", "checkpoint_every_epochs"):
    _check(_is_number(c[field]) and c[field] > 0, field, c[field], "a finite number > 0")
  for field in ("batch_size", "log_every_steps", "keep_checkpoints"):
    _int_at_least(c, field, 1)
  _one_of(c, "distributed", DISTRIBUTED_MODES)
  _one_of(c, "protocol", PROTOCOLS)
  for field in ("skip_nonfinite", "keep_best"):
    _check(isinstance(c[field], bool), field, c[field], "True or False")
  for field in ("stage1.num_epochs", "stage1.decay_epochs"):
    _number_at_least(c, field, 0)
  for field in ("analysis.probe_examples", "analysis.probe_every_evals"):
    _int_at_least(c, field, 0)
  _fraction(c, "label_smoothing")


def _validate_model(c, models) -> None:
  m = c.model
  _one_of(c, "model.arch", tuple(models.ARCHS))
  _int_at_least(c, "model.num_heads", 1)
  _one_of(c, "model.fusion", models.FUSIONS)
  _one_of(c, "model.classifier", models.CLASSIFIERS)
  _one_of(c, "model.stem", models.STEMS)
  _check(m.dtype in TRAINING_DTYPES, "model.dtype", m.dtype,
         f"{', '.join(TRAINING_DTYPES)} (float16 needs loss scaling, which training lacks)")
  _one_of(c, "model.conv_impl", ("auto",) + models.CONV_IMPLS)
  _int_at_least(c, "model.hidden", 1)
  _check(_is_number(m.dropout) and 0 <= m.dropout < 1, "model.dropout", m.dropout,
         "a number in [0, 1)")
  _check(isinstance(m.init_from, str), "model.init_from", m.init_from,
         "a .safetensors or .npz file, a featdiv workdir[@best|@STEP], or '' for none")
  _int_at_least(c, "model.init_from_head", 0)
  _check(bool(m.init_from) or c.protocol != "pretrained_head" or c.variant in ("single", COMPARE),
         "model.init_from", m.init_from,
         f"a trained single run's workdir (or timm weights) for head 0: protocol="
         f"'pretrained_head' trains {c.variant} on a pretrained, frozen head 0")
  _one_of(c, "model.frozen_bn", models.FROZEN_BN)
  for field in ("frozen_heads", "init_heads"):
    valid = f"head indices in 0..{m.num_heads - 1} (model.num_heads={m.num_heads})"
    heads = _sequence(c, f"model.{field}", f"a tuple of {valid}")
    _check(all(_is_int(k) and 0 <= k < m.num_heads for k in heads), f"model.{field}", heads,
           valid)
  # Every head frozen is allowed: the classifier still trains (a linear probe).
  _fraction(c, "model.drop_path")


def _validate_penalty(c, kinds) -> None:
  _one_of(c, "penalty.kind", kinds)
  _number_at_least(c, "penalty.weight", 0, " (kind='align' pulls heads together)")
  heads = c.model.num_heads
  _check(not (c.penalty.weight > 0 and heads < 2), "penalty.weight", c.penalty.weight,
         f"0 with model.num_heads={heads}: the penalty compares heads and needs num_heads >= 2")


def _validate_optimizer(c, optim) -> None:
  _one_of(c, "optimizer.name", optim.OPTIMIZERS)
  _one_of(c, "optimizer.schedule", optim.SCHEDULES)
  for field in ("learning_rate", "weight_decay", "momentum"):
    _number_at_least(c, f"optimizer.{field}", 0)
  _check(c.optimizer.learning_rate > 0, "optimizer.learning_rate", c.optimizer.learning_rate,
         "a number > 0")
  _int_at_least(c, "optimizer.warmup_steps", 0)
  _number_at_least(c, "optimizer.decay_epochs", 0)
  for field in ("per_epoch", "decay_norm_and_bias"):
    _check(isinstance(c.optimizer[field], bool), f"optimizer.{field}", c.optimizer[field],
           "True or False")
  _number_at_least(c, "optimizer.clip_norm", 0, " (0: no clipping)")
  _fraction(c, "optimizer.ema_decay", " (0: no EMA; 0.999 is typical)")
  _int_at_least(c, "optimizer.accum_steps", 1)
  k = c.optimizer.accum_steps
  _check(c.batch_size % k == 0, "optimizer.accum_steps", k,
         f"a divisor of batch_size={c.batch_size} (the global batch, split into accum_steps "
         "micro-batches)")


def _validate_dataset(c, data_errors) -> None:
  d, stem = c.dataset, c.model.stem
  _one_of(c, "dataset.name", data_errors.DATASETS)
  _check(isinstance(d.data_dir, str), "dataset.data_dir", d.data_dir,
         "a directory path, or '' for the TFDS default")
  for field in ("train_split", "eval_split"):
    _check(isinstance(d[field], str) and d[field], f"dataset.{field}", d[field],
           "a split name such as 'train' or 'test'")
  for field in ("download", "flip"):
    _check(isinstance(d[field], bool), f"dataset.{field}", d[field], "True or False")
  others = ", ".join(f"{s!r}: >= {n}" for s, n in MIN_IMAGE_SIZE.items() if s != stem)
  _int_at_least(c, "dataset.image_size", MIN_IMAGE_SIZE[stem],
                f" for model.stem={stem!r}, its total stride (other stems: {others})")
  _int_at_least(c, "dataset.resize_size", 0)
  _int_at_least(c, "dataset.pad", 0)
  _int_at_least(c, "dataset.shuffle_buffer", 1)
  for field in ("mean", "std"):
    value = _sequence(c, f"dataset.{field}", "three numbers (R, G, B)")
    _check(len(value) == 3 and all(_is_number(v) for v in value),
           f"dataset.{field}", value, "three finite numbers (R, G, B)")
  _check(all(s > 0 for s in d.std), "dataset.std", tuple(d.std), "three numbers > 0")
  _one_of(c, "dataset.train_crop", data_errors.TRAIN_CROPS)
  for field in ("crop_scale", "crop_ratio"):
    value = _sequence(c, f"dataset.{field}", "two numbers (low, high)")
    _check(len(value) == 2 and all(_is_number(v) and v > 0 for v in value)
           and value[0] <= value[1], f"dataset.{field}", value,
           "two finite numbers 0 < low <= high")
  _check(d.crop_scale[1] <= 1, "dataset.crop_scale", tuple(d.crop_scale),
         "area fractions in (0, 1]")
  for field in ("mixup_alpha", "cutmix_alpha"):
    _number_at_least(c, f"dataset.{field}", 0, " (0: off)")
  if "cache" in d:  # configs saved before the field read as "auto"
    _one_of(c, "dataset.cache", data_errors.CACHE_MODES)
  _check(isinstance(d.grayscale, bool), "dataset.grayscale", d.grayscale, "True or False")
  valid = "a tuple of class names or indices >= 0"
  excluded = _sequence(c, "dataset.exclude_classes", valid)
  _check(all(isinstance(k, str) and k or _is_int(k) and k >= 0 for k in excluded),
         "dataset.exclude_classes", excluded, valid)
  _check(_is_number(d.holdout_fraction) and 0 <= d.holdout_fraction < 1,
         "dataset.holdout_fraction", d.holdout_fraction, "a number in [0, 1) (0: off)")
  _check(_is_int(d.holdout_seed) and -2**63 <= d.holdout_seed < 2**63, "dataset.holdout_seed",
         d.holdout_seed, "a 64-bit integer")


def _validate_init_from_run(c, runs, workdir: str, which: str) -> None:
  """A featdiv run as `model.init_from`: it exists, has the step, and is of our arch/stem."""
  spec, m = c.model.init_from, c.model
  try:
    source = runs.read_config(workdir).model
    runs.resolve_step(workdir, which, runs.checkpoint_steps(workdir))
  except runs.RunError as e:
    raise ConfigError(f"model.init_from={spec!r}: {e}; valid: a featdiv workdir with a "
                      "checkpoint, optionally @best or @STEP") from None
  if (source.arch, source.stem) != (m.arch, m.stem):
    raise ConfigError(f"model.init_from={spec!r} holds a run of model.arch={source.arch!r} "
                      f"with model.stem={source.stem!r}; valid: a run of model.arch={m.arch!r} "
                      f"with model.stem={m.stem!r}")
  _check(m.init_from_head < source.num_heads, "model.init_from_head", m.init_from_head,
         f"0..{source.num_heads - 1} (the run in {workdir} has {source.num_heads} head(s))")


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


def _validate_mesh(c, num_devices, process_count, sharding):
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
  k = c.optimizer.accum_steps
  _check(c.batch_size % (k * data) == 0, "optimizer.accum_steps", k,
         f"a divisor of batch_size / {data} (the data axis' devices): each device takes its "
         f"share of every micro-batch")
  # Each process feeds its own slice of the batch to its own devices, so a group of devices that
  # shares one data shard (the heads axis) must sit in one process.
  local = num_devices // process_count
  _check(heads == 1 or local % heads == 0, "mesh", mesh,
         f"a heads axis within one host: its {heads} devices would span processes of {local} "
         f"devices each, which feed different data; use heads dividing {local}")


def _validate_init_from(c, models):
  from featdiv_jax import runs  # pylint: disable=g-import-not-at-top  # orbax: only when needed
  path, arch, stem = c.model.init_from, c.model.arch, c.model.stem
  run = runs.split_spec(path)
  if run:
    _validate_init_from_run(c, runs, *run)
    return
  _check(os.path.isfile(path), "model.init_from", path,
         "an existing .safetensors or .npz file, or a featdiv workdir[@best|@STEP]")
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
