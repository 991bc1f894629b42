"""What a config describes, checked before any data is read and read once: the `Experiment` record.

`check_config` resolves every name a config holds (dataset, backbone, method, optimiser, schedule,
dtype, method hyperparameters, OOD sets, corruptions, detectors and their hyperparameters,
fine-tuning and base-model settings, batch sizes) and fails with the list of valid values, so a typo
costs a second instead of a training run; it returns the typed `Settings` it read. `make_experiment`
then builds the record the trainer and evaluator share: the settings, the dataset's registry entry,
the method, the model, the input normalisation and, for SMOT, the frozen base model. The loop and the
evaluator read the record, never a field with a default of their own: every default lives in one place,
`configs/common.py`.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
import dataclasses
import difflib
import os
from types import MappingProxyType
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
from ood_jax.trainer.data import digits as digits_data
from ood_jax.trainer.data import ood_sets
from ood_jax.trainer.data import protocols
from ood_jax.trainer.data import registry
from ood_jax.trainer.data import sources

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
    settings: the config's fields, checked and typed (`Settings`): what the loop and the evaluator read.
    base: for methods with a frozen base model (SMOT), the base run's `Experiment`; else None.
  """

  config: ml_collections.ConfigDict
  info: registry.DatasetInfo
  method: methods_lib.Method
  model: Any
  mean: tuple[float, ...]
  std: tuple[float, ...]
  settings: Settings
  base: Experiment | None = None


def closest(value, valid) -> list[str]:
  """The names of `valid` that `value` is most likely a typo of, best first (difflib's ratio >= 0.6); maybe none."""
  return difflib.get_close_matches(str(value), [str(name) for name in valid], n=3, cutoff=0.6)


def choice(kind: str, value: str, valid) -> str:
  """`value` if it is in `valid`, else ValueError offering the closest name, listing the valid ones closest first."""
  if value not in valid:
    close = closest(value, valid)
    hint = f'did you mean {close[0]!r}? ' if close else ''
    listed = close + sorted(str(name) for name in valid if str(name) not in close)
    raise ValueError(f'Unknown {kind} {value!r}; {hint}valid values: {", ".join(listed)}.')
  return value


def check_config(config: ml_collections.ConfigDict) -> Settings:
  """Fails fast, with the list of valid values, on anything a run would otherwise fail on later.

  Reads no data; for a method with a base model it reads the base run's config.json.

  Returns:
    The checked `Settings` (what `make_experiment` keeps).
  """
  # The registries' own errors list the names; `choice` also offers the closest one.
  registry.get_info(choice('dataset', config.dataset, registry.DATASETS))
  method = methods_lib.get_method(choice('method', config.method, methods_lib.METHODS))
  choice('backbone', config.backbone, models_lib.BACKBONES)
  choice('optimizer', config.optimizer.name, optim.OPTIMIZERS)
  choice('schedule', config.optimizer.schedule, optim.SCHEDULES)
  choice('dtype', config.dtype, DTYPES)
  choice('normalization', config.normalization, NORMALIZATIONS)
  unknown = set(config.method_kwargs) - set(method.hparams)
  if unknown:
    raise ValueError(f'Unknown method_kwargs {sorted(unknown)} for method {method.name!r}; '
                     f'valid: {sorted(method.hparams) or "none"}.')
  if method.needs_outliers and not config.outliers.source:
    raise ValueError(f'Method {method.name!r} trains with auxiliary outliers: set config.outliers.source '
                     f'(a TFDS name, a .npy file of uint8 images, or {catalog.DIGITS_OUTLIERS!r}).')
  if method.augment and config.augment != method.augment:
    raise ValueError(f'Method {method.name!r} needs config.augment={method.augment!r}, got {config.augment!r}.')
  _check_required(config)
  _check_init_from(config, method)
  _check_base_model(config, method)
  _warn_method_recipe(config, method)
  evaluation = _check_eval(config.eval, method, config.dataset)
  catalog.check_validation_fraction(config.validation_fraction)
  _check_fault_tolerance(config)
  if config.batch_size % jax.device_count():
    raise ValueError(f'batch_size ({config.batch_size}) must be divisible by the number of devices '
                     f'({jax.device_count()}).')
  return _settings(config, method, evaluation)


