"""The one inference loop: a model over a data set, every example exactly once, in order.

Batches come from `pipeline.eval_batches` (sharded over the mesh axis 'data', the last one padded
with a mask); the apply function is jitted once per (function, mesh) with replicated variables and
batch-sharded images, so the 75 CIFAR-10-C sets and every OOD set of an evaluation share one
compilation; the padded rows are dropped with the mask on the host.

The same code runs on several processes (`jax.distributed`): every process passes the same images
(the global batch; each copies only its own devices' rows) and gets every output on the host. The
program returns its outputs, and the batch's mask and labels passed through it, replicated
(`out_shardings`), so each process reads them from its own devices: a batch-sharded array spanning
other processes' devices cannot be read with `np.asarray`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ood_jax.trainer import sharding
from ood_jax.trainer import xla_options
from ood_jax.trainer.data import pipeline

ApplyFn = Callable[[Any, jax.Array], Sequence[jax.Array]]


@functools.lru_cache(maxsize=16)
def model_apply(model) -> ApplyFn:
  """`(variables, images) -> model.apply(variables, images, train=False)`, one function per model.

  The same function object for the same model is what lets `run` reuse one compilation.
  """
  return lambda variables, images: model.apply(variables, images, train=False)


@functools.lru_cache(maxsize=16)
def _compiled(apply_fn: ApplyFn, mesh):
  """`(variables, images, rows) -> (apply_fn(variables, images), rows)`, every output replicated.

  `rows` (the batch's mask and labels) only passes through: gathered like the outputs, it is
  readable on the host of every process.
  """
  with_rows = lambda variables, images, rows: (apply_fn(variables, images), rows)
  batch = sharding.batch_sharding(mesh)
  return jax.jit(with_rows, in_shardings=(sharding.replicated(mesh), batch, batch),
                 out_shardings=sharding.replicated(mesh), compiler_options=xla_options.compiler_options())


def run(apply_fn: ApplyFn, variables, images, labels=None, *, mesh, batch_size: int, mean, std,
        names: Sequence[str] = ('logits', 'features')) -> dict[str, np.ndarray]:
  """The outputs of `apply_fn` on every image, in order, in inference mode, on the host.

  Args:
    apply_fn: `(variables, images [B, H, W, C]) -> (out_1 [B, ·], out_2 [B, ·], ...)`, one output
      per entry of `names`; e.g. `model_apply(model)` for a `Classifier`, whose outputs are
      (logits, features), or (embeddings, features) with a projection head. Called under `jax.jit`.
    variables: the model variables, placed on (or placeable on) every device of `mesh`.
    images: `[N, H, W, C]` uint8 images, the same on every process.
    labels: `[N]` integer labels (the same on every process), or None for an OOD set.
    mesh: a mesh with axis 'data' (`ood_jax.trainer.sharding.make_mesh`).
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
    outputs, rows = apply(variables, batch['image'], {key: batch[key] for key in ('mask', 'label') if key in batch})
    if not (isinstance(outputs, (tuple, list)) and len(outputs) == len(names)
            and all(np.ndim(o) == 2 and np.shape(o)[0] == batch_size for o in outputs)):
      shapes = jax.tree.map(np.shape, outputs)
      expected = ', '.join(f'{name} [B, ·]' for name in names)
      raise TypeError(f'apply_fn must return ({expected}) for a batch of B = {batch_size} images, '
                      f'got shapes {shapes}.')
    mask = np.asarray(rows['mask'])
    for name, output in zip(names, outputs):
      chunks[name].append(np.asarray(output, np.float32)[mask])
    if labels is not None:
      chunks['labels'].append(np.asarray(rows['label'])[mask])
  return {name: np.concatenate(parts) for name, parts in chunks.items() if parts}
