"""What a config describes, checked before any data is read: the `Experiment` record.

`check_config` resolves every name a config holds (dataset, backbone, method, optimiser, schedule,
dtype, method hyperparameters, OOD sets, corruptions, fine-tuning and base-model settings, batch
sizes) and fails with the list of valid values, so a typo costs a second instead of a training
run. `make_experiment` then builds the record the trainer and evaluator share: the dataset's
registry entry, the method, the model, the input normalisation and, for SMOT, the frozen base
model.
"""

from __future__ import annotations

import dataclasses
from typing import Any
import warnings

import jax
import jax.numpy as jnp
import ml_collections

from ood_jax.trainer import checkpoint
from ood_jax import corruptions
from ood_jax import detectors
from ood_jax import methods as methods_lib
from ood_jax import models as models_lib
from ood_jax.trainer import optim
from ood_jax.trainer import throughput
from ood_jax.trainer.data import catalog
from ood_jax.trainer.data import protocols
from ood_jax.trainer.data import registry

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
NORMALIZATIONS = ('dataset', 'symmetric')
# How `init_from` treats the model's head (the head *type* is the method's: dense, distance, ...):
# 'auto' keeps the pretrained head when it fits, else re-initialises it; 'keep'; 'reinit';
# 'class_stats' sets a Mahalanobis head at the class means and covariance of the pretrained features.
HEAD_POLICIES = ('auto', 'keep', 'reinit', 'class_stats')


@dataclasses.dataclass(frozen=True)
class Experiment:
  """The resolved contents of a config.

  Attributes:
    config: the config itself.
    info: the in-distribution dataset's registry entry.
    method: the training method.
    model: the `Classifier` (backbone + the method's head type).
    mean: per-channel input normalisation mean on [0, 1].
    std: per-channel input normalisation standard deviation on [0, 1].
    base: for methods with a frozen base model (SMOT), the base run's `Experiment`; else None.
  """

  config: ml_collections.ConfigDict
  info: registry.DatasetInfo
  method: methods_lib.Method
  model: Any
  mean: tuple[float, ...]
  std: tuple[float, ...]
  base: Experiment | None = None


def choice(kind: str, value: str, valid) -> str:
  """`value` if it is in `valid`, else ValueError listing the valid values."""
  if value not in valid:
    raise ValueError(f'Unknown {kind} {value!r}; valid values: {", ".join(sorted(valid))}.')
  return value


def check_config(config: ml_collections.ConfigDict) -> None:
  """Fails fast, with the list of valid values, on anything a run would otherwise fail on later.

  Reads no data; for a method with a base model it reads the base run's config.json.
  """
  registry.get_info(config.dataset)
  method = methods_lib.get_method(config.method)
  choice('backbone', config.backbone, models_lib.BACKBONES)
  choice('optimizer', config.optimizer.name, optim.OPTIMIZERS)
  choice('schedule', config.optimizer.schedule, optim.SCHEDULES)
  choice('dtype', config.dtype, DTYPES)
  choice('normalization', config.get('normalization', 'dataset'), NORMALIZATIONS)
  unknown = set(config.get('method_kwargs', {})) - set(method.hparams)
  if unknown:
    raise ValueError(f'Unknown method_kwargs {sorted(unknown)} for method {method.name!r}; '
                     f'valid: {sorted(method.hparams) or "none"}.')
  if method.needs_outliers and not config.get('outliers', {}).get('source'):
    raise ValueError(f'Method {method.name!r} trains with auxiliary outliers: set config.outliers.source '
                     f'(a TFDS name, a .npy file of uint8 images, or {catalog.DIGITS_OUTLIERS!r}).')
  if method.augment and config.augment != method.augment:
    raise ValueError(f'Method {method.name!r} needs config.augment={method.augment!r}, got {config.augment!r}.')
  _check_required(config)
  _check_init_from(config, method)
  _check_base_model(config, method)
  _warn_method_recipe(config, method)
  _check_eval(config.eval, method, config.dataset)
  catalog.check_validation_fraction(config.get('validation_fraction', 0.0))
  _check_fault_tolerance(config)
  if config.batch_size % jax.device_count():
    raise ValueError(f'batch_size ({config.batch_size}) must be divisible by the number of devices '
                     f'({jax.device_count()}).')