def _check_fault_tolerance(config) -> None:
  minutes = config.checkpoint_every_minutes
  if isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes >= 0:
    raise ValueError(f'checkpoint_every_minutes must be a number >= 0 (0: no time-based checkpoints), got '
                     f'{minutes!r}.')
  for name in ('allow_config_change', 'xla_cpu_defaults'):
    if not isinstance(config[name], bool):
      raise ValueError(f'{name} must be True or False, got {config[name]!r}.')
  if config.peak_tflops is not None:
    throughput.check_peak_tflops(config.peak_tflops)


# What to say when a recipe's `required_fields` entry is unset.
_REQUIRED_HINTS = {
    'init_from': ('This config fine-tunes a pretrained model: set --config.init_from=<workdir or checkpoint of a '
                  'run with the same dataset and backbone> (e.g. the softmax run of the same config file).'),
}


def _check_required(config) -> None:
  for name in config.required_fields:
    if name not in config:
      raise ValueError(f'required_fields names {name!r}, which is not a config field.')
    if config[name] in (None, '', ()):
      raise ValueError(_REQUIRED_HINTS.get(name, f'This config needs --config.{name}.'))


def _check_init_from(config, method) -> None:
  init_from = config.init_from
  policy = choice('init_head policy', config.init_head, HEAD_POLICIES)
  if policy == 'class_stats' and (method.head != 'mahalanobis' or not init_from):
    raise ValueError("init_head='class_stats' sets a Mahalanobis head (method ice) from the features of a "
                     f'pretrained backbone: it needs config.init_from; got method {method.name!r} '
                     f'({method.head} head), init_from={init_from!r}.')


def _check_base_model(config, method) -> None:
  if not method.needs_base_model:
    return
  if not config.base_model:
    raise ValueError(f'Method {method.name!r} needs a pretrained base model: set config.base_model to the '
                     'workdir of a softmax run of the same architecture and dataset.')
  base_method = methods_lib.get_method(checkpoint.load_config(config.base_model).method)
  if base_method.head != 'dense':
    raise ValueError(f'config.base_model must be a run with a dense head (e.g. softmax) for class activation '
                     f'maps; {config.base_model} used {base_method.name!r} ({base_method.head} head).')


def _warn_method_recipe(config, method) -> None:
  """Warnings for recipes that run but are known to train badly (the losses' docstrings explain)."""
  kwargs = config.method_kwargs
  if method.name == 'energy' and not config.init_from and not ({'margin_in', 'margin_out'} & set(kwargs)):
    warnings.warn(
        "Method 'energy' is training from scratch with the default margins (m_in, m_out) = (-25, -7), which "
        'assume a pretrained network: its energy term can swamp the cross-entropy and leave a fresh model at '
        'chance. Fine-tune with --config.init_from=<workdir of a softmax run>, or set the margins as one dict, '
        "--config.method_kwargs=\"{'margin_in': ..., 'margin_out': ...}\" (a key the config file did not set "
        'cannot be added one at a time; ood_jax.losses.energy_in_margin shows how to pick them).',
        UserWarning, stacklevel=3)
  optimizer = config.optimizer
  if method.name == 'ice' and not optimizer.grad_clip_norm and optimizer.learning_rate != 0:
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
  name = (eval_config.benchmark or '').strip()
  groups, validation = {}, ()
  if name:
    protocol = protocols.get(choice('benchmark protocol', name, protocols.names()), dataset)
    groups, validation = dict(protocol.groups), protocol.validation
  listed = {s for sets in groups.values() for s in sets}
  other = tuple(dict.fromkeys(s for s in eval_config.ood_sets if s not in listed))
  if other:
    groups['other'] = other
  validation = tuple(dict.fromkeys(validation + tuple(eval_config.validation_ood_sets)))
  test_sets = tuple(s for sets in groups.values() for s in sets)
  for set_name in test_sets + validation:
    _check_ood_set(set_name)
  leaked = sorted(set(validation) & set(test_sets))
  if leaked:
    raise ValueError(f'eval.validation_ood_sets {leaked} are also test sets: hyperparameters tuned on a test '
                     'set overstate every number measured on it. Pick validation sets disjoint from the test sets.')
  return EvaluationSets(name, groups, test_sets, validation)


