"""The mesh and shardings: one 'data' axis, batch-sharded and replicated global arrays."""

import jax
import numpy as np
import pytest

from ood_jax.trainer import sharding


def test_make_mesh_spans_every_device_or_the_given_ones():
  assert sharding.make_mesh().shape == {'data': 8}
  assert sharding.make_mesh(jax.devices()[:2]).shape == {'data': 2}
  with pytest.raises(ValueError, match='devices is empty'):
    sharding.make_mesh([])


def test_to_global_shards_the_batch_axis():
  array = np.arange(32).reshape(16, 2)
  out = sharding.to_global(array, sharding.make_mesh())
  np.testing.assert_array_equal(out, array)
  assert [shard.data.shape for shard in out.addressable_shards] == [(2, 2)] * 8
  np.testing.assert_array_equal(out.addressable_shards[3].data, array[6:8])
  with pytest.raises(ValueError, match='divisible by the 8 devices'):
    sharding.to_global(np.zeros((12, 2)), sharding.make_mesh())



def test_replicate_puts_a_full_copy_on_every_device():
  mesh = sharding.make_mesh()
  out = sharding.replicate(np.arange(6).reshape(3, 2), mesh)
  assert len(out.addressable_shards) == 8
  for shard in out.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), np.arange(6).reshape(3, 2))


def test_program_barrier_waits_only_on_multi_device_cpu_meshes():
  assert sharding.program_barrier(sharding.make_mesh()) is jax.block_until_ready
  single = sharding.program_barrier(sharding.make_mesh(jax.devices()[:1]))
  assert single is not jax.block_until_ready and single(3) == 3