def _check_fault_tolerance(config) -> None:
  minutes = config.get('checkpoint_every_minutes', 0)
  if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes >= 0:
    raise ValueError(f'checkpoint_every_minutes must be a number >= 0 (0: no time-based checkpoints), got '
                     f'{minutes!r}.')
  for name in ('allow_config_change', 'xla_cpu_defaults'):
    if not isinstance(config.get(name, False), bool):
      raise ValueError(f'{name} must be True or False, got {config[name]!r}.')
  if config.get('peak_tflops') is not None:
    throughput.check_peak_tflops(config.peak_tflops)


# What to say when a recipe's `required_fields` entry is unset.
_REQUIRED_HINTS = {
    'init_from': ('This config fine-tunes a pretrained model: set --config.init_from=<workdir or checkpoint of a '
                  'run with the same dataset and backbone> (e.g. the softmax run of the same config file).'),
}


def _check_required(config) -> None:
  for name in config.get('required_fields', ()):
    if name not in config:
      raise ValueError(f'required_fields names {name!r}, which is not a config field.')
    if config[name] in (None, '', ()):
      raise ValueError(_REQUIRED_HINTS.get(name, f'This config needs --config.{name}.'))


def _check_init_from(config, method) -> None:
  init_from = config.get('init_from')
  policy = choice('init_head policy', config.get('init_head', 'auto'), HEAD_POLICIES)
  if policy == 'class_stats' and (method.head != 'mahalanobis' or not init_from):
    raise ValueError("init_head='class_stats' sets a Mahalanobis head (method ice) from the features of a "
                     f'pretrained backbone: it needs config.init_from; got method {method.name!r} '
                     f'({method.head} head), init_from={init_from!r}.')


def _check_base_model(config, method) -> None:
  if not method.needs_base_model:
    return
  if not config.get('base_model'):
    raise ValueError(f'Method {method.name!r} needs a pretrained base model: set config.base_model to the '
                     'workdir of a softmax run of the same architecture and dataset.')
  base_method = methods_lib.get_method(checkpoint.load_config(config.base_model).method)
  if base_method.head != 'dense':
    raise ValueError(f'config.base_model must be a run with a dense head (e.g. softmax) for class activation '
                     f'maps; {config.base_model} used {base_method.name!r} ({base_method.head} head).')


def _warn_method_recipe(config, method) -> None:
  """Warnings for recipes that run but are known to train badly (the losses' docstrings explain)."""
  kwargs = config.get('method_kwargs', {})
  if method.name == 'energy' and not config.get('init_from') and not ({'margin_in', 'margin_out'} & set(kwargs)):
    warnings.warn(
        "Method 'energy' is training from scratch with the default margins (m_in, m_out) = (-25, -7), which "
        'assume a pretrained network: its energy term can swamp the cross-entropy and leave a fresh model at '
        'chance. Fine-tune with --config.init_from=<workdir of a softmax run>, or set '
        '--config.method_kwargs.margin_in / margin_out (ood_jax.losses.energy_in_margin shows how to pick them).',
        UserWarning, stacklevel=3)
  optimizer = config.get('optimizer', {})
  if method.name == 'ice' and not optimizer.get('grad_clip_norm') and optimizer.get('learning_rate', 1.0) != 0:
    warnings.warn(
        "Method 'ice' is training without gradient clipping: its squared Mahalanobis distances make unclipped "
        'runs diverge within a few steps. Set --config.optimizer.grad_clip_norm=1.0 (as configs/ice.py does).',
        UserWarning, stacklevel=3)


def detector_names(spec: str) -> str | tuple[str, ...]:
  """`config.eval.detectors` ('' none, 'all', or comma-separated names) as `detectors.resolve` takes it."""
  spec = (spec or '').strip()
  if spec == 'all':
    return 'all'
  return tuple(name.strip() for name in spec.split(',') if name.strip())


