"""From a Flax model of your own to the OOD table in one call: `evaluate(model, variables, train=, test=, ood=)`.

  report = ood_jax.evaluation.evaluate(model, variables, train=(x_train, y_train), test=(x_test, y_test),
                                       ood={'near': x_near, 'far': x_far}, validation=(x_val, y_val),
                                       validation_ood={'val': x_val_ood}, groups={'near': ('near',),
                                       'far': ('far',)})
  print(report.markdown())
  report.save('runs/mine')

What it does, in order:
1. extracts logits and penultimate features of every set once, in fixed-size padded batches (one compiled
   forward pass for all sets): a Linen module with its variables or an NNX module through
   `detectors.adapter.feature_extractor` (the final layer at `head` gives the features and, for the
   detectors that need it, W and b), or any function `x -> logits` / `x -> {'logits', 'features'}`;
2. classification metrics of the softmax on the test set (accuracy, NLL, ECE, Brier, AURC, reliability) and,
   with an in-distribution `validation` set, the same after temperature scaling fitted on it
   (`calibration_block`);
3. every detector the outputs allow, fitted on `train`, its hyperparameters chosen on `validation` and
   `validation_ood` only (never on a test set), scored on `test` against each OOD set
   (`detection.evaluate_detectors`, the path the trainer's evaluator takes too);
4. the leaderboard (`leaderboard.benchmark_block`): one row per detector, group means (`groups`), the
   chosen hyperparameters.

Data: `train`, `test` and `validation` are `(images, labels)` pairs of arrays or iterables of such batches
(streamed: nothing but the extracted features is kept); `ood` and `validation_ood` map a set's name to its
images, or to an iterable of image batches. Inputs go to the model as given: preprocess them as it expects.
Needs only the core install; `save` draws figures when matplotlib is installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
import dataclasses
import json
import logging
import os
import time
from typing import Any

from flax import serialization
import flax.linen as nn
from flax import nnx
import jax
import numpy as np

from ood_jax import _extras
from ood_jax import calibration
from ood_jax import metrics
from ood_jax.detectors import adapter
from ood_jax.evaluation import detection
from ood_jax.evaluation import leaderboard
from ood_jax.evaluation import report as report_lib

__all__ = ['Report', 'calibration_block', 'evaluate', 'evaluate_outputs', 'extract', 'extractor', 'load_variables']

_LOG = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Calibration (shared with the trainer's evaluator).


def _softmax64(z: np.ndarray) -> np.ndarray:
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def calibration_block(validation_logits, validation_labels, *, calibrator: str = 'temperature'
                      ) -> tuple[dict[str, Any], Callable[[np.ndarray], np.ndarray]]:
  """(summary, logits → calibrated probabilities) of a calibrator fitted on validation logits.

  'temperature' (Guo et al. 2017) for softmax models, 'platt' (per-class Platt scaling) for one-vs-all
  ones. The calibrated probabilities are computed in float64 on the host: a temperature well below 1
  pushes float32 probabilities to exactly 1.0, and the ties that makes would change rank metrics (AURC)
  that temperature scaling cannot change. When every validation example is classified correctly the
  temperature is not identified (the NLL keeps falling as T → 0, and the bound the fit would stop at
  over-sharpens every later mistake): T = 1 is kept and the summary says so under 'warning'.
  """
  validation_logits = np.asarray(validation_logits)
  if calibrator == 'platt':
    state = calibration.fit_platt(validation_logits, validation_labels)
    slope, intercept = np.asarray(state.slope, np.float64), np.asarray(state.intercept, np.float64)
    sigmoid = lambda x: np.exp(-np.logaddexp(0.0, -x))
    return {'calibrator': 'platt'}, lambda logits: sigmoid(np.asarray(logits, np.float64) * slope + intercept)
  if calibrator != 'temperature':
    raise ValueError(f"calibrator must be 'temperature' or 'platt', got {calibrator!r}.")
  summary: dict[str, Any] = {'calibrator': 'temperature'}
  if np.all(np.argmax(validation_logits, axis=-1) == np.asarray(validation_labels)):
    temperature = 1.0
    summary['warning'] = ('every validation example is classified correctly, so the temperature cannot be '
                          'fitted (the NLL falls as T → 0); T = 1 is kept. Raise --config.validation_fraction '
                          'or calibrate on harder held-out data.')
    _LOG.warning('calibration: %s', summary['warning'])
  else:
    temperature = float(calibration.fit_temperature(validation_logits, validation_labels).temperature)
  summary['temperature'] = temperature
  return summary, lambda logits: _softmax64(np.asarray(logits, np.float64) / temperature)


# ----------------------------------------------------------------------------------------------
# Feature extraction.


def _model_fn(model, variables, *, head, features, apply_kwargs) -> tuple[Callable, tuple | None]:
  """(x → {'logits', 'features'}, the final layer's (kernel, bias) or None)."""
  if isinstance(model, (nn.Module, nnx.Module)):
    kwargs = dict(apply_kwargs or {})
    call = kwargs.pop('call', None)
    fn = adapter.feature_extractor(model, variables, head=head, features=features, call=call, **kwargs)
    weights = adapter.head_weights(model if isinstance(model, nnx.Module) else variables, head)
    return fn, tuple(np.asarray(w) for w in weights)
  if not callable(model):
    raise TypeError(f'model must be a flax.linen Module (with variables), a flax.nnx Module or a function '
                    f'x -> logits, got {type(model).__name__}.')
  if variables is not None:
    raise ValueError('a function model takes no variables: close over them (lambda x: apply(variables, x)).')
  jitted = jax.jit(model)

  def fn(x):
    out = jitted(x)
    if isinstance(out, Mapping):
      unknown = sorted(set(out) - {'logits', 'features'})
      if unknown or not out:
        raise ValueError(f"a function model returns logits or a dict with 'logits' and/or 'features'; got keys "
                         f'{sorted(out)}.')
      return dict(out)
    return {'logits': out}

  weights = None
  if isinstance(head, tuple) and len(head) == 2:  # (kernel [D, K], bias [K]) given directly
    weights = tuple(np.asarray(w) for w in head)
  return fn, weights


def extractor(model, variables=None, *, head='head', features=None, apply_kwargs: Mapping[str, Any] | None = None
              ) -> tuple[Callable, tuple | None]:
  """(x → {'logits', 'features'}, the final layer's (kernel, bias) or None): the forward pass `evaluate` runs.

  For callers that feed batches themselves (the trainer's streamed ImageNet evaluation); the arguments are
  `evaluate`'s.
  """
  return _model_fn(model, variables, head=head, features=features, apply_kwargs=apply_kwargs)


def load_variables(path: str | os.PathLike, *, target=None):
  """A model's variables from a checkpoint: a Flax msgpack file or an orbax checkpoint folder.

  Args:
    path: a file written by `flax.serialization.to_bytes` / `msgpack_serialize` (any name; '.msgpack' by
      custom), or a folder written by orbax (`ocp.StandardCheckpointer().save(path, variables)`; a folder
      holding a 'default' item, as `CheckpointManager` writes one, works too).
    target: optional pytree of the expected structure (e.g. `model.init(...)`), which the restored values
      must match; None returns the stored nested dicts of arrays, which `module.apply` accepts as they are.

  Returns:
    The variables ({'params': ..., 'batch_stats': ...}) as host arrays.

  Raises:
    FileNotFoundError: nothing at `path`. ValueError: a file that is not a msgpack checkpoint.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path):
    # orbax is the 'train' extra; the core imports it only here, when asked to read an orbax folder.
    ocp = _extras.import_optional('orbax.checkpoint', needed_by='Reading an orbax checkpoint')
    folder = os.path.join(path, 'default') if os.path.isdir(os.path.join(path, 'default')) else path
    checkpointer = ocp.StandardCheckpointer()
    if target is None:
      restored = checkpointer.restore(folder)
    else:
      restored = checkpointer.restore(folder, jax.tree.map(np.asarray, target))
    return jax.tree.map(np.asarray, restored)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No checkpoint at {path!r}: pass a Flax msgpack file or an orbax checkpoint folder.')
  with open(path, 'rb') as f:
    data = f.read()
  try:
    state = serialization.msgpack_restore(data)
  except Exception as err:  # msgpack raises its own exception types for a file that is not msgpack
    raise ValueError(f'{path!r} is not a Flax msgpack checkpoint ({type(err).__name__}: {err}); an orbax '
                     'checkpoint is a folder.') from err
  if target is not None:
    state = serialization.from_state_dict(target, state)
  return jax.tree.map(np.asarray, state)


def _batches(data, what: str, *, labelled: bool) -> Iterable[tuple[np.ndarray, np.ndarray | None]]:
  """`data` as an iterable of (images, labels or None) batches."""
  if data is None:
    raise ValueError(f'{what} is required.')
  if labelled:
    if isinstance(data, tuple) and len(data) == 2 and all(hasattr(d, 'shape') for d in data):
      return [(np.asarray(data[0]), np.asarray(data[1]))]
    if hasattr(data, 'shape'):
      raise TypeError(f'{what} must be an (images, labels) pair or an iterable of such batches, got one array '
                      f'of shape {tuple(data.shape)}.')
    return ((np.asarray(x), np.asarray(y)) for x, y in data)
  if hasattr(data, 'shape'):
    return [(np.asarray(data), None)]
  if isinstance(data, tuple) and len(data) == 2 and all(hasattr(d, 'shape') for d in data):
    raise TypeError(f'{what} must be images (an array or an iterable of image batches), not an (images, labels) '
                    f'pair: OOD sets carry no labels.')
  return ((np.asarray(x), None) for x in data)


def extract(fn: Callable, data, *, what: str = 'data', labelled: bool = False, batch_size: int = 256
            ) -> dict[str, np.ndarray]:
  """Runs `fn` (x → logits, or x → {'logits', 'features'}) over `data` in chunks of `batch_size` rows, padded.

  Every call has the same shape, so `fn` (a jitted extractor) compiles once for all sets of one image shape.

  Returns:
    {'logits', 'features' (those `fn` gives), 'labels' (when labelled)} as host arrays, in data order.
  """
  out: dict[str, list] = {}
  labels = []
  count = 0
  for images, batch_labels in _batches(data, what, labelled=labelled):
    if images.ndim < 2:
      raise ValueError(f'{what}: a batch of images must have a batch axis, got shape {images.shape}.')
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      n = len(chunk)
      if n < batch_size:  # padded with copies of the first row, sliced off again
        chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, axis=0)])
      result = fn(chunk)
      result = result if isinstance(result, Mapping) else {'logits': result}
      for key, value in result.items():
        if key in ('logits', 'features'):
          out.setdefault(key, []).append(np.asarray(value)[:n])
      count += n
    if labelled:
      if batch_labels is None or len(batch_labels) != len(images):
        raise ValueError(f'{what}: every batch needs one label per image.')
      labels.append(np.asarray(batch_labels))
  if not count:
    raise ValueError(f'{what} holds no examples.')
  arrays = {key: np.concatenate(values) for key, values in out.items()}
  if labelled:
    y = np.concatenate(labels)
    if not np.issubdtype(y.dtype, np.integer):
      raise TypeError(f'{what}: labels must be integers, got dtype {y.dtype}.')
    arrays['labels'] = y.astype(np.int32)
  return arrays


# ----------------------------------------------------------------------------------------------
# The report.


@dataclasses.dataclass(frozen=True)
class Report:
  """What `evaluate` found.

  Attributes:
    results: the results dict, as results.json holds it: 'in_distribution' (and 'calibration'),
      'detectors' ({'ood': {set: {detector: metrics}}, 'ood_mean', 'tuning', 'errors'}), 'benchmark' (the
      leaderboard rows).
  """

  results: dict[str, Any]

  def markdown(self) -> str:
    """The leaderboard (one row per detector, group means, chosen hyperparameters) and the test-set metrics."""
    r = self.results
    lines = [f"# {r['model']} · OOD detection", '']
    in_dist = r.get('in_distribution')
    if in_dist:
      lines += ['| probabilities | accuracy | NLL | ECE | Brier | AURC | test examples |',
                '|---|---:|---:|---:|---:|---:|---:|',
                report_lib.calibration_row('softmax', in_dist, str(in_dist['num_examples']))]
      if 'calibrated' in in_dist:
        lines.append(report_lib.calibration_row(f"+ temperature (T = {r['calibration']['temperature']:.3f})",
                                                in_dist['calibrated'],
                                                f"fitted on {r['calibration']['validation_examples']} validation"))
      lines.append('')
    if r.get('benchmark'):
      lines.append(leaderboard.markdown(r['benchmark']))
    block = r.get('detectors', {})
    if block.get('ood_mean'):
      lines += ['Mean over the OOD sets, %: AUROC, AUPR-In (ID positive), AUPR-Out (OOD positive), FPR@95 with ID '
                'positive (ID+) and with OOD positive (OOD+, as OpenOOD v1.5).', '',
                '| detector | AUROC | AUPR-In | AUPR-Out | FPR@95 (ID+) | FPR@95 (OOD+) |',
                '|---|---:|---:|---:|---:|---:|']
      for name, v in block['ood_mean'].items():
        lines.append(f"| {name} | {100 * v['auroc']:.2f} | {100 * v['aupr_in']:.2f} | {100 * v['aupr_out']:.2f} | "
                     f"{100 * v['fpr95_id_positive']:.2f} | {100 * v['fpr95_ood_positive']:.2f} |")
      lines.append('')
    for name, message in block.get('errors', {}).items():
      lines.append(f'- {name} failed on this model: {message}')
    return '\n'.join(lines).rstrip() + '\n'

  def save(self, directory: str | os.PathLike) -> None:
    """Writes results.json, results.md (this report's `markdown`) and the figures it links into `directory`."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, report_lib.RESULTS_JSON), 'w', encoding='utf-8') as f:
      json.dump(self.results, f, indent=2)
    text = self.markdown() + '\n' + report_lib.figures_section(*report_lib.write_figures(self.results, directory))
    with open(os.path.join(directory, report_lib.RESULTS_MD), 'w', encoding='utf-8') as f:
      f.write(text)


# ----------------------------------------------------------------------------------------------
# The call.


def _tuning_sets(validation_ood, ood) -> dict:
  """`validation_ood` as a dict; ValueError if a tuning set is also a test set."""
  validation_ood = dict(validation_ood or {})
  leaked = sorted(set(validation_ood) & set(ood))
  if leaked:
    raise ValueError(f'validation_ood sets {leaked} are also test sets: tuning on a test set overstates every '
                     'number measured on it.')
  return validation_ood


def evaluate(model, variables=None, *, train, test, ood: Mapping[str, Any], validation=None,
             validation_ood: Mapping[str, Any] | None = None, groups: Mapping[str, Iterable[str]] | None = None,
             detectors='all', detector_kwargs: Mapping[str, Mapping[str, Any]] | None = None, head='head',
             features=None, batch_size: int = 256, apply_kwargs: Mapping[str, Any] | None = None,
             name: str | None = None) -> Report:
  """The OOD table of a model: every detector fitted on `train`, tuned on validation OOD only, scored on `test`.

  Args:
    model: a `flax.linen.Module` (pass its `variables`), a `flax.nnx.Module` (`variables=None`; evaluated
      as it is: call `model.eval()` first if it has dropout or batch norm), or a function
      `x -> logits` / `x -> {'logits': ..., 'features': ...}` (detectors then get what it returns).
    variables: the Linen variables (params, batch_stats, ...).
    train: `(images, labels)` or an iterable of such batches: the detectors' fitting data.
    test: `(images, labels)` (or batches): the in-distribution test set.
    ood: OOD test set name → images (or an iterable of image batches).
    validation: optional in-distribution `(images, labels)`: temperature scaling is fitted on it and, with
      `validation_ood`, detector hyperparameters are chosen on the two (never on a test set).
    validation_ood: optional OOD set name → images, for tuning only; must not share names with `ood`.
    groups: group name → OOD set names, for the leaderboard's group means (e.g. near / far); default one
      group 'ood' of every set.
    detectors: 'all' (every detector the outputs allow: logits, features, and the final layer W, b) or names.
    detector_kwargs: detector → {hyperparameter: value}, pinned (used as given, not tuned).
    head: path of the final `nn.Dense` / `nnx.Linear` layer whose input is the feature vector
      ('/'-separated); for a function model, optionally its (kernel [D, K], bias [K]).
    features: optional path of a submodule whose output is the feature vector instead.
    batch_size: rows per forward pass (the last batch of each set is padded to it).
    apply_kwargs: Linen: keyword arguments of `module.apply` (e.g. {'train': False}); NNX: {'call': fn}
      with `fn(model, x)` running the forward pass.
    name: the model's name in the tables (default: its class name).

  Returns:
    A `Report`: `.results`, `.markdown()`, `.save(directory)`.
  """
  if not isinstance(ood, Mapping) or not ood:
    raise ValueError('ood must map at least one OOD set name to its images.')
  validation_ood = _tuning_sets(validation_ood, ood)
  groups = {g: tuple(sets) for g, sets in (groups or {'ood': tuple(ood)}).items()}
  unknown = sorted({s for sets in groups.values() for s in sets} - set(ood))
  if unknown:
    raise ValueError(f'groups name sets that are not in ood: {unknown}; ood sets: {sorted(ood)}.')
  fn, head_weights = _model_fn(model, variables, head=head, features=features, apply_kwargs=apply_kwargs)
  began = time.perf_counter()

  def outputs(data, what, labelled):
    start = time.perf_counter()
    out = extract(fn, data, what=what, labelled=labelled, batch_size=batch_size)
    _LOG.info('evaluate: %s, %d examples in %.1f s', what, len(next(iter(out.values()))), time.perf_counter() - start)
    return out

  train_out = outputs(train, 'train', True)
  test_out = outputs(test, 'test', True)
  validation_out = None if validation is None else outputs(validation, 'validation', True)
  ood_out = {set_name: outputs(images, f'ood[{set_name!r}]', False) for set_name, images in ood.items()}
  validation_ood_out = {set_name: outputs(images, f'validation_ood[{set_name!r}]', False)
                        for set_name, images in validation_ood.items()}
  model_name = name or (type(model).__name__ if isinstance(model, (nn.Module, nnx.Module))
                        else getattr(model, '__name__', 'model'))
  report = evaluate_outputs(train=train_out, test=test_out, ood=ood_out, validation=validation_out,
                            validation_ood=validation_ood_out, groups=groups, detectors=detectors,
                            detector_kwargs=detector_kwargs, head=head_weights, name=model_name)
  _LOG.info('evaluate: done in %.1f s', time.perf_counter() - began)
  return report


def evaluate_outputs(*, train, test, ood: Mapping[str, Any], validation: Mapping[str, np.ndarray] | None = None,
                     validation_ood: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                     groups: Mapping[str, Iterable[str]] | None = None, detectors='all',
                     detector_kwargs: Mapping[str, Mapping[str, Any]] | None = None, head=None,
                     name: str = 'model', protocol: str = '') -> Report:
  """The report of `evaluate` from outputs extracted already: what `evaluate` runs after its forward passes.

  Args:
    train: {'logits' and/or 'features', 'labels'} host arrays, or a streamed set
      (`detection.streamed`: e.g. the chunks on disk of an ImageNet-scale set, which every detector fit
      then reads block by block instead of holding).
    test: the in-distribution test outputs, likewise (a streamed test set is read for its logits and
      labels, N × K floats, for the classification metrics).
    ood: OOD test set name → its outputs ({'logits'/'features'}), or a streamed set.
    validation: in-distribution validation outputs with 'labels', in memory (calibration and tuning).
    validation_ood: validation OOD set name → outputs, in memory; must not share names with `ood`.
    groups, detectors, detector_kwargs, name: as for `evaluate`.
    head: the final layer's (kernel [D, K], bias [K]) or None.
    protocol: the protocol's name in the leaderboard ('' for none).

  Returns:
    A `Report`.
  """
  validation_ood = _tuning_sets(validation_ood, ood)
  groups = {g: tuple(sets) for g, sets in (groups or {'ood': tuple(ood)}).items()}
  present = tuple(test.keys) if detection.streamed(test) else tuple(test)
  if 'features' not in present and 'logits' not in present:
    raise ValueError('the model gave neither logits nor features.')
  # What the classification metrics need in memory: the test logits and labels (N × K, not the features).
  test_in_memory = (test.load([k for k in ('logits', 'labels') if k in present]) if detection.streamed(test)
                    else test)
  if 'logits' in present:
    num_classes = test_in_memory['logits'].shape[-1]
  else:
    train_labels = train.load(['labels'])['labels'] if detection.streamed(train) else train['labels']
    num_classes = int(max(train_labels.max(), test_in_memory['labels'].max())) + 1

  results: dict[str, Any] = {'model': name, 'num_classes': num_classes}
  if 'logits' in present:
    test_logits, test_labels = test_in_memory['logits'], test_in_memory['labels']
    in_dist = {'num_examples': len(test_labels),
               **metrics.classification_metrics(_softmax64(np.asarray(test_logits, np.float64)), test_labels)}
    if validation is not None and 'logits' in validation:
      summary, calibrate = calibration_block(validation['logits'], validation['labels'])
      results['calibration'] = {**summary, 'validation_examples': len(validation['labels'])}
      in_dist['calibrated'] = metrics.classification_metrics(calibrate(test_logits), test_labels)
    results['in_distribution'] = in_dist
  results['detectors'] = detection.evaluate_detectors(
      detectors, train=train, test=test, ood=dict(ood), num_classes=num_classes, head=head,
      validation=None if validation is None else dict(validation), validation_ood=validation_ood or None,
      pinned={k: dict(v) for k, v in (detector_kwargs or {}).items()} or None)
  results['benchmark'] = leaderboard.benchmark_block(results, protocol=protocol, groups=groups,
                                                     validation=tuple(validation_ood))
  return Report(results)
