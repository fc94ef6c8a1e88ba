"""The benchmark's command line and JSON (its speed claims are measured, not tested)."""

import json

import jax
import numpy as np
import pytest

from featdiv_jax import bench, models


def test_bench_writes_the_fields_outside_checks_read(tmp_path, capsys):
  path = tmp_path / "r.json"
  assert bench.main(["--arch", "seresnet_tiny", "--heads", "2", "--image-size", "32",
                     "--batch", "8", "--steps", "2", "--warmup", "1", "--json", str(path)]) == 0
  r = json.loads(path.read_text())
  assert r["img_per_s"] > 0 and r["step_ms_median"] > 0 and r["compile_s"] > 0
  assert r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
  assert r["flops_per_step"] > 0 and r["penalty"] and np.isfinite(r["loss"])
  assert "img/s" in capsys.readouterr().out


def test_loop_heads_match_vmapped_heads_given_the_same_weights():
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  vmapped = models.create_multihead("seresnet_tiny", 3, 5, stem="cifar")
  looped = models.create_multihead("seresnet_tiny", 3, 5, stem="cifar", heads_impl="loop")
  v = jax.jit(vmapped.init)(jax.random.key(0), x)
  loop_vars = {col: {**{f"head_{k}": jax.tree.map(lambda a: a[k], v[col]["heads"])
                        for k in range(3)},
                     **{n: t for n, t in v[col].items() if n != "heads"}}
               for col in v}
  (a, fa), (b, fb) = jax.jit(vmapped.apply)(v, x), jax.jit(looped.apply)(loop_vars, x)
  np.testing.assert_allclose(fa, fb, atol=1e-5)
  np.testing.assert_allclose(a, b, atol=1e-5)


def refusal(capsys, argv) -> str:
  """argparse's exit status 2 and the one message it printed for `argv`."""
  with pytest.raises(SystemExit) as e:
    bench.parse_args(argv)
  assert e.value.code == 2
  return capsys.readouterr().err


def test_bad_bench_arguments_exit_with_a_message(capsys):
  assert "--heads, --batch and --steps must be >= 1" in refusal(capsys, ["--heads", "0"])
  err = refusal(capsys, ["--arch", "resnet9"])
  assert "--arch" in err and "'resnet9'" in err and "seresnet18" in err
  assert "--rounds must be >= 1, got 0" in refusal(capsys, ["--rounds", "0"])


def test_bench_compares_variants_interleaved_and_reports_ratios(tmp_path, capsys):
  path = tmp_path / "r.json"
  assert bench.main(["--arch", "seresnet_tiny", "--heads", "2", "--image-size", "32",
                     "--batch", "8", "--steps", "2", "--warmup", "1", "--rounds", "2",
                     "--vs", "no_penalty=1", "--json", str(path)]) == 0
  r = json.loads(path.read_text())
  rows = {row["name"]: row for row in r["comparison"]}
  assert list(rows) == ["base", "no_penalty=1"]
  assert rows["base"]["penalty"] and not rows["no_penalty=1"]["penalty"]
  assert all(row["timed_steps"] == 4 for row in rows.values())  # 2 rounds x 2 steps each
  assert rows["base"]["base_over_this"] == 1.0
  assert rows["no_penalty=1"]["base_over_this"] == pytest.approx(
      r["step_ms_median"] / rows["no_penalty=1"]["step_ms_median"])
  assert "this / base time" in capsys.readouterr().out


def test_bench_refuses_a_variant_that_names_no_flag(capsys):
  err = refusal(capsys, ["--vs", "headz=3"])
  assert "--vs 'headz=3': expected dest=value with dest one of" in err and "heads_impl" in err
  assert "--vs 'heads_impl': expected dest=value" in refusal(capsys, ["--vs", "heads_impl"])
  assert bench.variant_args(bench.parse_args([]), "heads=4").heads == 4
  assert bench.variant_args(bench.parse_args([]), "heads_impl=loop").heads_impl == "loop"


def input_pipeline_module():
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks",
                      "input_pipeline.py")
  spec = importlib.util.spec_from_file_location("input_pipeline", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_input_pipeline_benchmark_compares_the_cache_on_jpegs(capsys):
  assert input_pipeline_module().main(["--config", "jpeg224", "--examples", "8",
                                       "--epochs", "1"]) == 0
  out = capsys.readouterr().out
  assert "dataset.cache=none" in out and "dataset.cache=memory" in out
  assert "cache / none = " in out


def test_input_pipeline_benchmark_times_the_configs_step(monkeypatch):
  """benchmarks/input_pipeline.py hands the config's model (dtype "auto" included) to bench."""
  module = input_pipeline_module()
  config = module.load_config("digits")
  assert config.model.dtype == "auto"
  with config.unlocked():
    config.model.arch, config.batch_size = "seresnet_tiny", 8
  assert module.time_step(config) > 0


def test_bench_dtype_auto_is_the_models_default():
  assert bench.parse_args(["--dtype", "auto"]).dtype == models.default_dtype() == "float32"
  args = bench.parse_args([])
  assert bench.variant_args(args, "dtype=auto").dtype == "float32"