def detector_inputs(method: methods_lib.Method) -> set[str]:
  """What the evaluator can give a post-hoc detector of a model trained with `method`."""
  if method.probabilities is None:  # a contrastive model: features only
    return {'features'}
  return {'logits', 'features'} | ({'head'} if method.head == 'dense' else set())


@dataclasses.dataclass(frozen=True)
class EvaluationSets:
  """The OOD sets an evaluation reads (`evaluation_sets`).

  Attributes:
    protocol: the benchmark protocol's name, or '' without one.
    groups: 'near' / 'far' (the protocol's) and 'other' (eval.ood_sets outside it) → sets.
    test_sets: every OOD test set, in group order.
    validation: OOD sets for hyperparameter tuning (the protocol's, then eval.validation_ood_sets).
  """

  protocol: str
  groups: dict
  test_sets: tuple
  validation: tuple


def evaluation_sets(eval_config, dataset: str) -> EvaluationSets:
  """The OOD test and validation sets of `config.eval` for in-distribution `dataset`, checked.

  `eval.benchmark` names a protocol (`ood_jax.trainer.data.protocols`) whose near / far sets come first;
  `eval.ood_sets` it does not list are evaluated too (group 'other'). Raises ValueError for an
  unknown protocol or set, or a validation set that is also a test set.
  """
  name = (eval_config.get('benchmark') or '').strip()
  groups, validation = {}, ()
  if name:
    protocol = protocols.get(name, dataset)
    groups, validation = dict(protocol.groups), protocol.validation
  listed = {s for sets in groups.values() for s in sets}
  other = tuple(dict.fromkeys(s for s in eval_config.ood_sets if s not in listed))
  if other:
    groups['other'] = other
  validation = tuple(dict.fromkeys(validation + tuple(eval_config.get('validation_ood_sets', ()))))
  test_sets = tuple(s for sets in groups.values() for s in sets)
  for set_name in test_sets + validation:
    catalog.check_ood_set(set_name)
  leaked = sorted(set(validation) & set(test_sets))
  if leaked:
    raise ValueError(f'eval.validation_ood_sets {leaked} are also test sets: hyperparameters tuned on a test '
                     'set overstate every number measured on it. Pick validation sets disjoint from the test sets.')
  return EvaluationSets(name, groups, test_sets, validation)


def _check_eval(eval_config, method, dataset: str) -> None:
  evaluation_sets(eval_config, dataset)
  if eval_config.batch_size % jax.device_count():
    raise ValueError(f'eval.batch_size ({eval_config.batch_size}) must be divisible by the number of devices '
                     f'({jax.device_count()}).')
  for corruption in eval_config.corruptions:
    for severity in eval_config.severities:
      corruptions.check_corruption(corruption, severity)
  spec = (eval_config.get('detectors') or '').strip()
  if spec:
    try:
      detectors.resolve(detector_names(spec), available=detector_inputs(method))
    except ValueError as e:
      raise ValueError(f'eval.detectors={spec!r}: {e} Method {method.name!r} ({method.head} head) gives '
                       f'detectors {sorted(detector_inputs(method))}.') from None


def normalization(config: ml_collections.ConfigDict, info: registry.DatasetInfo):
  """Per-channel (mean, std) on [0, 1]: the dataset's statistics, or 0.5/0.5 ([−1, 1]) if symmetric."""
  channels = info.image_shape[-1]
  if config.get('normalization', 'dataset') == 'symmetric':
    return registry.SYMMETRIC[0][:channels], registry.SYMMETRIC[1][:channels]
  return info.mean, info.std


def make_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Checks `config` and resolves it into an `Experiment` (no data read, nothing compiled)."""
  check_config(config)
  info = registry.get_info(config.dataset)
  method = methods_lib.get_method(config.method)
  model = models_lib.make_classifier(config.backbone, method.head, info.num_classes, dtype=DTYPES[config.dtype],
                                     **config.get('backbone_kwargs', {}))
  base = make_experiment(checkpoint.load_config(config.base_model)) if method.needs_base_model else None
  mean, std = normalization(config, info)
  return Experiment(config=config, info=info, method=method, model=model, mean=tuple(mean), std=tuple(std),
                    base=base)
