r"""Times full training steps (forward, loss + penalty, backward, AdamW) on synthetic data.

  python -m featdiv_jax.bench --arch seresnet18 --heads 2 --image-size 32 --batch 64 --steps 10 \
      --dtype float32 --heads-impl vmap [--no-penalty] [--conv-impl auto] --json PATH

Reports compile time apart from step time (median and spread over timed steps after warm-up),
images/s, peak device memory where the backend reports it, and FLOPs per step from XLA's cost
analysis (of the im2col form, whose matmuls XLA counts on every backend) with the achieved
FLOP/s. Imports no TensorFlow, so it runs on an accelerator image. `benchmarks/torch_reference.py`
takes the same flags for the PyTorch/timm reference.
"""

import argparse
import functools
import json
import sys
import time
import types

import jax
import numpy as np

from featdiv_jax import models, sharding, steps


def bench_config(args) -> types.SimpleNamespace:
  ns = types.SimpleNamespace
  heads = args.heads
  return ns(
      model=ns(arch=args.arch, num_heads=heads, fusion="concat",
               classifier="flatten_mlp" if heads > 1 else "pool_linear", hidden=512,
               dropout=0.5, frozen_heads=(), stem=args.stem, dtype=args.dtype,
               conv_impl=args.conv_impl),
      optimizer=ns(name="adamw", learning_rate=4e-4, weight_decay=5e-4, momentum=0.9,
                   schedule="cosine", warmup_steps=0),
      penalty=ns(weight=0.0 if args.no_penalty or heads < 2 else 1.0, kind="cos"),
      seed=0, skip_nonfinite=False)


def build_step(args, conv_impl=None):
  """(jitted step, state, batch) for the benchmark's config on all local devices."""
  c = bench_config(args)
  if conv_impl:
    c.model.conv_impl = conv_impl
  model = models.create_multihead(
      c.model.arch, c.model.num_heads, args.classes, classifier=c.model.classifier,
      stem=c.model.stem, dtype=c.model.dtype, conv_impl=c.model.conv_impl,
      heads_impl=args.heads_impl)
  tx = steps.make_optimizer(c.optimizer, 1000)
  mesh = sharding.make_mesh((-1, 1))
  init = functools.partial(steps.init_state, model, tx, image_size=args.image_size)
  abstract = jax.eval_shape(init, jax.random.key(0))
  state_sh = sharding.state_shardings(mesh, abstract, c.model.num_heads)
  batch_sh = sharding.batch_sharding(mesh)
  state = jax.jit(init, out_shardings=state_sh)(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = sharding.global_batch({
      "image": rng.normal(size=(args.batch, args.image_size, args.image_size, 3)).astype(
          np.float32),
      "label": rng.integers(0, args.classes, args.batch).astype(np.int32)}, batch_sh)
  step = jax.jit(steps.bind_train_step(model, tx, c), in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  return step, state, batch


def _flops(lowered) -> float | None:
  try:
    cost = lowered.compile().cost_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend reports costs
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  return float(cost["flops"]) if cost and cost.get("flops") else None


def run(args) -> dict:
  step, state, batch = build_step(args)
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  for _ in range(args.warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(args.steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  ms = 1e3 * np.asarray(times)
  im2col_step, im2col_state, _ = build_step(args, conv_impl="im2col")
  flops = _flops(im2col_step.lower(im2col_state, batch))
  median_s = float(np.median(ms)) / 1e3
  memory = jax.local_devices()[0].memory_stats() or {}
  return dict(
      impl="jax", arch=args.arch, heads=args.heads, heads_impl=args.heads_impl,
      image_size=args.image_size, batch=args.batch, dtype=args.dtype,
      penalty=not args.no_penalty and args.heads > 1, conv_impl=args.conv_impl,
      resolved_conv_impl=models.backbone_fields(args.arch, conv_impl=args.conv_impl)["conv_impl"],
      compile_s=compile_s, step_ms_median=float(np.median(ms)), step_ms_min=float(ms.min()),
      step_ms_max=float(ms.max()), step_ms_p10=float(np.percentile(ms, 10)),
      step_ms_p90=float(np.percentile(ms, 90)), img_per_s=args.batch / median_s,
      flops_per_step=flops, tflop_per_s=flops / median_s / 1e12 if flops else None,
      peak_mem_bytes=memory.get("peak_bytes_in_use"),
      loss=float(metrics["loss"]), device=str(jax.devices()[0].device_kind),
      num_devices=jax.device_count(), jax_version=jax.__version__)


def table(r: dict) -> str:
  flops = f"{r['tflop_per_s']:.2f}" if r["tflop_per_s"] else "-"
  return (f"{r['impl']:<5} {r['arch']} K={r['heads']} {r['heads_impl']:<4} {r['dtype']:<8} "
          f"{r['image_size']}px b{r['batch']} penalty={'on' if r['penalty'] else 'off'}: "
          f"step {r['step_ms_median']:.1f} ms (min {r['step_ms_min']:.1f}, max "
          f"{r['step_ms_max']:.1f}), {r['img_per_s']:.0f} img/s, compile {r['compile_s']:.1f} s, "
          f"{flops} TFLOP/s, peak mem {r['peak_mem_bytes'] or '-'} ({r['device']})")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--arch", default="seresnet18", choices=sorted(models.ARCHS))
  p.add_argument("--heads", type=int, default=2)
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--heads-impl", default="vmap", choices=["vmap", "loop"])
  p.add_argument("--conv-impl", default="auto", choices=["auto", "xla", "im2col"])
  p.add_argument("--stem", default="imagenet", choices=list(models.STEMS))
  p.add_argument("--classes", type=int, default=10)
  p.add_argument("--no-penalty", action="store_true")
  p.add_argument("--json", help="write the result as JSON here")
  args = p.parse_args(argv)
  if args.heads < 1 or args.batch < 1 or args.steps < 1 or args.image_size < 8:
    p.error("--heads, --batch and --steps must be >= 1 and --image-size >= 8")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  result = run(args)
  print(table(result), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