def _check_ood_set(name: str) -> None:
  try:
    catalog.check_ood_set(name)
  except ValueError as e:
    # Only the named sets can be suggested; folder:, imglist: and openood: names are paths.
    named = [s for s in ood_sets.OOD_SETS if '<' not in s] + [catalog.DIGITS_PREFIX + s for s in digits_data.OOD_SETS]
    close = closest(name, named)
    raise ValueError(f'{e} Did you mean {close[0]!r}?' if close else str(e)) from None


def detector_kwargs(text: str) -> dict[str, dict[str, Any]]:
  """`config.eval.detector_kwargs` ('react.percentile=95,knn.k=100') as {detector: {hyperparameter: value}}.

  Values are Python literals (numbers, strings in quotes, True/False/None, tuples); a bare word is a string.
  """
  out: dict[str, dict[str, Any]] = {}
  for item in (text or '').split(','):
    item = item.strip()
    if not item:
      continue
    key, sep, value = item.partition('=')
    name, dot, hparam = key.strip().partition('.')
    if not (sep and dot and name and hparam.strip()):
      raise ValueError(f"eval.detector_kwargs: {item!r} is not 'detector.hyperparameter=value' "
                       "(e.g. 'react.percentile=95,knn.k=100').")
    try:
      parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      parsed = value.strip()
    out.setdefault(name.strip(), {})[hparam.strip()] = parsed
  return out


def _check_eval(eval_config, method, dataset: str) -> EvalSettings:
  sets = evaluation_sets(eval_config, dataset)
  if eval_config.batch_size % jax.device_count():
    raise ValueError(f'eval.batch_size ({eval_config.batch_size}) must be divisible by the number of devices '
                     f'({jax.device_count()}).')
  for severity in eval_config.severities:  # checked even without corruptions: a typo must not wait for one
    corruptions.check_corruption(corruptions.CORRUPTIONS[0], severity)
  for corruption in eval_config.corruptions:
    choice('corruption', corruption, corruptions.CORRUPTIONS)
  spec = (eval_config.detectors or '').strip()
  pinned = detector_kwargs(eval_config.detector_kwargs)
  chosen = ()
  try:
    if spec:
      chosen = detectors.resolve(detector_names(spec), available=detector_inputs(method), hparams=pinned)
    else:
      detectors.resolve(tuple(pinned), hparams=pinned)  # names and hyperparameters checked all the same
  except ValueError as e:
    named = () if detector_names(spec) == 'all' else detector_names(spec)
    unknown = [name for name in (*named, *pinned) if name not in detectors.names()]
    close = closest(unknown[0], detectors.names()) if unknown else []
    hint = f'Did you mean {close[0]!r}? ' if close else ''
    raise ValueError(f'eval.detectors={spec!r}, eval.detector_kwargs={eval_config.detector_kwargs!r}: {e} {hint}'
                     f'Method {method.name!r} ({method.head} head) gives detectors '
                     f'{sorted(detector_inputs(method))}.') from None
  return EvalSettings(sets=sets, detectors=chosen, batch_size=eval_config.batch_size, knn_k=eval_config.knn_k,
                      corruptions=tuple(eval_config.corruptions), severities=tuple(eval_config.severities),
                      feature_cache=bool(eval_config.feature_cache))


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """`config.eval`, checked.

  Attributes:
    sets: the OOD test and validation sets (`EvaluationSets`).
    detectors: the post-hoc detectors to fit and report, hyperparameters of `eval.detector_kwargs` pinned.
    batch_size: global evaluation batch size.
    knn_k: the KNN neighbour of contrastive models' own score.
    corruptions: corruption names evaluated at each of `severities`.
    severities: corruption severities.
    feature_cache: cache each set's outputs under the workdir.
  """

  sets: EvaluationSets
  detectors: tuple
  batch_size: int
  knn_k: int
  corruptions: tuple
  severities: tuple
  feature_cache: bool


