"""Evaluation over a whole split: accuracy and loss, and what the heads learned.

`evaluate_split` runs the compiled eval step (`steps.eval_step`) over every example of a split
once and returns accuracy and loss with the per-head measures of `featdiv_jax.analysis`:
  - eval_head_cosine(_matrix): the mean cosine between heads' feature maps (what the penalty
    minimises);
  - eval_head_cka(_matrix): linear CKA between the heads' pooled features over the whole split
    (do the heads represent the images alike?);
  - eval_head_ablation_accuracy / _drop: accuracy with head k's map replaced by its batch mean,
    and the fall from the full model's (what does the classifier take from head k?);
  - with `probe_iter`, eval_head_probe_accuracy / eval_probe_all_accuracy: linear probes fitted
    on each head's (and all heads') pooled features of training examples, scored here (how
    useful is what head k learned, on its own?).
All are exact over the split and over processes: sums are added up, and the pooled features of
every example (gathered by the step's replicated output) reach every process. For one head the
pairwise measures are None. No TensorFlow here: batches arrive as iterators of NumPy dicts.
"""

import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from featdiv_jax import analysis, guards, sharding, steps


def collect(eval_step, state, make_iter: Callable, batch_sharding,
            on_first_batch: Optional[Callable[[], None]] = None) -> tuple:
  """(summed outputs, pooled features (K, N, C), labels (N,)) of the eval step over one pass
  of `make_iter()`, padding examples dropped. Device results are fetched once, at the end."""
  sums, examples = None, []
  for i, local in enumerate(make_iter()):
    out = eval_step(state, sharding.global_batch(local, batch_sharding))
    batch_sums = {k: v for k, v in out.items() if k not in steps.PER_EXAMPLE}
    sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
    examples.append({k: out[k] for k in steps.PER_EXAMPLE})
    if i == 0 and on_first_batch is not None:
      on_first_batch()
  sums, examples = jax.device_get((sums, examples))
  mask = np.concatenate([e["mask"] for e in examples]).astype(bool)
  pooled = np.concatenate([e["pooled"] for e in examples], axis=1)[:, mask]
  labels = np.concatenate([e["label"] for e in examples])[mask]
  return sums, pooled, labels


def evaluate_split(eval_step, state, make_iter: Callable, batch_sharding, step: int = 0,
                   probe_iter: Optional[Callable] = None) -> dict:
  """Accuracy, loss and the per-head measures (module docstring) over the whole eval split.

  `probe_iter` (an eval-style iterator over training examples, `data.eval_batches(...,
  side="train", max_examples=N)`) adds the linear probes and their cost in seconds
  (eval_probe_time_s, feature pass and fits).
  """
  sums, pooled, labels = collect(eval_step, state, make_iter, batch_sharding,
                                 lambda: guards.fault_point("eval", step))
  count = max(float(sums["count"]), 1.0)
  accuracy = float(sums["correct"]) / count
  cosines = np.asarray(sums["cosine_sum"]) / count
  cka = np.asarray(analysis.pooled_cka_matrix(pooled), np.float64)
  ablation = analysis.ablation_accuracies(sums["ablation_correct"], count)
  result = dict(
      eval_loss=float(sums["loss_sum"]) / count, eval_accuracy=accuracy,
      eval_count=int(sums["count"]), eval_head_cosine=analysis.off_diagonal_mean(cosines),
      eval_head_cosine_matrix=cosines.tolist(), eval_head_cka=analysis.off_diagonal_mean(cka),
      eval_head_cka_matrix=cka.tolist(), eval_head_ablation_accuracy=ablation,
      eval_head_ablation_drop=None if ablation is None else [accuracy - a for a in ablation])
  if probe_iter is not None:
    start = time.perf_counter()
    _, train_pooled, train_labels = collect(eval_step, state, probe_iter, batch_sharding)
    per_head, together = analysis.head_probe_accuracies(train_pooled, train_labels, pooled,
                                                        labels)
    result.update(eval_head_probe_accuracy=per_head, eval_probe_all_accuracy=together,
                  eval_probe_examples=int(len(train_labels)),
                  eval_probe_time_s=time.perf_counter() - start)
  return result


MATRICES = ("eval_head_cosine_matrix", "eval_head_cka_matrix")  # results.json, not the history


def scalars(entry: dict) -> dict:
  """An eval entry's numbers as TensorBoard scalars: lists become name/k, None is left out."""
  out = {}
  for key, value in entry.items():
    if key in MATRICES or value is None:
      continue
    if isinstance(value, (list, tuple)):
      out.update({f"{key}/{k}": v for k, v in enumerate(value) if v is not None})
    else:
      out[key] = value
  return out


def console_line(entry: dict) -> str:
  """The heads' part of the console's eval line, e.g. 'heads: cos 0.012, CKA 0.41, ablation
  drop 9.2/11.0 pts, probe 96.1/95.8% (all 97.5%)'; '' for one head without a probe."""
  parts = []
  if entry.get("eval_head_cosine") is not None:
    parts.append(f"cos {entry['eval_head_cosine']:.3f}")
  if entry.get("eval_head_cka") is not None:
    parts.append(f"CKA {entry['eval_head_cka']:.3f}")
  if entry.get("eval_head_ablation_drop"):
    parts.append("ablation drop " + "/".join(
        f"{100 * d:.1f}" for d in entry["eval_head_ablation_drop"]) + " pts")
  probes = entry.get("eval_head_probe_accuracy")
  if probes:
    parts.append("probe " + "/".join("–" if p is None else f"{100 * p:.1f}" for p in probes)
                 + "%")
    together = entry.get("eval_probe_all_accuracy")
    if len(probes) > 1 and together is not None:
      parts[-1] += f" (all {100 * together:.1f}%)"
  return "heads: " + ", ".join(parts) if parts else ""
