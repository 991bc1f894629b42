"""Checkpoints and saved configs: the orbax manager of a run, one restore function, config.json.

A checkpoint holds the whole `TrainState`. `restore` reads one from any of the three paths people
pass around (a workdir, its 'checkpoints' folder, or one step folder inside it) and places every
array on the current devices: restoring without a target would re-create the saving run's
shardings, which fails as soon as the devices differ (trained on 8 accelerators, evaluated or
fine-tuned on 1, or on a CPU).

Faults (docs/fault_tolerance.md). Orbax writes a step into a temporary folder and renames it into
place when complete, so a kill during a save leaves the previous steps as they were. What the
rename cannot prevent is handled here:

* `resume` restores the newest step that restores, and falls back past a damaged one (a truncated
  file, a missing item, a state of another structure) only when the older step was written under
  the same config, shown by the config fingerprint every checkpoint carries: an older step of a
  different config would silently resume another run. Damaged steps are moved to
  <workdir>/checkpoints.corrupt/, never deleted, so they can be inspected, and so that orbax, which
  never saves a step at or below its latest one and rotates out the oldest, cannot skip the new
  saves or rotate out the good step.
* `check_config_unchanged` refuses a config that changed under an existing checkpoint (naming the
  fields) unless `config.allow_config_change` is set; `RESUME_IGNORED_FIELDS` lists what may change.
* `Writer` turns a failed write (disk full, quota, I/O error), which orbax reports asynchronously,
  into one `CheckpointWriteError` naming the step, the folder and the steps that are still intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ood_jax.trainer import defaults

CHECKPOINTS = 'checkpoints'  # the folder under a workdir
CONFIG = 'config.json'
CORRUPT = 'checkpoints.corrupt'  # damaged steps moved out of the way by `resume`, next to CHECKPOINTS
FINGERPRINT = 'ood_jax_config_fingerprint'  # key of each checkpoint's custom metadata

# Config fields that may change between a run and its resumption: they change how a run is logged,
# checkpointed, evaluated, laid out on devices or where its data is read from, but neither the
# structure of the saved state nor the sequence of steps it takes (num_devices changes the
# reduction order of the gradient, a float rounding, and resuming a preempted 8-accelerator job on 4
# is legitimate). Every other field counts: dataset, backbone(_kwargs), method(_kwargs), dtype, seed,
# batch_size, num_epochs/num_steps (the schedule), validation_fraction, augment, normalization,
# optimizer.*, outliers.*, init_from, init_head, base_model. A top-level name covers its subfields.
RESUME_IGNORED_FIELDS = frozenset({
    'eval', 'log_every_steps', 'checkpoint_every_steps', 'checkpoint_every_minutes', 'keep_checkpoints',
    'num_devices', 'distributed', 'xla_cpu_defaults', 'peak_tflops', 'data_dir', 'download', 'required_fields',
    'allow_config_change', 'deterministic', 'profile_steps', 'compilation_cache_dir'})
# Free-form dicts compared as one value: a hyperparameter added there is a change, not a new field.
_WHOLE_VALUE_FIELDS = ('backbone_kwargs', 'method_kwargs')
_RENAMED_FIELDS = (('model', 'backbone'), ('model_kwargs', 'backbone_kwargs'))


class ConfigChangedError(ValueError):
  """The config differs from the one an existing checkpoint of the workdir was trained with."""


class CheckpointRestoreError(RuntimeError):
  """No checkpoint of the workdir restores into the current state (and none may be fallen back to)."""


class CheckpointWriteError(OSError):
  """Writing a checkpoint failed (disk full, quota, I/O error); the complete steps are intact.

  `errno` is the failed write's (errno.ENOSPC for a full disk) and `filename` the checkpoints folder.
  """

  def __str__(self) -> str:
    return self.args[0]  # OSError would print '[Errno N] None: <filename>' instead of the message


def manager(workdir: str, *, max_to_keep: int) -> ocp.CheckpointManager:
  """The manager a training run saves with: <workdir>/checkpoints, the newest `max_to_keep` kept."""
  # cleanup_tmp_directories: a save killed or failed half-way leaves '<step>.orbax-checkpoint-tmp-*',
  # which no restore reads; removing it when the run restarts gives back the space (disk full).
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINTS)),
                               options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                                                    cleanup_tmp_directories=True))


def save(checkpoints: ocp.CheckpointManager, step: int, state, *, metadata: dict | None = None) -> None:
  """Saves `state` as `step` (asynchronously; `checkpoints.wait_until_finished()` waits for it)."""
  checkpoints.save(step, args=ocp.args.StandardSave(state), custom_metadata=metadata)


class Writer:
  """The checkpoints a training run writes: orbax's manager, with write failures made clear.

  Orbax saves in a background thread, so a disk that fills up mid-save is reported by the next
  call into the manager, as a bare `OSError` from inside orbax. `save` first waits for the previous
  save, so each failure is raised once, as a `CheckpointWriteError` that names the step that
  failed, the folder, and the complete steps that are still there (orbax deletes an old step only
  after a newer one is complete, so the newest of those is restorable).

  Attributes:
    directory: the checkpoints folder.
  """

  def __init__(self, workdir: str, *, max_to_keep: int, metadata: dict | None = None):
    """Opens (creating) <workdir>/checkpoints; `metadata` is stored with every step (the config fingerprint)."""
    self._manager = manager(workdir, max_to_keep=max_to_keep)
    self._metadata = dict(metadata or {})
    self._pending = None
    self.directory = str(self._manager.directory)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    """Starts saving `state` as `step`, after the previous save has completed."""
    self.wait()
    self._pending = step
    try:
      save(self._manager, step, state, metadata=self._metadata)
    except OSError as e:
      self._pending = None
      raise self._error(step, e) from e

  def wait(self) -> None:
    """Blocks until the save in progress (if any) is complete; raises `CheckpointWriteError` if it failed."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:  # TensorStore reports I/O errors as ValueError
      raise self._error(step, e) from e

  def _error(self, step: int, error: Exception) -> CheckpointWriteError:
    try:
      self._manager.reload()
      intact = sorted(self._manager.all_steps())
    except Exception:  # pylint: disable=broad-except  (the listing is only for the message)
      intact = sorted(s for s in _read_only(self.directory).all_steps())
    if intact:
      kept = (f'the complete checkpoints (steps {", ".join(map(str, intact))}) are intact, and a re-run resumes '
              f'from step {intact[-1]}')
    else:
      kept = 'no earlier checkpoint exists, so a re-run starts from scratch'
    workdir = os.path.dirname(self.directory)
    message = (f'Writing the checkpoint of step {step} to {self.directory} failed: {error}. Nothing was '
               f'overwritten: {kept}. Free space on that disk (or use another --workdir than {workdir}) and '
               f'run the same command again.')
    exception = CheckpointWriteError(message)
    exception.errno = getattr(error, 'errno', None)
    exception.filename = self.directory
    return exception


