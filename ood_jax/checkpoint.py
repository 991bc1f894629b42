"""Checkpoints and saved configs: the orbax manager of a run, one restore function, config.json.

A checkpoint holds the whole `TrainState`. `restore` reads one from any of the three paths people
pass around (a workdir, its 'checkpoints' folder, or one step folder inside it) and places every
array on the current devices: restoring without a target would re-create the saving run's
shardings, which fails as soon as the devices differ (trained on 8 accelerators, evaluated or
fine-tuned on 1, or on a CPU).
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

CHECKPOINTS = 'checkpoints'  # the folder under a workdir
CONFIG = 'config.json'


def manager(workdir: str, *, max_to_keep: int) -> ocp.CheckpointManager:
  """The manager a training run saves with: <workdir>/checkpoints, the newest `max_to_keep` kept."""
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, CHECKPOINTS)),
                               options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))


def save(checkpoints: ocp.CheckpointManager, step: int, state) -> None:
  """Saves `state` as `step` (asynchronously; `checkpoints.wait_until_finished()` waits for it)."""
  checkpoints.save(step, args=ocp.args.StandardSave(state))


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


def _read_only(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler(),
                               options=ocp.CheckpointManagerOptions(read_only=True))


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """<workdir>/config.json (process 0 only): what `load_config` and `experiments.evaluate` read."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved in `workdir`.

  Runs saved before the backbone field was renamed ('model', 'model_kwargs') are read with the
  current names.
  """
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} the workdir of a training run?')
  with open(path, encoding='utf-8') as f:
    fields = json.load(f)
  for old, new in (('model', 'backbone'), ('model_kwargs', 'backbone_kwargs')):
    if old in fields and new not in fields:
      fields[new] = fields.pop(old)
  return ml_collections.ConfigDict(fields)