@dataclasses.dataclass(frozen=True)
class OutlierSettings:
  """`config.outliers` for methods trained with auxiliary outliers (OE, Energy, ICE)."""

  source: str
  batch_size: int
  augment: str  # the run's augmentation unless the config sets one for outliers
  split: str
  max_examples: int | None


@dataclasses.dataclass(frozen=True)
class ProcessSettings:
  """The fields `train.prepare` applies to the process before JAX starts its backend (`process_settings`)."""

  deterministic: bool  # GPU: XLA_FLAGS for deterministic kernels (ood_jax.trainer.xla_options.set_deterministic)
  compilation_cache_dir: str | None  # JAX's persistent compilation cache


def process_settings(config: ml_collections.ConfigDict) -> ProcessSettings:
  """`config.deterministic` and `config.compilation_cache_dir`, checked without starting JAX's backend."""
  if not isinstance(config.deterministic, bool):
    raise ValueError(f'deterministic must be True or False, got {config.deterministic!r}.')
  cache = config.compilation_cache_dir
  if cache is not None and not isinstance(cache, str):
    raise ValueError(f'compilation_cache_dir must be a folder (a string) or None, got {cache!r}.')
  return ProcessSettings(deterministic=config.deterministic, compilation_cache_dir=cache or None)


def profile_steps(text: str) -> tuple[int, ...]:
  """`config.profile_steps` ('10,11', '10-12', '') as sorted step numbers (the training log's: the first is 1)."""
  if not isinstance(text, str):
    raise ValueError(f"profile_steps must be a string such as '10,11' or '10-12', got {text!r}.")
  steps = set()
  for part in filter(None, (p.strip() for p in text.split(','))):
    first, _, last = part.partition('-')
    try:
      first, last = int(first), int(last or first)
    except ValueError:
      raise ValueError(f"profile_steps={text!r}: {part!r} is neither a step nor a range 'a-b'.") from None
    if not 1 <= first <= last:
      raise ValueError(f'profile_steps={text!r}: steps count from 1 and a range a-b needs a <= b, got {part!r}.')
    steps.update(range(first, last + 1))
  return tuple(sorted(steps))


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every config field the loop and the evaluator read, checked and typed (defaults: configs/common.py)."""

  seed: int
  batch_size: int
  num_epochs: int
  num_steps: int  # > 0 overrides num_epochs
  augment: str
  dtype: str
  data_dir: str | None
  download: bool
  benchmark_dir: str | None
  validation_fraction: float
  method_hparams: Mapping[str, Any]  # the method's defaults with config.method_kwargs applied
  backbone_kwargs: Mapping[str, Any]
  init_from: str | None
  init_head: str
  base_model: str | None
  outliers: OutlierSettings | None
  log_every_steps: int
  checkpoint_every_steps: int
  checkpoint_every_minutes: float
  keep_checkpoints: int
  xla_cpu_defaults: bool
  peak_tflops: float | None
  num_devices: int
  process: ProcessSettings
  profile_steps: tuple[int, ...]  # traced into <workdir>/profile
  eval: EvalSettings


def _settings(config, method, evaluation: EvalSettings) -> Settings:
  outliers = None
  if method.needs_outliers:
    cfg = config.outliers
    outliers = OutlierSettings(source=cfg.source, batch_size=cfg.batch_size, augment=cfg.augment or config.augment,
                               split=cfg.split, max_examples=cfg.max_examples)
  return Settings(
      seed=config.seed, batch_size=config.batch_size, num_epochs=config.num_epochs, num_steps=config.num_steps,
      augment=config.augment, dtype=config.dtype, data_dir=config.data_dir, download=bool(config.download),
      benchmark_dir=config.benchmark_dir, validation_fraction=float(config.validation_fraction),
      method_hparams=MappingProxyType({**method.hparams, **config.method_kwargs.to_dict()}),
      backbone_kwargs=MappingProxyType(config.backbone_kwargs.to_dict()), init_from=config.init_from or None,
      init_head=config.init_head, base_model=config.base_model or None, outliers=outliers,
      log_every_steps=config.log_every_steps, checkpoint_every_steps=config.checkpoint_every_steps,
      checkpoint_every_minutes=float(config.checkpoint_every_minutes), keep_checkpoints=config.keep_checkpoints,
      xla_cpu_defaults=config.xla_cpu_defaults, peak_tflops=config.peak_tflops, num_devices=config.num_devices,
      process=process_settings(config), profile_steps=profile_steps(config.profile_steps), eval=evaluation)


def normalization(config: ml_collections.ConfigDict, info: registry.DatasetInfo):
  """Per-channel (mean, std) on [0, 1]: the dataset's statistics, or 0.5/0.5 ([−1, 1]) if symmetric."""
  channels = info.image_shape[-1]
  if config.normalization == 'symmetric':
    return registry.SYMMETRIC[0][:channels], registry.SYMMETRIC[1][:channels]
  return info.mean, info.std


