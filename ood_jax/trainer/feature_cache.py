"""Per-set model outputs cached in a workdir, so evaluating another detector does not re-run the model.

Layout: <workdir>/features/<fingerprint>/<set>.npz, one file per evaluated set with the arrays
`inference.run` returned (logits or embeddings, features, labels). The fingerprint is a SHA-256 of
the model's variables (every leaf's path, dtype, shape and bytes) and of everything else that changes
the outputs (backbone, method, normalisation, data folders): a new checkpoint, or the same
workdir trained further, gives a new fingerprint, and the first write under it deletes the folders
of older ones, so the cache never serves outputs of other weights and never grows past one model.

What the fingerprint cannot see is a data set whose files change under the same name (a re-prepared
TFDS version, an edited image list): delete <workdir>/features, or set
`config.eval.feature_cache=False`, after changing data in place.

Sets too large for memory (ImageNet) are stored in chunks instead (`ChunkStore`,
`FeatureCache.chunks`): <fingerprint>/<set>/chunk_00000.npz, ... and a manifest.json. Chunk c holds
rows [c·S, (c + 1)·S) of the set; on several processes each writes the chunks it computed
(`ood_jax.trainer.data.stream.chunks`), process 0 writes the manifest once all exist, and every process
reads them back in chunk order, so the rows come back in the set's order whatever the process count. A
chunk written before an interruption is not computed again. Readers hold one chunk at a time:
`ChunkStore.blocks` is what a streamed detector fit consumes (a callable returning a fresh iterator),
and `ChunkStore.peak_resident` counts the chunks ever held at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence

import jax
import numpy as np

FOLDER = 'features'
MANIFEST = 'manifest.json'


def fingerprint(variables, **context) -> str:
  """A hex digest of the variables' values and of `context` (JSON-serialisable settings)."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  for path, leaf in leaves:
    array = np.asarray(jax.device_get(leaf))
    digest.update(f'{jax.tree_util.keystr(path)}|{array.dtype}|{array.shape}|'.encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  digest.update(json.dumps(context, sort_keys=True, default=str).encode())
  return digest.hexdigest()[:24]


def _file_name(set_name: str) -> str:
  # Readable and collision-free: the name's safe characters plus a hash of the exact name.
  safe = re.sub(r'[^A-Za-z0-9._-]+', '_', set_name)[-80:]
  return f'{safe}.{hashlib.sha256(set_name.encode()).hexdigest()[:8]}.npz'


class FeatureCache:
  """Outputs of one model, by set name, under <workdir>/features/<fingerprint>."""

  def __init__(self, workdir: str | os.PathLike, key: str):
    self.root = os.path.join(os.fspath(workdir), FOLDER)
    self.folder = os.path.join(self.root, key)
    self._pruned = False

  def load(self, set_name: str) -> dict[str, np.ndarray] | None:
    """The cached outputs of `set_name`, or None when this model has not been run on it."""
    path = os.path.join(self.folder, _file_name(set_name))
    if not os.path.exists(path):
      return None
    with np.load(path) as stored:
      return {key: stored[key] for key in stored.files}

  def save(self, set_name: str, outputs: dict[str, np.ndarray]) -> None:
    """Stores the outputs atomically (a reader never sees half a file); one writer per workdir."""
    if jax.process_index() != 0:
      return
    self._prune()
    os.makedirs(self.folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=self.folder, suffix='.tmp')
    with os.fdopen(handle, 'wb') as f:
      np.savez(f, **outputs)
    os.replace(tmp, os.path.join(self.folder, _file_name(set_name)))

  def chunks(self, set_name: str) -> 'ChunkStore':
    """The chunked store of `set_name`'s outputs (written by every process, see `ChunkStore`)."""
    return ChunkStore(os.path.join(self.folder, _file_name(set_name)[:-len('.npz')]), owner=self)

  def _prune(self) -> None:
    """Deletes the outputs of other fingerprints: their weights are no longer the workdir's."""
    if self._pruned:
      return
    self._pruned = True
    if os.path.isdir(self.root):
      for entry in os.listdir(self.root):
        path = os.path.join(self.root, entry)
        if path != self.folder and os.path.isdir(path):
          shutil.rmtree(path, ignore_errors=True)


def _atomic_write(folder: str, name: str, write) -> None:
  os.makedirs(folder, exist_ok=True)
  handle, tmp = tempfile.mkstemp(dir=folder, suffix='.tmp')
  with os.fdopen(handle, 'wb') as f:
    write(f)
  os.replace(tmp, os.path.join(folder, name))


class ChunkStore:
  """One set's per-example outputs as fixed-size chunks on disk, written by several processes, read in order.

  Attributes:
    folder: where the chunks and the manifest live.
    resident: chunks held in memory by this store's readers right now.
    peak_resident: the most chunks held at once since the store was opened (bounded memory, measured).
  """

  def __init__(self, folder: str | os.PathLike, *, owner: FeatureCache | None = None):
    self.folder = os.fspath(folder)
    self._owner = owner
    self._manifest = None
    self.resident = self.peak_resident = 0

  def _path(self, index: int) -> str:
    return os.path.join(self.folder, f'chunk_{index:05d}.npz')

  def has_chunk(self, index: int) -> bool:
    return os.path.exists(self._path(index))

  def write_chunk(self, index: int, outputs: dict[str, np.ndarray]) -> None:
    """Stores chunk `index` atomically; any process may write the chunks it computed."""
    if self._owner is not None and jax.process_index() == 0:
      self._owner._prune()  # pylint: disable=protected-access
    _atomic_write(self.folder, os.path.basename(self._path(index)), lambda f: np.savez(f, **outputs))

  def finish(self, num_examples: int, chunk_size: int) -> None:
    """Writes the manifest (process 0 only), after checking that every chunk exists with the right rows."""
    count = -(-num_examples // chunk_size)
    missing = [index for index in range(count) if not self.has_chunk(index)]
    if missing:
      raise FileNotFoundError(f'{len(missing)} of the {count} chunks of {self.folder} are missing (e.g. '
                              f'{self._path(missing[0])}); did every process finish its shard?')
    with np.load(self._path(0)) as first:
      shapes = {key: list(first[key].shape[1:]) for key in first.files}
      dtypes = {key: str(first[key].dtype) for key in first.files}
    manifest = {'num_examples': num_examples, 'chunk_size': chunk_size, 'num_chunks': count,
                'shapes': shapes, 'dtypes': dtypes}
    if jax.process_index() == 0:
      _atomic_write(self.folder, MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    self._manifest = manifest

  @property
  def manifest(self) -> dict | None:
    """The manifest once the set is complete, else None."""
    if self._manifest is None:
      path = os.path.join(self.folder, MANIFEST)
      if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
          self._manifest = json.load(f)
    return self._manifest

  def _complete(self) -> dict:
    if self.manifest is None:
      raise FileNotFoundError(f'{self.folder} holds no complete set (no {MANIFEST}).')
    return self.manifest

  @property
  def num_rows(self) -> int:
    return self._complete()['num_examples']

  @property
  def keys(self) -> tuple[str, ...]:
    return tuple(self._complete()['shapes'])

  def dim(self, key: str) -> int:
    """The trailing size of `key`'s rows (D for features, K for logits)."""
    return int(np.prod(self._complete()['shapes'][key], dtype=np.int64))

  def _chunks(self, keys: Sequence[str]) -> Iterator[dict[str, np.ndarray]]:
    for index in range(self._complete()['num_chunks']):
      with np.load(self._path(index)) as stored:
        chunk = {key: stored[key] for key in keys}
      self.resident += 1
      self.peak_resident = max(self.peak_resident, self.resident)
      try:
        yield chunk
      finally:
        del chunk
        self.resident -= 1

  def blocks(self, keys: Sequence[str] | None = None, rows: int = 4096) -> Iterator[dict[str, np.ndarray]]:
    """The rows of `keys`, in order, in blocks of `rows` (the last one shorter), reading one chunk at a time.

    Block boundaries depend on `rows` only, not on the chunk size, so a streamed fit sees the same
    batches from any store of the same set.
    """
    keys = tuple(self.keys if keys is None else keys)
    carry: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    held = 0
    for chunk in self._chunks(keys):
      start, size = 0, len(chunk[keys[0]])
      while start < size:
        take = min(rows - held, size - start)
        for key in keys:
          carry[key].append(chunk[key][start:start + take])
        held, start = held + take, start + take
        if held == rows:
          yield {key: np.concatenate(parts) for key, parts in carry.items()}
          carry, held = {key: [] for key in keys}, 0
      # Rows carried into the next block are copied, so that the chunk itself is freed before the next loads.
      carry = {key: [np.array(part) for part in parts] for key, parts in carry.items()}
      del chunk
    if held:
      yield {key: np.concatenate(parts) for key, parts in carry.items()}

  def load(self, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Every row of `keys` in memory: for the small sets (validation) and the per-example labels."""
    keys = tuple(self.keys if keys is None else keys)
    parts = list(self.blocks(keys, rows=self._complete()['chunk_size']))
    return {key: np.concatenate([part[key] for part in parts]) for key in keys}