def locate(path: str) -> tuple[str, int | None]:
  """(manager directory, step or None for the latest) of a workdir, checkpoints folder or step folder."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, CHECKPOINTS)):
    return os.path.join(path, CHECKPOINTS), None
  if os.path.basename(path).isdigit():
    return os.path.dirname(path), int(os.path.basename(path))
  return path, None


def latest_step(path: str) -> int | None:
  """The step `restore(path)` would read, or None if there is no checkpoint there (yet)."""
  directory, step = locate(path)
  if not os.path.isdir(directory):
    return None
  steps = _read_only(directory).all_steps()
  if step is not None:
    return step if step in steps else None
  return max(steps) if steps else None


def restore(path: str, *, target=None, sharding: jax.sharding.Sharding | None = None):
  """The training state saved at `path`, on the current devices.

  Args:
    path: a workdir, its checkpoints folder, or one step folder (`<workdir>/checkpoints/<step>`);
      a workdir or checkpoints folder gives its latest step.
    target: an abstract state (a pytree of `jax.ShapeDtypeStruct` with shardings) to restore into,
      exactly; a resuming run passes its own. None restores the saved structure with every array
      placed by `sharding`.
    sharding: placement of every array when there is no target (default: the first local device).

  Returns:
    the state: `target`'s structure, else a dict with 'step', 'params', 'batch_stats', 'opt_state'
    and 'bad_step'.

  Raises:
    FileNotFoundError: no checkpoint at `path`, with the command that writes one.
  """
  step = latest_step(path)
  directory, _ = locate(path)
  if step is None:
    raise FileNotFoundError(f'No checkpoint at {path!r} (looked in {directory}); train first with '
                            f'`python -m experiments.train --config=... --workdir=<workdir>`.')
  checkpoints = _read_only(directory)
  if target is None:
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                          checkpoints.item_metadata(step))
  return checkpoints.restore(step, args=ocp.args.StandardRestore(target))


def _short(error: Exception, limit: int = 300) -> str:
  """`Type: message` of the error and of what caused it, each on one line and cut short.

  Orbax wraps the reader's error (a TensorStore `OUT_OF_RANGE: ... byte range ... not valid` for a torn
  file) in a long message of its own and keeps it on `__cause__`: the cause is what says what is wrong, so
  it comes first. TensorStore errors carry pages of JSON spec, hence the cut.
  """
  chain, seen = [], set()
  while error is not None and id(error) not in seen and len(chain) < 4:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
  def one(e):
    text = ' '.join(str(e).split())
    return f'{type(e).__name__}: {text[:limit]}{" …" if len(text) > limit else ""}'
  root, *wrappers = chain[::-1]
  return one(root) + ''.join(f' (raised as {one(w)})' for w in wrappers[:1])


def _step_fingerprint(reader: ocp.CheckpointManager, step: int) -> str | None:
  try:
    return (reader.metadata(step).custom_metadata or {}).get(FINGERPRINT)
  except Exception:  # pylint: disable=broad-except  (a damaged metadata file: unknown, hence not proven safe)
    return None


def _saved_step(state) -> int | None:
  value = state.get('step') if isinstance(state, dict) else getattr(state, 'step', None)
  return None if value is None else int(np.asarray(value))


def resume(workdir: str, *, target, fingerprint: str | None, config_unchanged: bool) -> tuple[Any, int]:
  """The newest checkpoint of `workdir` that restores into `target`, past damaged ones where that is safe.

  A step that fails to restore (truncated or missing file, missing item, another structure, or a
  stored step counter that disagrees with its folder) is logged as a warning with its step and
  error. The next older step is tried only if it was written under the current config: its stored
  fingerprint equals `fingerprint` or, for a step without one, `config_unchanged` (the workdir's
  config.json matched). Once a step restores, the newer damaged ones are moved to
  <workdir>/checkpoints.corrupt/ (by process 0, then every process waits), never deleted.

  Args:
    workdir: the run's workdir.
    target: the abstract state (`jax.ShapeDtypeStruct`s with shardings) to restore into.
    fingerprint: `config_fingerprint` of the current config.
    config_unchanged: whether `check_config_unchanged` found no difference.

  Returns:
    (state, step).

  Raises:
    CheckpointRestoreError: no step restores, or the newest that does is not safe to fall back to;
      the message lists every step tried with its error. Nothing is moved or deleted then.
  """
  directory = os.path.abspath(os.path.join(workdir, CHECKPOINTS))
  reader = _read_only(directory)
  failures, refused = [], None
  for step in sorted(reader.all_steps(), reverse=True):
    if failures:
      saved = _step_fingerprint(reader, step)
      if not (saved == fingerprint if saved is not None else config_unchanged):
        refused = step
        break
    try:
      state = reader.restore(step, args=ocp.args.StandardRestore(target))
      stored = _saved_step(state)
      if stored is not None and stored != step:
        raise ValueError(f'the stored step counter is {stored}, not {step}')
    except Exception as e:  # pylint: disable=broad-except  (any failure to read the step makes it unusable)
      logging.warning('Checkpoint step %d in %s failed to restore: %s', step, directory, _short(e))
      failures.append((step, e))
      continue
    if failures:
      damaged = [s for s, _ in failures]
      logging.warning('Resuming from step %d, the newest checkpoint that restores; moving the damaged step(s) %s '
                      'to %s.', step, damaged, os.path.join(os.path.dirname(directory), CORRUPT))
      _quarantine(directory, damaged)
    return state, step
  tried = '; '.join(f'step {s}: {_short(e)}' for s, e in failures)
  if refused is not None:
    why = (f'The older step {refused} was written under a different config, so falling back to it would resume '
           f'another run.')
  else:
    why = 'No older step is left to fall back to.'
  hint = ('' if config_unchanged else ' The config changed since these checkpoints were written (see the warning '
          'above): train in a fresh --workdir, or start from these weights with --config.init_from=<this workdir>.')
  raise CheckpointRestoreError(f'No checkpoint in {directory} restores into the state of this config ({tried}). '
                               f'{why} Nothing was moved or deleted.{hint}')


def _quarantine(directory: str, steps) -> None:
  if jax.process_index() == 0:
    corrupt = os.path.join(os.path.dirname(directory), CORRUPT)
    os.makedirs(corrupt, exist_ok=True)
    for step in steps:
      destination = os.path.join(corrupt, str(step))
      if os.path.exists(destination):
        destination += f'.{time.time_ns()}'
      os.replace(os.path.join(directory, str(step)), destination)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('ood_jax.trainer.checkpoint.quarantine')


def _read_only(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler(),
                               options=ocp.CheckpointManagerOptions(read_only=True))


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """<workdir>/config.json (process 0 only): what `load_config` and `experiments.evaluate` read."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    # Written aside and renamed: other processes read this file (`check_config_unchanged`) while
    # process 0 rewrites it, and must see the old or the new file, never half of one.
    path = os.path.join(workdir, CONFIG)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + '.tmp', path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir`, laid over today's defaults (`defaults.base_config`).

  A field the run's version of ood_jax did not have yet reads its default (e.g. `eval.detector_kwargs`
  for runs saved by 0.1); runs saved before the backbone field was renamed ('model', 'model_kwargs') are
  read with the current names.
  """
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} the workdir of a training run?')
  with open(path, encoding='utf-8') as f:
    fields = json.load(f)
  return ml_collections.ConfigDict(_over(defaults.base_config().to_dict(), _renamed(fields)))


def _over(base: dict, saved: dict) -> dict:
  """`saved` laid over `base`, nested dicts merged key by key (a saved value always wins)."""
  out = dict(base)
  for key, value in saved.items():
    out[key] = _over(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
  return out


def _renamed(fields: dict) -> dict:
  for old, new in _RENAMED_FIELDS:
    if old in fields and new not in fields:
      fields[new] = fields.pop(old)
  return fields


def _counted_fields(fields: dict) -> dict[str, Any]:
  """Dotted name → JSON value of every field not in `RESUME_IGNORED_FIELDS`."""
  flat = {}

  def visit(prefix, value):
    if isinstance(value, dict) and prefix not in _WHOLE_VALUE_FIELDS:
      for key, inner in value.items():
        visit(f'{prefix}.{key}' if prefix else key, inner)
    else:
      flat[prefix] = value

  visit('', _renamed(dict(fields)))
  return {name: value for name, value in flat.items() if name.split('.')[0] not in RESUME_IGNORED_FIELDS}


def _json_fields(config: ml_collections.ConfigDict) -> dict:
  # The JSON round trip makes tuples lists and placeholders None, as in a saved config.json.
  return json.loads(config.to_json_best_effort())


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
  """A hash of the fields that count for resuming (not `RESUME_IGNORED_FIELDS`), stored with every checkpoint."""
  text = json.dumps(_counted_fields(_json_fields(config)), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_differences(saved: ml_collections.ConfigDict | dict, config: ml_collections.ConfigDict) -> list[str]:
  """'name: old → new' for each counted field that differs; fields only one side has (added or removed
  by another ood_jax version) are not compared."""
  saved = _json_fields(saved) if isinstance(saved, ml_collections.ConfigDict) else saved
  old, new = _counted_fields(saved), _counted_fields(_json_fields(config))
  return [f'{name}: {old[name]!r} → {new[name]!r}' for name in sorted(old.keys() & new.keys())
          if old[name] != new[name]]


def check_config_unchanged(config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Refuses to resume a workdir's checkpoints under a config that changes what they mean.

  Compares `config` with <workdir>/config.json when the workdir holds a checkpoint (without one
  there is nothing to resume, and the new config simply replaces the old). Call it before
  `save_config` overwrites config.json.

  Returns:
    the differences ('name: old → new'), logged as a warning, when `config.allow_config_change` is
    set; [] when nothing counted changed.

  Raises:
    ConfigChangedError: fields differ and `config.allow_config_change` is not set; the message names
      them and the two ways on.
  """
  path = os.path.join(workdir, CONFIG)
  if not os.path.isdir(os.path.join(workdir, CHECKPOINTS)) or latest_step(workdir) is None:
    return []
  if not os.path.exists(path):
    logging.warning('%s holds checkpoints but no %s: cannot check that the config is unchanged.', workdir, CONFIG)
    return []
  with open(path, encoding='utf-8') as f:
    differences = config_differences(json.load(f), config)
  if differences and not config.allow_config_change:
    raise ConfigChangedError(
        f'The config differs from the one the checkpoints in {workdir} were trained with ({path}): '
        f'{"; ".join(differences)}. Resuming would continue another run under this name. Use a fresh '
        f'--workdir, or pass --config.allow_config_change=True to resume these checkpoints anyway (they must '
        f'still fit the new state).')
  if differences:
    logging.warning('Resuming %s under a changed config (allow_config_change=True): %s.', workdir,
                    '; '.join(differences))
  return differences
