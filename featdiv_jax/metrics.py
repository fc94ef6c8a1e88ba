"""The training loop's running metrics (clu collections) and their JSON form for checkpoints.

No TensorFlow here: `clu.metrics` is plain JAX (clu's writers, which import TF, live in the loop).
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

AVERAGED = ("loss", "cross_entropy", "penalty", "head_cosine", "accuracy", "grad_norm")


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  cross_entropy: clu_metrics.Average.from_output("cross_entropy")
  penalty: clu_metrics.Average.from_output("penalty")
  head_cosine: clu_metrics.Average.from_output("head_cosine")
  accuracy: clu_metrics.Average.from_output("accuracy")
  grad_norm: clu_metrics.Average.from_output("grad_norm")  # before any clipping
  learning_rate: clu_metrics.LastValue.from_output("learning_rate")


def step_metrics(metrics: dict) -> TrainMetrics:
  """One step's metrics; a skipped (non-finite) update does not count in the averages."""
  keep = 1.0 - metrics["skipped"]
  return TrainMetrics.empty().replace(
      learning_rate=clu_metrics.LastValue.from_model_output(metrics["learning_rate"]),
      **{k: clu_metrics.Average(total=jnp.where(keep > 0, metrics[k], 0.0), count=keep)
         for k in AVERAGED})


def merge(running: TrainMetrics | None, step: TrainMetrics) -> TrainMetrics:
  return step if running is None else running.merge(step)


GUARDED = ("loss", "cross_entropy", "penalty")  # a NaN/inf in these stops the run


@flax.struct.dataclass
class LoopCarry:
  """What the training loop accumulates on the device, inside its compiled step
  (`accumulate`), so that a step needs no host work: the running train averages since the last
  log and since the last evaluation, and what the NaN guard needs. Read at log, eval and
  checkpoint steps only."""
  since_log: TrainMetrics
  since_eval: TrainMetrics
  skipped: jax.Array      # int32: updates dropped by skip_nonfinite since the carry was made
  bad_step: jax.Array     # int32: the first step with a non-finite GUARDED value (not skipped); -1
  bad_values: jax.Array   # float32 (len(GUARDED),): those values at bad_step


def zero_metrics(xp=jnp) -> TrainMetrics:
  """A TrainMetrics of zeros (`xp`: jnp, or np for host values) with the types and dtypes
  `step_metrics` gives, so that merging steps into it changes none (the carry is an argument of
  a compiled step: one program)."""
  example = {k: jnp.zeros((), jnp.float32) for k in AVERAGED + ("learning_rate", "skipped")}
  shapes = jax.eval_shape(step_metrics, example)
  return jax.tree.map(lambda s: xp.zeros(s.shape, s.dtype), shapes)


def empty_carry(since_eval: TrainMetrics | None = None) -> LoopCarry:
  """A fresh carry; `since_eval` (from `from_json`) continues a checkpoint's interval averages.
  Pure: the loop jits it onto its mesh."""
  zero = zero_metrics()
  return LoopCarry(since_log=zero, since_eval=zero if since_eval is None else since_eval,
                   skipped=jnp.zeros((), jnp.int32), bad_step=jnp.full((), -1, jnp.int32),
                   bad_values=jnp.zeros((len(GUARDED),), jnp.float32))


def accumulate(carry: LoopCarry, metrics: dict, step) -> LoopCarry:
  """`carry` with one train step's `metrics` merged in; `step` is that step's number (the state's
  step after the update). Traced into the loop's compiled step."""
  summary = step_metrics(metrics)
  values = jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in GUARDED])
  bad = (metrics["skipped"] == 0) & ~jnp.all(jnp.isfinite(values))
  first = bad & (carry.bad_step < 0)
  return LoopCarry(since_log=carry.since_log.merge(summary),
                   since_eval=carry.since_eval.merge(summary),
                   skipped=carry.skipped + (metrics["skipped"] > 0).astype(jnp.int32),
                   bad_step=jnp.where(first, jnp.asarray(step, jnp.int32), carry.bad_step),
                   bad_values=jnp.where(first, values, carry.bad_values))


def first_bad(carry: LoopCarry) -> tuple | None:
  """(step, name, value) of the carry's first non-finite step, or None; reads the device."""
  step, values = jax.device_get((carry.bad_step, carry.bad_values))
  if int(step) < 0:
    return None
  name, value = next((n, float(v)) for n, v in zip(GUARDED, values) if not np.isfinite(v))
  return int(step), name, value


def to_json(collection: TrainMetrics | None) -> dict | None:
  """The running averages as {name: [total, count]}, so a checkpoint can carry them."""
  if collection is None:
    return None
  host = jax.device_get(collection)
  return {k: [float(getattr(host, k).total), float(getattr(host, k).count)] for k in AVERAGED}


def from_json(saved: dict | None) -> TrainMetrics | None:
  """`to_json`'s form back, as host (NumPy) values of `zero_metrics`' types."""
  if not saved:
    return None
  zero = zero_metrics(np)
  return zero.replace(**{k: getattr(zero, k).replace(total=np.float32(t), count=np.float32(c))
                         for k, (t, c) in saved.items()})
