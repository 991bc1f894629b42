"""Fine-tuning: start a run from a pretrained checkpoint (`config.init_from`) with a head policy.

The backbone is always restored. The head follows `config.init_head` (see
`experiment.HEAD_POLICIES`): kept when it fits, re-initialised, or, for ICE's Mahalanobis head on
a softmax-pretrained backbone (Wu et al. 2022), set at the class means and shared covariance of the
pretrained features (`class_statistics_head`).
"""

from __future__ import annotations

from absl import logging
import jax
import numpy as np

from ood_jax.trainer import checkpoint
from ood_jax.trainer import inference
from ood_jax import layers
from ood_jax import scores
from ood_jax.trainer import step as step_lib
from ood_jax.trainer.data import sources


def load_pretrained(path: str) -> dict:
  """{'params', 'batch_stats'} of a checkpoint (workdir, checkpoints folder or step folder), on one device."""
  try:
    restored = checkpoint.restore(path)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'init_from={path!r}: {e}') from None
  logging.info('init_from: read step %d of %s.', int(restored['step']), path)
  return {'params': restored['params'], 'batch_stats': restored.get('batch_stats') or {}}


def _same_structure(a, b) -> bool:
  leaves_a, tree_a = jax.tree.flatten(a)
  leaves_b, tree_b = jax.tree.flatten(b)
  return tree_a == tree_b and all(np.shape(x) == np.shape(y) for x, y in zip(leaves_a, leaves_b))


def _cast_like(pretrained, fresh):
  return jax.tree.map(lambda old, new: np.asarray(old, dtype=np.asarray(new).dtype), pretrained, fresh)


def merge_pretrained(fresh: dict, pretrained: dict, *, head_policy: str = 'auto'):
  """Fresh variables with the backbone (and, if `head_policy` allows, the head) taken from `pretrained`.

  The backbone ('params'/'batch_stats' entries other than 'head') must match exactly in structure and
  shapes; a mismatch raises ValueError naming the parameter. The head is kept with 'keep' (error if
  it does not fit), re-initialised with 'reinit' (or 'class_stats', which sets it afterwards), and
  with 'auto' kept exactly when it has the same structure and shapes (fine-tuning the same method)
  and re-initialised otherwise (e.g. a Mahalanobis head on a softmax-pretrained backbone, Wu et al. 2022).

  Returns:
    (params, batch_stats).
  """
  merged = {}
  for collection in ('params', 'batch_stats'):
    new, old = dict(fresh[collection] or {}), dict(pretrained.get(collection) or {})
    for name, value in new.items():
      if name == 'head':
        fits = name in old and _same_structure(value, old[name])
        if head_policy == 'keep' and not fits:
          raise ValueError("init_head=keep but the pretrained head does not match this model's head.")
        if head_policy == 'keep' or (head_policy == 'auto' and fits):
          new[name] = _cast_like(old[name], value)
        continue
      if name not in old:
        raise ValueError(f'init_from: the pretrained checkpoint has no {collection}/{name}.')
      flat_old = dict(jax.tree_util.tree_flatten_with_path(old[name])[0])
      for key, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
        path = f'{collection}/{name}' + jax.tree_util.keystr(key)
        if key not in flat_old:
          raise ValueError(f'init_from: the pretrained checkpoint has no {path}.')
        if np.shape(flat_old[key]) != np.shape(leaf):
          raise ValueError(f'init_from: shape mismatch at {path}: pretrained {np.shape(flat_old[key])}, '
                           f'model {np.shape(leaf)}.')
      new[name] = _cast_like(old[name], value)
    merged[collection] = new
  return merged['params'], merged['batch_stats']


def class_statistics_head(model, variables, data: sources.ArrayData, *, mesh, batch_size: int, mean, std,
                          num_classes: int, ridge: float = 1e-4) -> dict:
  """Mahalanobis-head parameters at the class means and shared covariance of the model's features.

  Fine-tuning ICE from a softmax checkpoint needs a head the checkpoint does not have. A random one
  (N(0, 1) means, identity covariance) classifies at chance and the first epochs are spent finding
  the classes again; starting from the Gaussian the features already follow (Lee et al. 2018, fitted
  on un-augmented training images in inference mode) starts at the pretrained model's accuracy. On
  the digits benchmark, 10 epochs at lr 0.01 (gradient clipped at norm 1) give 99.7 % accuracy and
  mean AUROC 99.0 this way against 97.8 % and 96.9 from a random head.

  Args:
    model: a `Classifier` with a 'mahalanobis' head.
    variables: its variables (the head's entries are ignored: only features are used).
    data: the in-distribution training set (uint8 images, labels).
    mesh, batch_size, mean, std: as `inference.run`.
    num_classes: K.
    ridge: relative shrinkage of the covariance (`scores.fit_gaussian`): dead ReLU features make the
      empirical covariance singular.

  Returns:
    {'means': [K, D], 'cholesky_raw': [D, D]} float32, the head's parameter names.
  """
  extracted = inference.run(inference.model_apply(model), variables, data.images, data.labels, mesh=mesh,
                            batch_size=batch_size, mean=mean, std=std)
  try:
    gaussian = scores.fit_gaussian([(extracted['features'], extracted['labels'])], num_classes=num_classes,
                                   ridge=ridge)
  except ValueError as e:
    raise ValueError(f"init_head='class_stats' fits the head on the training set: {e}") from e
  logging.info('init_head=class_stats: Mahalanobis head fitted on %d training features.', len(data))
  return {'means': np.asarray(gaussian.means, np.float32),
          'cholesky_raw': np.asarray(layers.raw_from_cholesky(gaussian.cholesky), np.float32)}


def initialize_from(exp, state: step_lib.TrainState, train_data: sources.ArrayData, *, mesh, state_sharding
                    ) -> step_lib.TrainState:
  """`state` with the pretrained variables of `exp.settings.init_from` merged in (see the module docstring)."""
  settings = exp.settings
  policy = settings.init_head
  params, batch_stats = merge_pretrained(
      {'params': state.params, 'batch_stats': state.batch_stats}, load_pretrained(settings.init_from),
      head_policy='reinit' if policy == 'class_stats' else policy)
  if policy == 'class_stats':
    params = {**params, 'head': class_statistics_head(
        exp.model, step_lib.model_variables(params, batch_stats), train_data, mesh=mesh,
        batch_size=settings.eval.batch_size, mean=exp.mean, std=exp.std, num_classes=exp.info.num_classes)}
  return jax.device_put(state.replace(params=params, batch_stats=batch_stats), state_sharding)
