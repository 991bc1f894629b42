"""ImageNet-scale evaluation, streamed and sharded: 2 processes reading disjoint shards equal 1 process.

The miniature OpenOOD ImageNet-200 release of tests/trainer/data/test_stream.py (40 training images, 12
validation, 20 test, five OOD lists of 10 and a validation OOD list of 8, PNGs of 18–30 pixels resized to 18
and cropped to 16 × 16) is evaluated with a user's Linen module whose variables come from a msgpack
checkpoint, chunk size 8 (the training set spans 5 chunks), batch size 8:

* by two `jax.distributed` processes on localhost (8 CPU devices each): process p computes and writes
  exactly the chunks c ≡ p (mod 2) of every set, process 0 alone writes the manifests, and both return the
  same report;
* by this process (8 CPU devices, the same per-host program), into another workdir.

Identity is exact, bitwise on every cached array and equal on every number of the report: each chunk is
computed by the same compiled program on the same rows at the same batch positions (chunks are
process-strided, batches never cross a chunk), no cross-process reduction exists anywhere (each host
runs its own forward passes), and every process reads the chunks back in chunk order, i.e. the rows in
the set's order, into the same fixed-size fit blocks. The streamed report also equals the in-memory path
(`evaluate_outputs` on the loaded arrays) to float rounding, and a streamed fit holds one chunk at a time
(counted, and measured with tracemalloc on a set of 20 chunks).

Run as a script (`python tests/trainer/test_streamed_evaluation.py <benchmark> <checkpoint> <workdir>`) this
file is the worker.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import tracemalloc

import flax.linen as nn
from flax import serialization
import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[2]
DETECTORS = ('msp', 'energy', 'vim', 'knn', 'react')
PINNED = {'knn': {'k': 5}}  # the default k = 50 exceeds the 40 training rows
CHUNK, BATCH = 8, 8


class Net(nn.Module):
  """A user's classifier for 16 × 16 RGB inputs; 'head' is the final layer (ImageNet-200's 200 classes)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2)(x)).reshape(x.shape[0], -1)
    return nn.Dense(200, name='head')(nn.relu(nn.Dense(16)(x)))


def _evaluate(benchmark, checkpoint, workdir):
  from ood_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from ood_jax.trainer import evaluate  # pylint: disable=g-import-not-at-top
  variables = evaluator.load_variables(checkpoint)
  return evaluate.evaluate_protocol(
      Net(), variables, protocol='openood_v1_5', dataset='imagenet200', workdir=str(workdir), chunk_size=CHUNK,
      batch_size=BATCH, image_size=(16, 16), resize=18, benchmark_dir=str(benchmark), detectors=DETECTORS,
      detector_kwargs=PINNED)


def _worker(benchmark, checkpoint, workdir) -> None:
  from ood_jax.trainer import train  # pylint: disable=g-import-not-at-top
  train.initialize_distributed()
  root, written = os.path.abspath(workdir), []

  def hook(event, args):  # os.replace, the last step of every atomic write, is audited as os.rename
    if event == 'os.rename':
      target = os.path.abspath(os.fsdecode(args[1]))
      if target.startswith(root):
        written.append(os.path.relpath(target, root))

  sys.addaudithook(hook)
  report = _evaluate(benchmark, checkpoint, workdir)
  print(json.dumps({'process': jax.process_index(), 'results': report.results, 'written': written}), flush=True)


def _write_checkpoint(path):
  variables = Net().init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32))
  path.write_bytes(serialization.to_bytes(variables))
  return variables


def _launch(benchmark, checkpoint, workdir, logs):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  procs = []
  for index in range(2):
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
           'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': str(index)}
    path = logs / f'process{index}.log'
    log = open(path, 'w')  # pylint: disable=consider-using-with
    command = [sys.executable, __file__, str(benchmark), str(checkpoint), str(workdir)]
    procs.append((subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log, path))
  return procs


def _report(path) -> dict:
  lines = [line for line in pathlib.Path(path).read_text().splitlines() if line.startswith('{"process"')]
  assert len(lines) == 1, pathlib.Path(path).read_text()[-3000:]
  return json.loads(lines[0])


def _arrays(workdir) -> dict[str, dict[str, np.ndarray]]:
  out = {}
  for path in sorted(pathlib.Path(workdir, 'features').rglob('chunk_*.npz')):
    with np.load(path) as stored:
      out[str(path.relative_to(workdir))] = {key: stored[key] for key in stored.files}
  return out


