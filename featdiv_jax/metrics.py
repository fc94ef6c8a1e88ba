"""The training loop's running metrics (clu collections) and their JSON form for checkpoints.

No TensorFlow here: `clu.metrics` is plain JAX (clu's writers, which import TF, live in the loop).
"""

import flax
import jax
import jax.numpy as jnp
from clu import metrics as clu_metrics

AVERAGED = ("loss", "cross_entropy", "penalty", "head_cosine", "accuracy")


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
  loss: clu_metrics.Average.from_output("loss")
  cross_entropy: clu_metrics.Average.from_output("cross_entropy")
  penalty: clu_metrics.Average.from_output("penalty")
  head_cosine: clu_metrics.Average.from_output("head_cosine")
  accuracy: clu_metrics.Average.from_output("accuracy")
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


def to_json(collection: TrainMetrics | None) -> dict | None:
  """The running averages as {name: [total, count]}, so a checkpoint can carry them."""
  if collection is None:
    return None
  host = jax.device_get(collection)
  return {k: [float(getattr(host, k).total), float(getattr(host, k).count)] for k in AVERAGED}


def from_json(saved: dict | None) -> TrainMetrics | None:
  if not saved:
    return None
  return TrainMetrics.empty().replace(**{
      k: clu_metrics.Average(total=jnp.asarray(t, jnp.float32), count=jnp.asarray(c, jnp.float32))
      for k, (t, c) in saved.items()})
