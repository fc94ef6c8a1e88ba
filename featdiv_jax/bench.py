r"""Times full training steps (forward, loss + penalty, backward, AdamW) on synthetic data.

  python -m featdiv_jax.bench --arch seresnet18 --heads 2 --image-size 32 --batch 64 --steps 10 \
      --dtype float32 --heads-impl vmap [--no-penalty] [--conv-impl auto] --json PATH

Comparisons in one run, interleaved so that the machine's drift hits every variant alike:
`--vs heads_impl=loop --vs no_penalty=1 --vs conv_impl=im2col --vs impl=torch --rounds 3` times
the base configuration and each variant (any flag as `dest=value`) in turn, `--rounds` times,
and prints each one's median step time and its ratio to the base. `impl=torch` runs
`benchmarks/torch_reference.py` with the same flags under `--torch-python` (an interpreter with
torch and timm) once per round.

Reports compile time apart from step time (median and spread over timed steps after warm-up),
images/s, peak device memory where the backend reports it, and FLOPs per step from XLA's cost
analysis (of the im2col form, whose matmuls XLA counts on every backend) with the achieved
FLOP/s. Imports no TensorFlow, so it runs on an accelerator image. `benchmarks/torch_reference.py`
takes the same flags for the PyTorch/timm reference.
"""

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from featdiv_jax import hostmem

if __name__ == "__main__":  # `python -m featdiv_jax.bench`: before jax starts any thread
  hostmem.at_entry_point()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from featdiv_jax import configlib, models, sharding, steps  # noqa: E402


def bench_config(args, conv_impl: str | None = None):
  """The training config the benchmark times: the defaults with the benchmark's flags."""
  c = configlib.with_variant(configlib.default_config(),
                             "single" if args.heads == 1 else "multi_cos")
  c.model.arch, c.model.num_heads, c.model.stem = args.arch, args.heads, args.stem
  c.model.dtype, c.model.conv_impl = args.dtype, conv_impl or args.conv_impl
  c.dataset.image_size, c.batch_size = args.image_size, args.batch
  if args.no_penalty:
    c.penalty.weight = 0.0
  return c


def build_step(args, conv_impl=None):
  """(jitted step, state, batch) for the benchmark's config on all local devices."""
  trainer = steps.make_trainer(bench_config(args, conv_impl), args.classes,
                               sharding.make_mesh((-1, 1)), total_steps=1000,
                               heads_impl=args.heads_impl)
  state = trainer.init_state(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({
      "image": rng.normal(size=(args.batch, args.image_size, args.image_size, 3)).astype(
          np.float32),
      "label": rng.integers(0, args.classes, args.batch).astype(np.int32)},
      trainer.batch_sharding)
  return trainer.train_step, state, batch


def _flops(lowered) -> float | None:
  try:
    cost = lowered.compile().cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend reports costs
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return float(cost["flops"]) if cost and cost.get("flops") else None


class _Timed:
  """One compiled JAX step and its state, timed a block of steps at a time."""

  def __init__(self, args):
    step, self.state, self.batch = build_step(args)
    t = time.perf_counter()
    self.compiled = step.compile(self.state, self.batch)
    self.compile_s = time.perf_counter() - t
    self.times_ms = []
    self.page_faults = 0
    self.warm(args.warmup)

  def warm(self, steps: int):
    for _ in range(steps):
      self.state, self.metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(self.metrics)

  def time(self, steps: int):
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
      t = time.perf_counter()
      self.state, self.metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready(self.metrics)
      self.times_ms.append(1e3 * (time.perf_counter() - t))
    self.page_faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def _summary(args, times_ms, compile_s) -> dict:
  ms = np.asarray(times_ms)
  median_s = float(np.median(ms)) / 1e3
  return dict(
      arch=args.arch, heads=args.heads, heads_impl=args.heads_impl,
      image_size=args.image_size, batch=args.batch, dtype=args.dtype,
      penalty=not args.no_penalty and args.heads > 1, conv_impl=args.conv_impl,
      compile_s=compile_s, step_ms_median=float(np.median(ms)), step_ms_min=float(ms.min()),
      step_ms_max=float(ms.max()), step_ms_p10=float(np.percentile(ms, 10)),
      step_ms_p90=float(np.percentile(ms, 90)), img_per_s=args.batch / median_s,
      timed_steps=len(ms))


def _result(args, timed: _Timed) -> dict:
  im2col_step, im2col_state, _ = build_step(args, conv_impl="im2col")
  flops = _flops(im2col_step.lower(im2col_state, timed.batch))
  r = dict(impl="jax", **_summary(args, timed.times_ms, timed.compile_s))
  memory = jax.local_devices()[0].memory_stats() or {}
  r.update(
      resolved_conv_impl=models.backbone_fields(args.arch, conv_impl=args.conv_impl)["conv_impl"],
      flops_per_step=flops,
      tflop_per_s=flops * r["img_per_s"] / args.batch / 1e12 if flops else None,
      peak_mem_bytes=memory.get("peak_bytes_in_use"),
      # Host page faults per timed step: large on CPU when each step's buffers are fresh mmaps.
      host_page_faults_per_step=timed.page_faults / len(timed.times_ms),
      host_malloc_reuse=hostmem.applied,
      loss=float(timed.metrics["loss"]), device=str(jax.devices()[0].device_kind),
      num_devices=jax.device_count(), jax_version=jax.__version__)
  return r


def run(args) -> dict:
  timed = _Timed(args)
  timed.time(args.steps)
  return _result(args, timed)


TORCH_REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "benchmarks", "torch_reference.py")
_TORCH_FLAGS = ("arch", "heads", "image_size", "batch", "steps", "warmup", "dtype", "stem",
                "classes")


