"""ImageNet-scale evaluation: every set streamed from disk, sharded over processes, its outputs cached in chunks.

The path `evaluate.evaluate_protocol` takes for a large protocol (`protocols.Protocol.large`: OpenOOD
v1.5's ImageNet-200 and ImageNet-1K), for a model of your own:

1. every set, in-distribution and OOD, is checked on disk before anything runs (`stream.check_sources`);
2. each set goes through the model once: process p of P reads, decodes and resizes only its chunks
   (`stream.chunks`: c ≡ p mod P) with tf.data on its host, feeds them to its own devices
   (`stream.prefetch_to_devices`) and writes each chunk's logits, features and labels to
   <workdir>/features/<fingerprint>/<set>/chunk_<c>.npz (`feature_cache.ChunkStore`); after a barrier,
   process 0 writes the set's manifest. A rerun, or a run resumed after an interruption, computes only
   the chunks that are missing;
3. every process reads the chunks back in chunk order, i.e. the rows in the set's order whatever the
   process count, and runs the one evaluation path (`ood_jax.evaluation.evaluator.evaluate_outputs`):
   each detector's fit streams the training chunks block by block (`ChunkStore.blocks`), each test and
   OOD set is scored block by block, and only the scores, one float per row, are kept for the metrics.
   The validation sets (calibration, tuning) are small and are loaded whole.

No step needs a collective besides the two barriers per set: the forward passes are per host. Two
processes therefore compute every chunk with the program a single process would run on the same
local devices, and their results equal a 1-process run's exactly (tests/trainer/test_streamed_evaluation.py).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

import flax.linen as nn
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from ood_jax import _checks
from ood_jax.evaluation import evaluator
from ood_jax.trainer import feature_cache
from ood_jax.trainer.data import protocols
from ood_jax.trainer.data import stream

__all__ = ['evaluate_large_protocol', 'extract_set']

_LOG = logging.getLogger(__name__)


def _all_processes(flag: bool) -> bool:
  """Whether `flag` holds on every process; a collective when there are several."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def extract_set(forward, source: stream.Source, store: feature_cache.ChunkStore, *, chunk_size: int,
                batch_size: int, image_size: tuple[int, int], resize: int | None, preprocess=None,
                devices=None) -> feature_cache.ChunkStore:
  """Runs this process's chunks of `source` through `forward` into `store`, then completes the set.

  Every process must call it for the same set (it ends with barriers); chunks already on disk are
  skipped, so an interrupted extraction resumes where it stopped.

  Args:
    forward: device images [B, H, W, 3] → logits, or {'logits', 'features'}.
    source: the set (`stream.open_source`).
    store: where its chunks go.
    chunk_size: rows per chunk.
    batch_size: rows per forward pass (the last batch of a chunk padded).
    image_size, resize: the host-side geometry (`stream.host_batches`).
    preprocess: optional host function on each uint8 batch before the transfer.
    devices: this process's devices to use (`stream.prefetch_to_devices`).

  Returns:
    `store`, complete on every process.
  """
  if _all_processes(store.manifest is not None):
    return store
  began, computed = time.perf_counter(), 0
  for chunk in stream.chunks(source.num_examples, chunk_size):
    if store.has_chunk(chunk.index):
      continue
    parts: dict[str, list[np.ndarray]] = {}
    batches = stream.host_batches(source, chunk, batch_size=batch_size, image_size=image_size, resize=resize)
    for batch in stream.prefetch_to_devices(batches, batch_size=batch_size, devices=devices, preprocess=preprocess):
      out = forward(batch['image'])
      out = dict(out) if isinstance(out, Mapping) else {'logits': out}
      for key in ('logits', 'features'):
        if key in out:
          parts.setdefault(key, []).append(np.asarray(out[key], np.float32)[batch['mask']])
      parts.setdefault('labels', []).append(batch['label'])
    store.write_chunk(chunk.index, {key: np.concatenate(values) for key, values in parts.items()})
    computed += chunk.stop - chunk.start
  _LOG.info('streamed: %s, %d of %d rows through the model on process %d in %.1f s', source.name, computed,
            source.num_examples, jax.process_index(), time.perf_counter() - began)
  _barrier(f'ood_jax.streamed.chunks:{store.folder}')
  if jax.process_index() == 0:
    store.finish(source.num_examples, chunk_size)
  _barrier(f'ood_jax.streamed.manifest:{store.folder}')
  return store


def _devices(model, batch_size: int):
  devices = jax.local_devices()
  if not isinstance(model, nn.Module) or batch_size % len(devices):
    return devices[:1]  # NNX modules and functions carry their own placement; one device is always valid
  return devices


