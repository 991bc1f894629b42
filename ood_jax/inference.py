"""The one inference loop: a model over a data set, every example exactly once, in order.

Batches come from `pipeline.eval_batches` (sharded over the mesh axis 'data', the last one padded
with a mask); the apply function is jitted once per (function, mesh) with replicated variables and
batch-sharded images, so the 75 CIFAR-10-C sets and every OOD set of an evaluation share one
compilation; the padded rows are dropped with the mask on the host.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ood_jax import sharding
from ood_jax.data import pipeline

ApplyFn = Callable[[Any, jax.Array], Sequence[jax.Array]]


@functools.lru_cache(maxsize=16)
def model_apply(model) -> ApplyFn:
  """`(variables, images) -> model.apply(variables, images, train=False)`, one function per model.

  The same function object for the same model is what lets `run` reuse one compilation.
  """
  return lambda variables, images: model.apply(variables, images, train=False)


@functools.lru_cache(maxsize=16)
def _compiled(apply_fn: ApplyFn, mesh):
  return jax.jit(apply_fn, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def run(apply_fn: ApplyFn, variables, images, labels=None, *, mesh, batch_size: int, mean, std,
        names: Sequence[str] = ('logits', 'features')) -> dict[str, np.ndarray]:
  """The outputs of `apply_fn` on every image, in order, in inference mode, on the host.

  Args:
    apply_fn: `(variables, images [B, H, W, C]) -> (out_1 [B, ·], out_2 [B, ·], ...)`, one output
      per entry of `names`; e.g. `model_apply(model)` for a `Classifier`, whose outputs are
      (logits, features), or (embeddings, features) with a projection head. Called under `jax.jit`.
    variables: the model variables, placed on (or placeable on) every device of `mesh`.
    images: `[N, H, W, C]` uint8 images.
    labels: `[N]` integer labels, or None for an OOD set.
    mesh: a mesh with axis 'data' (`ood_jax.sharding.make_mesh`).
    batch_size: global batch size, divisible by the number of devices in `mesh`.
    mean: per-channel normalisation means on [0, 1].
    std: per-channel normalisation standard deviations on [0, 1].
    names: the names of `apply_fn`'s outputs, the keys of the result.

  Returns:
    Dict with one float32 `[N, ·]` NumPy array per name and, when labels are given, 'labels' `[N]`
    int32 (the labels as they came through the batches, so the rows provably line up).

  Raises:
    TypeError: if `apply_fn` does not return one `[B, ·]` array per name.
  """
  names = tuple(names)
  apply = _compiled(apply_fn, mesh)
  chunks = {name: [] for name in names + ('labels',)}
  for batch in pipeline.eval_batches(images, labels, global_batch_size=batch_size, mesh=mesh, mean=mean, std=std):
    outputs = apply(variables, batch['image'])
    if not (isinstance(outputs, (tuple, list)) and len(outputs) == len(names)
            and all(np.ndim(o) == 2 and np.shape(o)[0] == batch_size for o in outputs)):
      shapes = jax.tree.map(np.shape, outputs)
      expected = ', '.join(f'{name} [B, ·]' for name in names)
      raise TypeError(f'apply_fn must return ({expected}) for a batch of B = {batch_size} images, '
                      f'got shapes {shapes}.')
    mask = np.asarray(batch['mask'])
    for name, output in zip(names, outputs):
      chunks[name].append(np.asarray(output, np.float32)[mask])
    if labels is not None:
      chunks['labels'].append(np.asarray(batch['label'])[mask])
  return {name: np.concatenate(parts) for name, parts in chunks.items() if parts}
