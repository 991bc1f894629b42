"""Tests of ood_jax.models: parameter counts against the papers and reference code, shapes, heads,
BatchNorm and dropout modes, bfloat16, and a few SGD steps.

The big backbones are only traced (`jax.eval_shape`), never compiled: XLA on CPU needs minutes for
WRN-28-10. Real forward passes use small inputs or scaled-down instances of the same modules.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ood_jax import layers
from ood_jax import losses
from ood_jax import models

# Classifier(backbone, 'dense', 10) parameter counts (BatchNorm scale and bias included, running
# statistics not). `published`: the papers' rounded figures. `reference`: the exact count of the
# common PyTorch CIFAR implementations of the same architecture, which a faithful port reproduces
# to the parameter: ResNet-18/34 with projection shortcuts (as kuangliu/pytorch-cifar), WRNs as the
# authors' code, DenseNet-BC-100 as andreasveit/densenet-pytorch; ResNet-20 is the option-A
# count 269,722 plus 2,752 for the two 1×1 conv + BN projections chosen here.
PARAMETER_COUNTS = {
    # name: (published, reference, feature map for 32 × 32 inputs)
    'resnet20': (0.27e6, 272_474, (8, 8, 64)),
    'resnet18': (11.2e6, 11_173_962, (4, 4, 512)),
    'resnet34': (21.3e6, 21_282_122, (4, 4, 512)),
    'wrn28_10': (36.5e6, 36_479_194, (8, 8, 640)),
    'wrn40_2': (2.2e6, 2_243_546, (8, 8, 128)),
    'wrn34_10': (46.2e6, 46_160_474, (8, 8, 640)),  # as TRADES / Madry et al.'s WRN-34-10
    'densenet_bc100': (0.77e6, 769_162, (8, 8, 342)),
    'densenet40_12': (1.0e6, None, (8, 8, 448)),
}


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _key(seed):
  # XLA on CPU takes seconds to compile each threefry draw in an init program; 'rbg' keys compile
  # about 4x faster and Flax treats them the same. A test-speed choice only.
  return jax.random.key(seed, impl='rbg')


def _init(model, x, seed=0):
  return jax.jit(functools.partial(model.init, train=False))(_key(seed), x)


def _abstract_init(model, x_shape, dtype=jnp.float32):
  x = jax.ShapeDtypeStruct(x_shape, dtype)
  return jax.eval_shape(functools.partial(model.init, train=False), _key(0), x)


def _images(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize('name', sorted(PARAMETER_COUNTS))
def test_parameter_counts_and_shapes_of_paper_backbones(name):
  published, reference, map_shape = PARAMETER_COUNTS[name]
  model = models.make_classifier(name, 'dense', 10)
  variables = _abstract_init(model, (2, 32, 32, 3))
  count = _count(variables['params'])
  assert abs(count - published) <= 0.02 * published, (name, count)
  if reference is not None:
    assert count == reference
  logits, features, feature_map = jax.eval_shape(
      functools.partial(model.apply, return_feature_map=True), variables,
      jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  assert logits.shape == (2, 10)
  assert features.shape == (2, map_shape[-1])
  assert feature_map.shape == (2,) + map_shape


def test_densenet40_12_count_by_hand():
  # No exact reference count is quoted for DenseNet-40-12, so count it: 16-channel stem, 3 blocks
  # of 12 layers (BN + 3×3 conv to 12 channels), two channel-preserving transitions, final BN, FC.
  total, channels = 3 * 9 * 16, 16
  for block in range(3):
    for _ in range(12):
      total += 2 * channels + 9 * channels * 12
      channels += 12
    if block < 2:
      total += 2 * channels + channels * channels
  total += 2 * channels + channels * 10 + 10
  variables = _abstract_init(models.make_classifier('densenet40_12', 'dense', 10), (2, 32, 32, 3))
  assert _count(variables['params']) == total


def test_small_backbone_counts_by_hand():
  # DigitsCNN on one channel: 3×3 convs 1→32→64→128 without bias, BN scale + bias per channel.
  cnn = _abstract_init(models.get_backbone('digits_cnn'), (2, 32, 32, 1))
  expected = sum(9 * c_in * c_out + 2 * c_out for c_in, c_out in ((1, 32), (32, 64), (64, 128)))
  assert _count(cnn['params']) == expected
  assert set(cnn) == {'params', 'batch_stats'}
  mlp = _abstract_init(models.get_backbone('mlp', hidden=(16, 8)), (2, 2))
  assert _count(mlp['params']) == (2 * 16 + 16) + (16 * 8 + 8)
  assert set(mlp) == {'params'}


def test_bfloat16_keeps_params_float32_and_outputs_float32():
  for name in ('resnet18', 'wrn28_10', 'densenet_bc100'):
    model = models.make_classifier(name, 'distance', 10, dtype=jnp.bfloat16)
    variables = _abstract_init(model, (2, 32, 32, 3))
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    outputs = jax.eval_shape(functools.partial(model.apply, return_feature_map=True), variables,
                             jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert all(out.dtype == jnp.float32 for out in outputs)


def test_bfloat16_computes_in_bfloat16_and_stays_close():
  x = _images((4, 32, 32, 1))
  model32 = models.make_classifier('digits_cnn', 'dense', 10)
  model16 = models.make_classifier('digits_cnn', 'dense', 10, dtype=jnp.bfloat16)
  variables = _init(model32, x)
  backbone16 = models.get_backbone('digits_cnn', dtype=jnp.bfloat16)
  backbone_vars = {k: v['backbone'] for k, v in variables.items()}
  feature_map = jax.eval_shape(functools.partial(backbone16.apply, train=False), backbone_vars, x)
  assert feature_map.dtype == jnp.bfloat16
  logits32, features32 = jax.jit(model32.apply)(variables, x)
  logits16, features16 = jax.jit(model16.apply)(variables, x)  # the same float32 parameters
  assert logits16.dtype == features16.dtype == jnp.float32
  np.testing.assert_allclose(features16, features32, rtol=0.05, atol=0.05)
  np.testing.assert_allclose(logits16, logits32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize('backbone,input_shape,map_shape', [
    (models.ResNet(stage_sizes=(1, 1), widths=(8, 16)), (3, 8, 8, 3), (3, 4, 4, 16)),
    (models.WideResNet(depth=10, width=2, dropout_rate=0.3), (3, 8, 8, 3), (3, 2, 2, 128)),
    (models.DenseNet(depth=10, growth_rate=4), (3, 8, 8, 3), (3, 2, 2, 9)),
    (models.DenseNet(depth=7, growth_rate=4, bottleneck=False, compression=1.0), (3, 8, 8, 2),
     (3, 2, 2, 28)),
    (models.DigitsCNN(), (3, 32, 32, 1), (3, 4, 4, 128)),
    (models.MLP(hidden=(16, 8)), (3, 2), (3, 8)),
])
def test_real_forward_of_small_instances(backbone, input_shape, map_shape):
  x = _images(input_shape)
  variables = _init(backbone, x)
  out = jax.jit(functools.partial(backbone.apply, train=False))(variables, x)
  assert out.shape == map_shape
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  # Every backbone ends in a ReLU, so pooled features are non-negative and not all dead at init.
  assert np.all(np.asarray(out) >= 0) and np.any(np.asarray(out) > 0)


def test_he_fan_out_initialisation():
  variables = _init(models.ResNet(stage_sizes=(1, 1), widths=(64, 128)), _images((1, 4, 4, 3)))
  kernels = {'/'.join(k.key for k in path[:-1]): np.asarray(leaf)
             for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params'])
             if path[-1].key == 'kernel'}
  assert len(kernels) == 6  # stem, 2 + 2 block convs, 1 projection
  for name, kernel in kernels.items():
    fan_out = kernel.shape[0] * kernel.shape[1] * kernel.shape[3]
    # N(0, 2 / fan_out), untruncated: the kurtosis of a normal is 3, of a ±2σ-truncated one 2.37.
    np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / fan_out), rtol=0.1, err_msg=name)
    if kernel.size > 50_000:
      z = kernel / kernel.std()
      np.testing.assert_allclose(np.mean(z**4), 3.0, atol=0.1, err_msg=name)


def test_one_channel_and_odd_sizes():
  variables = _abstract_init(models.get_backbone('resnet18'), (2, 32, 32, 1))
  assert variables['params']['stem_conv']['kernel'].shape == (3, 3, 1, 64)
  # Non-square, odd sizes follow PyTorch: stride-2 3×3 convs with padding 1 give ⌈n / 2⌉,
  # 2×2 pools ⌊n / 2⌋.
  for name, expected in (('resnet18', (1, 4, 3, 512)), ('densenet_bc100', (1, 7, 4, 342))):
    backbone = models.get_backbone(name)
    out = jax.eval_shape(functools.partial(backbone.apply, train=False),
                         _abstract_init(backbone, (1, 30, 18, 3)),
                         jax.ShapeDtypeStruct((1, 30, 18, 3), jnp.float32))
    assert out.shape == expected, name


@pytest.fixture(scope='module')
def digits_batch():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 32, 32, 1)).astype(np.float32)
  y = rng.integers(0, 5, size=6)
  return x, y


def test_classifier_projection_head(digits_batch):
  x, _ = digits_batch
  model = models.make_classifier('digits_cnn', 'projection', 5)
  variables = _init(model, x)
  embeddings, features = jax.jit(model.apply)(variables, x)
  assert embeddings.shape == (6, 128) and features.shape == (6, 128)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=-1), 1.0, rtol=1e-5)
  head = variables['params']['head']
  assert head['hidden']['kernel'].shape == (128, 128) and head['output']['kernel'].shape == (128, 128)


@pytest.mark.parametrize('head', ['dense', 'distance', 'mahalanobis'])  # the train-aware heads: below
def test_classifier_heads(head, digits_batch):
  x, _ = digits_batch
  model = models.make_classifier('digits_cnn', head, 5)
  variables = _init(model, x)
  apply = jax.jit(functools.partial(model.apply, return_feature_map=True))
  logits, features, feature_map = apply(variables, x)
  assert logits.shape == (6, 5) and features.shape == (6, 128) and feature_map.shape == (6, 4, 4, 128)
  assert logits.dtype == features.dtype == feature_map.dtype == jnp.float32
  np.testing.assert_allclose(features, np.asarray(feature_map).mean(axis=(1, 2)), rtol=1e-6)
  assert len(jax.eval_shape(model.apply, variables, x)) == 2
  params = variables['params']['head']
  f = np.asarray(features, np.float64)
  if head == 'dense':
    np.testing.assert_allclose(logits, f @ params['kernel'] + params['bias'], rtol=1e-5, atol=1e-5)
    # The SMOT class activation map: pooling commutes with the linear head, so the spatial mean of
    # CAM_y = Σ_d feature_map[..., d]·W[d, y] plus the bias is the logit of y.
    cam = np.einsum('bhwd,dk->bhwk', feature_map, params['kernel'])
    np.testing.assert_allclose(cam.mean(axis=(1, 2)) + params['bias'], logits, rtol=1e-5, atol=1e-5)
  elif head == 'distance':
    assert set(params) == {'prototypes'}
    np.testing.assert_allclose(logits, -np.linalg.norm(f[:, None] - params['prototypes'], axis=-1),
                               rtol=1e-5)
  else:
    assert set(params) == {'means', 'cholesky_raw'}
    expected = layers.mahalanobis_logits(features, params['means'],
                                         layers.cholesky_from_raw(params['cholesky_raw']))
    np.testing.assert_allclose(logits, expected, rtol=1e-5)


def test_classifier_with_module_head_and_vector_backbone():
  x = _images((4, 2))
  model = models.Classifier(models.MLP(hidden=(8,)), nn.Dense(3, use_bias=False), num_classes=3)
  variables = _init(model, x)
  logits, features, feature_map = jax.jit(
      functools.partial(model.apply, return_feature_map=True))(variables, x)
  assert logits.shape == (4, 3) and features.shape == (4, 8)
  np.testing.assert_array_equal(feature_map, features)
  np.testing.assert_allclose(logits, features @ variables['params']['head']['kernel'], rtol=1e-6)


def test_train_mode_updates_batch_stats_with_momentum_0_9(digits_batch):
  x, _ = digits_batch
  model = models.make_classifier('digits_cnn', 'dense', 5)
  variables = _init(model, x)
  assert np.all(np.asarray(variables['batch_stats']['backbone']['bn1']['mean']) == 0)
  eval_apply = jax.jit(model.apply)
  train_apply = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))
  (train_logits, _), updates = train_apply(variables, x)
  # Reference for the first BN: its input is conv1(x) (3×3, padding 1, no bias), and the running
  # mean starts at 0, so after one step it is 0.1 · the batch mean.
  kernel = variables['params']['backbone']['conv1']['kernel']
  conv1 = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(updates['batch_stats']['backbone']['bn1']['mean'],
                             0.1 * np.asarray(conv1).mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  # Eval mode normalises with running statistics, so an example's output ignores the rest of the
  # batch; train mode normalises with batch statistics, so it does not.
  others_changed = x.copy()
  others_changed[1:] = 3.0 * x[::-1][:-1] + 1.0
  eval_logits, _ = eval_apply(variables, x)
  eval_changed, _ = eval_apply(variables, others_changed)
  np.testing.assert_allclose(eval_changed[0], eval_logits[0], rtol=1e-5, atol=1e-6)
  (train_changed, _), _ = train_apply(variables, others_changed)
  assert not np.allclose(train_changed[0], train_logits[0], atol=1e-3)


def test_dropout_only_in_train_mode():
  x = _images((2, 8, 8, 3))
  model = models.Classifier(models.WideResNet(depth=10, width=1, dropout_rate=0.5), 'dense', 4)
  variables = _init(model, x)

  @functools.partial(jax.jit, static_argnames='train')
  def logits(rng, *, train):
    outputs = model.apply(variables, x, train=train, rngs={'dropout': rng}, mutable=['batch_stats'])
    return outputs[0][0]

  # Eval mode ignores the dropout rng; train mode draws masks from it.
  np.testing.assert_array_equal(logits(_key(1), train=False), logits(_key(2), train=False))
  assert not np.allclose(logits(_key(1), train=True), logits(_key(2), train=True))
  np.testing.assert_array_equal(logits(_key(3), train=True), logits(_key(3), train=True))
  # Eval mode needs no 'dropout' rng at all, nor does train mode when dropout_rate = 0 (tracing
  # would raise if an rng were requested).
  jax.eval_shape(model.apply, variables, x)
  plain = models.Classifier(models.WideResNet(depth=10, width=1), 'dense', 4)
  jax.eval_shape(functools.partial(plain.apply, train=True, mutable=['batch_stats']),
                 _abstract_init(plain, x.shape), x)
  assert models.get_backbone('wrn28_10', dropout_rate=0.3).dropout_rate == 0.3


def test_unknown_names_and_bad_configurations_raise():
  with pytest.raises(ValueError, match='resnet20.*resnet18.*wrn28_10.*densenet_bc100.*mlp'):
    models.get_backbone('resnet50')
  with pytest.raises(ValueError, match='dense, distance, mahalanobis'):
    models.make_classifier('resnet20', 'softmax', 10)
  with pytest.raises(ValueError, match='dense, distance, mahalanobis'):
    models.Classifier(models.MLP(), 'cosine', 10)
  with pytest.raises(TypeError, match='head'):
    models.Classifier(models.MLP(), 3, 10)
  with pytest.raises(ValueError, match='num_classes'):
    models.make_classifier('mlp', 'dense', 0)
  with pytest.raises(TypeError, match='unexpected keyword'):
    models.get_backbone('resnet18', dropout_rate=0.3)
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  bad = [
      models.WideResNet(depth=27),
      models.DenseNet(depth=41, bottleneck=True),
      models.DenseNet(depth=100, compression=0.0),
      models.ResNet(stage_sizes=(2, 2), widths=(16,)),
  ]
  for backbone in bad:
    with pytest.raises(ValueError):
      _abstract_init(backbone, x.shape)
  with pytest.raises(ValueError, match='images'):
    _abstract_init(models.get_backbone('resnet20'), (32, 32, 3))
  with pytest.raises(TypeError, match='images'):
    _abstract_init(models.get_backbone('resnet20'), (1, 32, 32, 3), jnp.uint8)


def test_sgd_steps_reduce_isomax_loss(digits_batch):
  x, y = digits_batch
  model = models.make_classifier('digits_cnn', 'distance', 5)
  variables = _init(model, x)
  params, batch_stats = variables['params'], variables['batch_stats']
  optimizer = optax.sgd(0.05, momentum=0.9)
  opt_state = optimizer.init(params)

  def loss_fn(params, batch_stats):
    (logits, _), updates = model.apply({'params': params, 'batch_stats': batch_stats}, x,
                                       train=True, mutable=['batch_stats'])
    return jnp.mean(losses.isomax(logits, y)), updates['batch_stats']

  @jax.jit
  def step(params, batch_stats, opt_state):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  history = []
  for _ in range(8):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
    history.append(float(loss))
  # Zero prototypes make every distance equal at initialisation: the loss starts at exactly log K.
  np.testing.assert_allclose(history[0], np.log(5), rtol=1e-5)
  assert history[-1] < 0.7 * history[0], history


def test_classifier_passes_train_and_head_kwargs_to_the_openood_heads():
  """T2FNorm, ConfBranch and G-ODIN heads compute other outputs in training; the classifier hands them `train`."""
  x = _images((6, 3))
  for head, kwargs, train_width in (('t2fnorm', {'temperature': 0.5}, 4), ('confidence', {'budget': 0.2}, 6),
                                    ('godin', {}, 4)):
    model = models.make_classifier('mlp', head, 4, hidden=(8,), head_kwargs=kwargs)
    variables = _init(model, x)
    (train_logits, features), _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    logits, same_features = model.apply(variables, x, train=False)
    assert train_logits.shape == (6, train_width) and logits.shape == (6, 4), head
    np.testing.assert_array_equal(features, same_features)  # the features stay the raw pooled ones
    assert not np.allclose(train_logits[:, :4], logits), head
  head = models.make_classifier('mlp', 't2fnorm', 4, hidden=(8,), head_kwargs={'temperature': 0.5})
  assert dict(head.head_kwargs) == {'temperature': 0.5} and hash(head) == hash(head)  # inference caches by model
  with pytest.raises(TypeError):
    _init(models.make_classifier('mlp', 'godin', 4, hidden=(8,), head_kwargs={'temperature': 0.5}), x)