def evaluate_large_protocol(model, variables, plan: protocols.Protocol, *, workdir: str | os.PathLike,
                            chunk_size: int = 4096, batch_size: int = 256, preprocess=None,
                            image_size: tuple[int, int] | None = None, resize: int | None | str = 'protocol',
                            data_dir: str | os.PathLike | None = None, benchmark_dir: str | os.PathLike | None = None,
                            detectors='all', detector_kwargs=None, head='head', features=None, apply_kwargs=None,
                            name: str | None = None) -> evaluator.Report:
  """A large protocol on a model of your own, streamed and sharded (module docstring).

  Args:
    model, variables: as `ood_jax.evaluation.evaluate` takes them (a Linen module with its variables, e.g.
      from `evaluator.load_variables`; an NNX module; a function).
    plan: a large protocol (`protocols.get('openood_v1_5', 'imagenet200')`).
    workdir: where the chunks are cached (<workdir>/features/<fingerprint>/); on several processes a folder
      every host sees.
    chunk_size: rows per chunk on disk: the unit of sharding, of resumption and of host memory.
    batch_size: rows per forward pass; `chunk_size` must be a multiple of it.
    preprocess: host function uint8 [B, H, W, 3] → model inputs; default: scaled to [0, 1] and normalised
      with the protocol's mean and std, on the devices.
    image_size: (height, width) of the model's inputs; default the protocol's (224, 224).
    resize: shorter side before the centre crop; default the protocol's (256); None resizes straight.
    data_dir, benchmark_dir: TFDS data directory and benchmark releases' folder.
    detectors, detector_kwargs, head, features, apply_kwargs, name: as for `ood_jax.evaluation.evaluate`.

  Returns:
    The `Report` (the same on every process); its leaderboard grouped near / far as the protocol says.
  """
  if not plan.large:
    raise ValueError(f'protocol {plan.name!r} for {plan.dataset!r} is not a large protocol; use '
                     'evaluate.evaluate_protocol, which loads it into memory.')
  data = plan.in_distribution
  chunk_size = _checks.positive_int('chunk_size', chunk_size)
  batch_size = _checks.positive_int('batch_size', batch_size)
  if chunk_size % batch_size:
    raise ValueError(f'chunk_size ({chunk_size}) must be a multiple of batch_size ({batch_size}), so that '
                     'batches never straddle two chunks.')
  image_size = tuple(data.image_size if image_size is None else image_size)
  resize = data.resize if resize == 'protocol' else resize
  stream.check_sources(data.sets + plan.test_sets + plan.validation, data_dir=data_dir, benchmark_dir=benchmark_dir)

  devices = _devices(model, batch_size)
  if isinstance(model, nn.Module):
    # Replicated on the devices the batches are split over, so the forward pass needs no transfer.
    mesh = jax.sharding.Mesh(np.asarray(devices), ('data',))
    variables = jax.device_put(variables, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  fn, head_weights = evaluator.extractor(model, variables, head=head, features=features, apply_kwargs=apply_kwargs)
  if preprocess is None:
    mean, std = np.asarray(data.mean, np.float32), np.asarray(data.std, np.float32)
    normalize = jax.jit(lambda images: (images.astype(jnp.float32) / 255.0 - mean) / std)
    forward = lambda images: fn(normalize(images))
  else:
    forward = fn

  key = feature_cache.fingerprint(
      variables if isinstance(model, nn.Module) else {}, model=_describe(model), head=head, features=features,
      apply_kwargs=apply_kwargs, protocol=plan.name, dataset=plan.dataset, image_size=image_size, resize=resize,
      preprocess=None if preprocess is None else _describe(preprocess), mean=data.mean, std=data.std,
      data_dir=data_dir, benchmark_dir=benchmark_dir)
  cache = feature_cache.FeatureCache(workdir, key)

  def extract(set_name, labelled):
    source = stream.open_source(set_name, labelled=labelled, data_dir=data_dir, benchmark_dir=benchmark_dir)
    store = cache.chunks(f'{set_name}@{chunk_size}')
    return extract_set(forward, source, store, chunk_size=chunk_size, batch_size=batch_size, image_size=image_size,
                       resize=resize, preprocess=preprocess, devices=devices)

  began = time.perf_counter()
  train = extract(data.train, True)
  validation = extract(data.validation, True).load()
  test = extract(data.test, True)
  ood = {set_name: extract(set_name, False) for set_name in plan.test_sets}
  validation_ood = {set_name: extract(set_name, False).load() for set_name in plan.validation}
  _LOG.info('streamed: every set extracted in %.1f s', time.perf_counter() - began)
  model_name = name or (type(model).__name__ if isinstance(model, (nn.Module, nnx.Module))
                        else getattr(model, '__name__', 'model'))
  return evaluator.evaluate_outputs(
      train=train, test=test, ood=ood, validation=validation, validation_ood=validation_ood, groups=plan.groups,
      detectors=detectors, detector_kwargs=detector_kwargs, head=head_weights, name=model_name,
      protocol=plan.name)


def _describe(thing) -> str:
  """What the fingerprint records of a module or function besides its weights: its class or name, its fields."""
  if isinstance(thing, nn.Module):
    return repr(thing)  # the dataclass fields (widths, dtype, ...) that change the outputs
  return f'{getattr(thing, "__module__", "")}.{getattr(thing, "__qualname__", type(thing).__qualname__)}'