def test_two_processes_read_disjoint_shards_and_equal_one(tmp_path):
  from tests.trainer.data import test_stream  # pylint: disable=g-import-not-at-top
  from ood_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  from ood_jax.trainer import feature_cache  # pylint: disable=g-import-not-at-top
  benchmark, checkpoint = tmp_path / 'benchmark', tmp_path / 'net.msgpack'
  test_stream.write_imagenet_release(benchmark)
  variables = _write_checkpoint(checkpoint)
  procs = _launch(benchmark, checkpoint, tmp_path / 'two', tmp_path)
  for proc, log, _ in procs:
    assert proc.wait(timeout=600) == 0, pathlib.Path(log.name).read_text()[-3000:]
    log.close()
  reports = [_report(path) for _, _, path in procs]

  one = _evaluate(benchmark, checkpoint, tmp_path / 'one')
  assert set(one.results['detectors']['ood_mean']) == set(DETECTORS), one.results['detectors'].get('errors')
  assert 'react' in one.results['detectors']['tuning']  # tuned on the OpenImage-O validation list
  assert one.results['in_distribution']['num_examples'] == 20
  canonical = lambda results: json.loads(json.dumps(results))
  for report in reports:
    assert report['results'] == canonical(one.results)  # every number equal, not close

  # The same chunk files with bitwise-equal contents.
  two_arrays, one_arrays = _arrays(tmp_path / 'two'), _arrays(tmp_path / 'one')
  assert two_arrays.keys() == one_arrays.keys() and len(one_arrays) == 5 + 2 + 3 + 5 * 2 + 1
  for name, arrays in one_arrays.items():
    for key, array in arrays.items():
      np.testing.assert_array_equal(two_arrays[name][key], array, err_msg=f'{name}:{key}')

  # Each process wrote exactly its strided shard of every set; only process 0 wrote manifests.
  for report in reports:
    chunks = [p for p in report['written'] if os.path.basename(p).startswith('chunk_')]
    indices = {int(os.path.basename(p)[6:11]) for p in chunks}
    assert indices and all(i % 2 == report['process'] for i in indices), report['written']
    manifests = [p for p in report['written'] if p.endswith(feature_cache.MANIFEST)]
    assert len(manifests) == (9 if report['process'] == 0 else 0)
  written = sorted(p for r in reports for p in r['written'] if 'chunk_' in p)
  assert len(written) == len(set(written)) == len(two_arrays)  # disjoint, and together every chunk

  # The streamed report equals the in-memory path on the same outputs (to float rounding: other blocks).
  from ood_jax.trainer.data import protocols  # pylint: disable=g-import-not-at-top
  plan = protocols.get('openood_v1_5', 'imagenet200')
  (key,) = os.listdir(tmp_path / 'one' / 'features')
  cache = feature_cache.FeatureCache(tmp_path / 'one', key)
  loaded = lambda name: cache.chunks(f'{name}@{CHUNK}').load()
  data = plan.in_distribution
  params = variables['params']['head']
  memory = evaluator.evaluate_outputs(
      train=loaded(data.train), test=loaded(data.test), ood={name: loaded(name) for name in plan.test_sets},
      validation=loaded(data.validation), validation_ood={name: loaded(name) for name in plan.validation},
      groups=plan.groups, detectors=DETECTORS, detector_kwargs=PINNED,
      head=(np.asarray(params['kernel']), np.asarray(params['bias'])))
  for det, values in memory.results['detectors']['ood_mean'].items():
    for metric, value in values.items():
      np.testing.assert_allclose(one.results['detectors']['ood_mean'][det][metric], value, atol=1e-9,
                                 err_msg=f'{det}:{metric}')


def test_streamed_fit_holds_one_chunk_of_a_larger_set(tmp_path):
  from ood_jax import detectors  # pylint: disable=g-import-not-at-top
  from ood_jax.trainer import feature_cache  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  store = feature_cache.ChunkStore(tmp_path / 'train')
  rows, dim, count = 1024, 32, 20
  whole = []
  for index in range(count):
    labels = rng.integers(0, 4, rows).astype(np.int32)
    chunk = {'features': (rng.normal(size=(rows, dim)) + labels[:, None]).astype(np.float32), 'labels': labels}
    store.write_chunk(index, chunk)
    whole.append(chunk)
  store.finish(rows * count, rows)
  chunk_bytes = rows * (dim + 1) * 4
  det = detectors.get('mahalanobis')
  fit = lambda: det.fit(lambda: store.blocks(('features', 'labels'), rows=rows), num_classes=4)
  fit()  # compiles
  tracemalloc.start()
  state = fit()
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert store.peak_resident == 1 and store.resident == 0
  in_memory = [{k: np.concatenate([c[k] for c in whole]) for k in ('features', 'labels')}]
  tracemalloc.start()
  reference = det.fit(in_memory, num_classes=4)
  _, reference_peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  # The set is 20 chunks (2.7 MB): the streamed fit's peak stays under half of it (observed 1.1 MB: a chunk, a
  # float64 block and fixed overhead), the in-memory fit's passes it (observed 16 MB).
  assert peak < count * chunk_bytes / 2 < count * chunk_bytes < reference_peak, (peak, chunk_bytes, reference_peak)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # Blocks do not depend on the chunk size: 256-row chunks read as 100-row blocks.
  sizes = [len(block['labels']) for block in store.blocks(('labels',), rows=100)]
  assert sizes == [100] * 204 + [80]


def test_load_variables_from_msgpack_and_orbax(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from ood_jax.evaluation import evaluator  # pylint: disable=g-import-not-at-top
  variables = _write_checkpoint(tmp_path / 'net.msgpack')
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / 'orbax', variables)
  checkpointer.wait_until_finished()  # orbax saves asynchronously
  for path in (tmp_path / 'net.msgpack', tmp_path / 'orbax'):
    loaded = evaluator.load_variables(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(jax.tree.map(np.asarray, variables))
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(variables)):
      np.testing.assert_array_equal(a, np.asarray(b))
  (tmp_path / 'bad.msgpack').write_bytes(b'not msgpack at all')
  import pytest  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='not a Flax msgpack checkpoint'):
    evaluator.load_variables(tmp_path / 'bad.msgpack')
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    evaluator.load_variables(tmp_path / 'missing.msgpack')


if __name__ == '__main__':
  _worker(*sys.argv[1:4])
