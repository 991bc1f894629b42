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
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile

import jax
import numpy as np

FOLDER = 'features'


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