def _torch_round(args) -> dict:
  """One run of the PyTorch reference with the benchmark's flags, in its own interpreter."""
  cmd = [args.torch_python, TORCH_REFERENCE]
  for name in _TORCH_FLAGS:
    cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
  if args.no_penalty:
    cmd.append("--no-penalty")
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "torch.json")
    # The reference gets the malloc settings this process runs with (see featdiv_jax.hostmem).
    env = dict(os.environ, **hostmem.GLIBC_ENV) if hostmem.applied else None
    subprocess.run(cmd + ["--json", path], check=True, stdout=subprocess.DEVNULL, env=env)
    with open(path) as f:
      return json.load(f)


def _resolve_dtype(args):
  if args.dtype == "auto":
    args.dtype = models.default_dtype()
  return args


def variant_args(args, spec: str):
  """A copy of `args` with one `dest=value` change (value parsed as that flag parses it)."""
  key, sep, value = spec.partition("=")
  key = key.strip().replace("-", "_")
  if not sep or key not in vars(args) or key in ("vs", "rounds", "json", "torch_python"):
    raise ValueError(f"--vs {spec!r}: expected dest=value with dest one of "
                     f"{', '.join(k for k in vars(args) if k not in ('vs', 'rounds', 'json'))}"
                     ", or impl=torch")
  out = copy.copy(args)
  current = getattr(args, key)
  if isinstance(current, bool):
    setattr(out, key, value.lower() in ("1", "true", "yes", "on"))
  else:
    setattr(out, key, type(current)(value) if current is not None else value)
  return _resolve_dtype(out)


def compare(args) -> dict:
  """Base and `--vs` variants timed in turn for `--rounds` rounds; medians and ratios."""
  names = ["base"] + list(args.vs)
  variants = {"base": args}
  for spec in args.vs:
    variants[spec] = args if spec == "impl=torch" else variant_args(args, spec)
  if "impl=torch" in variants and not args.torch_python:
    raise ValueError("--vs impl=torch needs --torch-python (an interpreter with torch and timm)")
  timed = {n: _Timed(a) for n, a in variants.items() if n != "impl=torch"}
  torch_times = []
  for _ in range(args.rounds):
    for name in names:
      if name == "impl=torch":
        torch_times.append(_torch_round(args)["step_ms_median"])
      else:
        timed[name].warm(1)
        timed[name].time(args.steps)
  base = _result(args, timed["base"])
  rows = []
  for name in names:
    if name == "impl=torch":
      row = dict(impl="torch", **_summary(args, torch_times, None))
    else:
      row = dict(impl="jax", **_summary(variants[name], timed[name].times_ms,
                                        timed[name].compile_s))
    row.update(name=name, base_over_this=row["step_ms_median"] and
               base["step_ms_median"] / row["step_ms_median"])
    rows.append(row)
  base["comparison"] = rows
  base["rounds"] = args.rounds
  return base