def check_data(exp: Experiment, *, training: bool = True) -> None:
  """Every data set the run reads is there, or one DatasetNotFoundError listing all that are missing.

  Covers the training and test splits (and so the validation split held out of training), every OOD test and
  validation-OOD set of the config and its protocol, the corrupted sets, the auxiliary outliers, the
  pretrained checkpoint of `init_from` and the SMOT base run. Reads no images: `train.prepare` calls it
  before anything is trained or written to the workdir.

  Args:
    exp: the checked experiment.
    training: False for an evaluation of a trained run (the training split is still read by the detectors'
      fits and the calibrator, but outliers and the pretrained checkpoint are not).
  """
  s = exp.settings
  problems = []
  if training and s.init_from and not os.path.exists(s.init_from):
    problems.append(f'init_from {s.init_from!r} does not exist (a workdir or a checkpoint folder of a run).')
  if exp.base is not None and checkpoint.latest_step(os.path.join(s.base_model, checkpoint.CHECKPOINTS)) is None:
    problems.append(f'base_model {s.base_model!r} holds no checkpoint: train it first (its config.json names '
                    f'the command).')
  outliers = (s.outliers.source, s.outliers.split) if training and s.outliers is not None else None
  try:
    catalog.check_available(
        exp.info, splits=(exp.info.train_split, exp.info.test_split),
        ood_names=s.eval.sets.test_sets + s.eval.sets.validation,
        corrupted=[(c, severity) for c in s.eval.corruptions for severity in s.eval.severities],
        outliers=outliers, data_dir=s.data_dir, benchmark_dir=s.benchmark_dir, download=s.download)
  except sources.DatasetNotFoundError as err:
    problems += str(err).split('\n- ')[1:]
  if problems:
    raise sources.DatasetNotFoundError(
        f'{len(problems)} input(s) of this run are missing; nothing was trained or written:\n- '
        + '\n- '.join(problems))


def make_experiment(config: ml_collections.ConfigDict) -> Experiment:
  """Checks `config` and resolves it into an `Experiment` (no data read, nothing compiled)."""
  settings = check_config(config)
  info = registry.get_info(config.dataset)
  method = methods_lib.get_method(config.method)
  head_kwargs = {name: settings.method_hparams[name] for name in method.head_hparams}
  model = models_lib.make_classifier(config.backbone, method.head, info.num_classes, dtype=DTYPES[config.dtype],
                                     head_kwargs=head_kwargs, **settings.backbone_kwargs)
  base = make_experiment(checkpoint.load_config(config.base_model)) if method.needs_base_model else None
  mean, std = normalization(config, info)
  return Experiment(config=config, info=info, method=method, model=model, mean=tuple(mean), std=tuple(std),
                    settings=settings, base=base)
