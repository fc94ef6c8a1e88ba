"""Config files, the `file.py:arg` parser and the three variants."""

import importlib.util
import pathlib

import pytest

from featdiv_jax import configlib

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.py"))


def load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_four_configs_exist():
  assert {p.stem for p in CONFIGS} >= {"digits", "cifar10", "caltech101", "flowers102"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "single", "multi", "multi_cos", "compare",
                                 "multi_cos,arch=seresnet34,heads=3", "single,smoke",
                                 "smoke", "multi,seed=3,epochs=2.5,batch=16,weight=0.5,kind=abs"])
def test_every_config_and_variant_parses(path, arg):
  module = load(path)
  assert path.stem in module.__doc__ or "python -m featdiv_jax.main" in module.__doc__
  c = module.get_config(arg)
  assert c.variant in configlib.VARIANTS + (configlib.COMPARE,)
  if c.variant == "single":
    assert (c.model.num_heads, c.model.classifier, c.penalty.weight) == (1, "pool_linear", 0.0)
  elif c.variant == "multi":
    assert c.model.num_heads >= 2 and c.penalty.weight == 0.0
  elif c.variant == "multi_cos":
    assert c.model.num_heads >= 2 and c.penalty.weight > 0
  if arg and "smoke" in arg:
    assert c.smoke and c.model.arch == "seresnet_tiny" and c.total_steps <= 10
    assert c.dataset.image_size <= 32


def test_docstrings_show_the_launch_command():
  for path in CONFIGS:
    assert f"--config=configs/{path.name}" in load(path).__doc__


def test_defaults_follow_the_papers_readme():
  c = load(CONFIGS[[p.stem for p in CONFIGS].index("caltech101")]).get_config("multi_cos")
  assert (c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay) == (
      "adamw", 4e-4, 5e-4)
  assert (c.num_epochs, c.batch_size, c.optimizer.schedule) == (30.0, 64, "cosine")
  assert (c.model.arch, c.model.num_heads, c.model.classifier) == ("seresnet18", 2, "flatten_mlp")
  assert (c.penalty.weight, c.penalty.kind) == (1.0, "cos")
  # What the benchmark measured fastest (docs/performance.md): bf16 compute on accelerators,
  # im2col convolutions on CPU, vmapped heads.
  assert (c.model.dtype, c.model.conv_impl) == ("auto", "auto")
  assert (c.dataset.resize_size, c.dataset.image_size, c.dataset.flip) == (256, 224, True)
  cifar = load(CONFIGS[[p.stem for p in CONFIGS].index("cifar10")]).get_config(None)
  assert (cifar.dataset.image_size, cifar.model.stem, cifar.dataset.pad) == (32, "cifar", 4)
  flowers = load(CONFIGS[[p.stem for p in CONFIGS].index("flowers102")]).get_config(None)
  assert flowers.dataset.eval_split == "validation"
  digits = load(CONFIGS[[p.stem for p in CONFIGS].index("digits")]).get_config(None)
  assert digits.variant == "compare" and digits.dataset.name == "digits"


def test_short_keys_set_their_fields():
  c = configlib.apply_arg(configlib.default_config(),
                          "multi_cos,arch=seresnet34,heads=3,steps=7,lr=0.1,dtype=bfloat16")
  assert (c.model.arch, c.model.num_heads, c.total_steps) == ("seresnet34", 3, 7)
  assert (c.optimizer.learning_rate, c.model.dtype) == (0.1, "bfloat16")


@pytest.mark.parametrize("arg,match", [
    ("multi_kos", r"unknown variant 'multi_kos'; valid: single, multi, multi_cos, compare"),
    ("multi,depth=3", r"unknown config argument 'depth=3'.*arch, heads"),
    ("multi,heads=two", r"heads='two': expected int"),
    ("multi,huge", r"unknown config argument 'huge'"),
])
def test_bad_args_name_the_value_and_the_valid_ones(arg, match):
  with pytest.raises(ValueError, match=match):
    configlib.apply_arg(configlib.default_config(), arg)


def test_with_variant_copies_and_keeps_user_heads():
  c = configlib.apply_arg(configlib.default_config(), "compare,heads=3,weight=0.3")
  multi = configlib.with_variant(c, "multi")
  cos = configlib.with_variant(c, "multi_cos")
  single = configlib.with_variant(c, "single")
  assert (multi.model.num_heads, multi.penalty.weight) == (3, 0.0)
  assert (cos.model.num_heads, cos.penalty.weight) == (3, 0.3)
  assert single.model.num_heads == 1 and c.model.num_heads == 3  # the original is untouched