def comparison_table(r: dict) -> str:
  lines = [f"{'variant':<22} {'step ms':>9} {'p10':>8} {'p90':>8} {'img/s':>7}  "
           f"this / base time"]
  for row in r["comparison"]:
    lines.append(f"{row['name']:<22} {row['step_ms_median']:9.1f} {row['step_ms_p10']:8.1f} "
                 f"{row['step_ms_p90']:8.1f} {row['img_per_s']:7.0f}  "
                 f"{1 / row['base_over_this']:.3f}")
  return "\n".join(lines)


def table(r: dict) -> str:
  flops = f"{r['tflop_per_s']:.2f}" if r["tflop_per_s"] else "-"
  return (f"{r['impl']:<5} {r['arch']} K={r['heads']} {r['heads_impl']:<4} {r['dtype']:<8} "
          f"{r['image_size']}px b{r['batch']} penalty={'on' if r['penalty'] else 'off'}: "
          f"step {r['step_ms_median']:.1f} ms (min {r['step_ms_min']:.1f}, max "
          f"{r['step_ms_max']:.1f}), {r['img_per_s']:.0f} img/s, compile {r['compile_s']:.1f} s, "
          f"{flops} TFLOP/s, peak mem {r['peak_mem_bytes'] or '-'}, "
          f"{r['host_page_faults_per_step']:.0f} host page faults/step ({r['device']})")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--e2e", action="store_true",
                 help="time the training loop against its step on --config's data "
                 "(featdiv_jax.bench_e2e; needs TensorFlow)")
  p.add_argument("--config", default="configs/digits.py:multi_cos",
                 help="--e2e: the config (FILE.py:variant[,key=value...])")
  p.add_argument("--data-dir", default=None,
                 help="--e2e: dataset.data_dir for the config (default: the config's)")
  p.add_argument("--pipeline-batches", type=int, default=40,
                 help="--e2e: batches the input pipeline is timed for alone")
  p.add_argument("--arch", default="seresnet18", choices=sorted(models.ARCHS))
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                 help="compute dtype; auto: the models' default for this backend (the configs')")
  p.add_argument("--heads-impl", default="vmap", choices=list(models.HEADS_IMPLS))
  p.add_argument("--conv-impl", default="auto", choices=["auto", *models.CONV_IMPLS])
  p.add_argument("--stem", default="imagenet", choices=list(models.STEMS))
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--no-penalty", action="store_true")
  p.add_argument("--json", help="write the result as JSON here")
  p.add_argument("--vs", action="append", default=[], metavar="DEST=VALUE",
                 help="also time this variant, interleaved with the base (repeatable), e.g. "
                 "heads_impl=loop, no_penalty=1, conv_impl=im2col, impl=torch")
  p.add_argument("--rounds", type=int, default=3, help="rounds of interleaved timing with --vs")
  p.add_argument("--torch-python", help="python with torch + timm, for --vs impl=torch")
  args = _resolve_dtype(p.parse_args(argv))
  if args.heads < 1 or args.batch < 1 or args.steps < 1 or args.image_size < 8:
    p.error("--heads, --batch and --steps must be >= 1 and --image-size >= 8")
  if args.rounds < 1:
    p.error(f"--rounds must be >= 1, got {args.rounds}")
  if args.e2e and (args.vs or args.pipeline_batches < 1):
    p.error("--e2e takes no --vs, and --pipeline-batches must be >= 1")
  for spec in args.vs:
    if spec != "impl=torch":
      try:
        variant_args(args, spec)
      except (ValueError, TypeError) as e:
        p.error(str(e))
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.e2e:
    from featdiv_jax import bench_e2e  # pylint: disable=g-import-not-at-top  # imports TF
    return bench_e2e.main(args)
  result = compare(args) if args.vs else run(args)
  print(table(result), flush=True)
  if args.vs:
    print(comparison_table(result), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
