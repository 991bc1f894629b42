"""Methods: their losses equal the papers' objectives composed by hand; outlier training and
fine-tuning (`init_from`) run end to end on the offline digits benchmark."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import digits as digits_config
from ood_jax import detectors
from ood_jax.trainer import finetune
from ood_jax import methods
from ood_jax import models
from ood_jax.methods import mixup as mixup_lib
from ood_jax.trainer import step
from ood_jax.trainer import train


def _np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_lse(z):
  z = np.asarray(z, np.float64)
  top = z.max(-1)
  return top + np.log(np.exp(z - top[:, None]).sum(-1))


def _batch(seed=0, n_in=6, n_out=10, k=4, negative=False):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n_in + n_out, k)).astype(np.float32) * 3
  if negative:
    logits = -np.abs(logits)
  labels = rng.integers(0, k, size=n_in).astype(np.int32)
  return jnp.asarray(logits), {'label': jnp.asarray(labels)}, logits[:n_in], logits[n_in:], labels


def test_registry_lists_names():
  assert {'softmax', 'isomax', 'dm', 'one_vs_all', 'distance_one_vs_all', 'oe', 'energy', 'ice'} <= set(methods.METHODS)
  with pytest.raises(ValueError, match='valid methods: .*oe'):
    methods.get_method('no_such_method')


def test_oe_objective():
  logits, batch, z_in, z_out, y = _batch()
  method = methods.get_method('oe')
  loss, aux = jax.jit(lambda z, b: method.loss(z, None, b, **method.hparams))(logits, batch)
  ce = -np.mean(_np_log_softmax(z_in)[np.arange(len(y)), y])
  uniform = np.mean(-np.mean(_np_log_softmax(z_out), axis=-1))  # Wu et al. 2022, eq. 0.16
  np.testing.assert_allclose(float(loss), ce + 0.5 * uniform, rtol=1e-5)
  np.testing.assert_allclose(float(aux['accuracy']), np.mean(z_in.argmax(-1) == y))


@pytest.mark.parametrize('m_in,m_out', [(-25.0, -7.0), (-3.0, -1.0)])
def test_energy_objective(m_in, m_out):
  logits, batch, z_in, z_out, y = _batch(seed=1)
  method = methods.get_method('energy')
  hp = {**method.hparams, 'margin_in': m_in, 'margin_out': m_out}
  loss, _ = jax.jit(lambda z, b: method.loss(z, None, b, **hp))(logits, batch)
  ce = -np.mean(_np_log_softmax(z_in)[np.arange(len(y)), y])
  e_in, e_out = -_np_lse(z_in), -_np_lse(z_out)
  reg = np.mean(np.maximum(e_in - m_in, 0) ** 2) + np.mean(np.maximum(m_out - e_out, 0) ** 2)
  np.testing.assert_allclose(float(loss), ce + 0.1 * reg, rtol=1e-5)


def test_ice_objective():
  logits, batch, h_in, h_out, y = _batch(seed=2, negative=True)
  method = methods.get_method('ice')
  assert method.head == 'mahalanobis' and method.scores[:2] == ('max_logit', 'max_likelihood')
  loss, _ = jax.jit(lambda z, b: method.loss(z, None, b, **method.hparams))(logits, batch)
  ce = -np.mean(_np_log_softmax(h_in)[np.arange(len(y)), y])
  ice_in = np.mean(-h_in.astype(np.float64)[np.arange(len(y)), y])  # eq. 0.14
  ice_out = np.mean(-np.log(1 - np.exp(h_out.astype(np.float64).max(-1))))  # eq. 0.13
  np.testing.assert_allclose(float(loss), ce + 1.0 * (ice_in + ice_out), rtol=1e-5)


def test_outlier_methods_feed_images_and_outliers_through_one_forward():
  batch = {'image': jnp.zeros((3, 2, 2, 1)), 'outlier': jnp.ones((5, 2, 2, 1)), 'label': jnp.zeros(3, jnp.int32)}
  for name in ('oe', 'energy', 'ice'):
    inputs = methods.get_method(name).inputs(batch, jax.random.key(0), {}, None)
    assert inputs.shape == (8, 2, 2, 1)
    np.testing.assert_array_equal(inputs[:3], 0.0)
    np.testing.assert_array_equal(inputs[3:], 1.0)


def test_outlier_method_without_source_fails_early(tmp_path):
  config = digits_config.get_config('smoke')
  config.method = 'oe'
  config.outliers.source = None
  with pytest.raises(ValueError, match='outliers.source'):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def _smoke(method, **overrides):
  config = digits_config.get_config('smoke')
  config.method = method
  config.num_steps = 8
  config.log_every_steps = 4
  config.checkpoint_every_steps = 8
  config.outliers.batch_size = 64
  config.eval.ood_sets = ('digits/near', 'digits/photos')
  for key, value in overrides.items():
    config[key] = value
  return config


def test_outlier_exposure_trains_end_to_end_and_ice_fine_tunes_from_its_checkpoint(tmp_path):
  base = str(tmp_path / 'energy')
  results = train.train_and_evaluate(_smoke('energy'), base)
  assert results['default_score'] == 'energy'
  assert set(results['ood']['digits/near']) == {'energy', 'max_softmax', 'max_logit'}

  config = _smoke('ice', init_from=base)
  config.optimizer.learning_rate = 0.01  # the paper's fine-tuning rate
  config.optimizer.grad_clip_norm = 1.0  # without it the squared-distance loss diverges within steps
  config.optimizer.schedule = 'cosine'
  results = train.train_and_evaluate(config, str(tmp_path / 'ice'))
  assert results['method'] == 'ice' and 0.0 <= results['in_distribution']['accuracy'] <= 1.0
  for per_score in results['ood'].values():
    assert 0.0 <= per_score['max_likelihood']['auroc'] <= 1.0

  # With a zero learning rate the fine-tuned backbone is bitwise the Energy run's backbone, and the
  # Mahalanobis head (which does not fit the dense one) is freshly initialised.
  frozen = _smoke('ice', init_from=base)
  frozen.optimizer.learning_rate = 0.0
  frozen.optimizer.schedule = 'constant'
  frozen.eval.ood_sets = ()
  train.train_and_evaluate(frozen, str(tmp_path / 'frozen'))
  source = finetune.load_pretrained(base)['params']
  tuned = finetune.load_pretrained(str(tmp_path / 'frozen'))['params']
  for a, b in zip(jax.tree.leaves(source['backbone']), jax.tree.leaves(tuned['backbone'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert set(tuned['head']) == {'means', 'cholesky_raw'} and set(source['head']) == {'kernel', 'bias'}


def test_class_activation_map_matches_explicit_computation():
  from ood_jax.methods import smot  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  fmap = rng.normal(size=(2, 4, 4, 5)).astype(np.float32)
  kernel = rng.normal(size=(5, 3)).astype(np.float32)
  labels = np.array([2, 0])
  cam = np.asarray(jax.jit(smot.class_activation_map, static_argnums=3)(fmap, kernel, labels, (4, 4)))
  for b in range(2):
    raw = np.zeros((4, 4))
    for i in range(4):
      for j in range(4):
        raw[i, j] = sum(fmap[b, i, j, d] * kernel[d, labels[b]] for d in range(5))
    expected = 255 * (raw - raw.min()) / (raw.max() - raw.min())
    np.testing.assert_allclose(cam[b], expected, rtol=1e-4, atol=1e-3)
  # Upsampling 4 → 8 keeps the range [0, 255] and the location of the maximum's neighbourhood.
  up = np.asarray(smot.class_activation_map(fmap, kernel, labels, (8, 8)))
  assert up.shape == (2, 8, 8) and up.min() >= 0 and up.max() <= 255 + 1e-3


def test_smot_mask_and_soft_labels_follow_the_paper():
  from ood_jax.methods import smot  # pylint: disable=g-import-not-at-top
  images = np.ones((2, 2, 2, 3), np.float32)
  cam = np.array([[[0.0, 100.0], [200.0, 255.0]], [[10.0, 20.0], [30.0, 40.0]]], np.float32)
  threshold = np.array([150.0, 25.0], np.float32)
  masked = np.asarray(smot.mask_images(images, cam, threshold))
  # M = 0 where CAM ≥ t, else 1 (paper eq. 7).
  np.testing.assert_array_equal(masked[..., 0], [[[1, 1], [0, 0]], [[1, 1], [0, 0]]])
  np.testing.assert_array_equal(masked[..., 0], masked[..., 2])

  method = methods.get_method('smot')
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  batch = {'label': jnp.array([0, 1, 2, 0]), 'threshold': jnp.array([255.0, 245.0, 180.0, 0.0])}
  loss, aux = jax.jit(lambda z, b: method.loss(z, None, b, **method.hparams))(logits, batch)
  eps = 1 - np.exp((np.array([255.0, 245.0, 180.0, 0.0]) - 255) / 10)  # eq. 9, T = 10
  y = np.eye(3)[[0, 1, 2, 0]]
  soft = (1 - eps[:, None]) * y + eps[:, None] / 3
  ls = _np_log_softmax(np.asarray(logits))
  expected = np.mean(0.9 * -np.sum(y * ls[:4], -1) + 0.1 * -np.sum(soft * ls[4:], -1))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  np.testing.assert_allclose(float(aux['smoothing']), eps.mean(), rtol=1e-5)


def test_smot_trains_from_a_base_model_checkpoint(tmp_path):
  base = str(tmp_path / 'base')
  train.train_and_evaluate(_smoke('softmax'), base)
  config = _smoke('smot', base_model=base)
  results = train.train_and_evaluate(config, str(tmp_path / 'smot'))
  assert results['method'] == 'smot' and results['default_score'] == 'max_softmax'
  logged = [json.loads(line) for line in open(tmp_path / 'smot' / 'metrics.jsonl')]
  # ε(t) with t = 255·Beta(50, 20) ≈ 182 and T = 10 is ≈ 1 − e^(−7.3).
  assert 0.99 < logged[0]['smoothing'] < 1.0

  missing = _smoke('smot')
  with pytest.raises(ValueError, match='base_model'):
    train.train_and_evaluate(missing, str(tmp_path / 'no_base'))


@pytest.mark.parametrize('method', ['supcon', 'reweightood'])
def test_contrastive_methods_train_and_evaluate_by_features(tmp_path, method):
  config = _smoke(method, augment='two_views')
  config.eval.knn_k = 10
  config.eval.detectors = 'all'  # an embedding model gets the feature detectors
  results = train.train_and_evaluate(config, str(tmp_path / method))
  ind = results['in_distribution']
  assert results['default_score'] == 'knn'
  feature_only = {d.name for d in detectors.resolve('all', available=('features',))}
  assert set(results['detectors']['ood']['digits/near']) == feature_only and 'errors' not in results['detectors']
  assert 0.0 <= ind['accuracy'] <= 1.0 and sum(ind['reliability']['counts']) == 359  # the linear probe
  assert len(ind['mes_radius']) == 6 and 0.0 < ind['mes_radius_mean'] <= 2.0
  assert -1.0 <= ind['dispersion_mean'] <= 1.0
  for per_score in results['ood'].values():
    assert set(per_score) == {'knn', 'mahalanobis'}
  assert 'MES radius' in (tmp_path / method / 'results.md').read_text()


def test_contrastive_method_needs_two_views(tmp_path):
  with pytest.raises(ValueError, match="augment='two_views'"):
    train.train_and_evaluate(_smoke('supcon'), str(tmp_path / 'run'))




# ------------------------------------------------------------------------------------------
# Training baselines of OpenOOD v1.5: the objectives composed by hand, and a few steps of each on a toy problem.

OPENOOD_BASELINES = ('logitnorm', 't2fnorm', 'mixup', 'regmixup', 'confbranch', 'godin')


def test_head_hyperparameters_are_method_hyperparameters():
  assert methods.get_method('t2fnorm').head_hparams == ('temperature',)
  with pytest.raises(ValueError, match=r"head_hparams \['tau'\]"):
    methods.Method(name='bad', head='t2fnorm', loss=None, probabilities=None, scores=(), head_hparams=('tau',))


def test_mix_batch_is_a_pure_function_of_the_key():
  rng = np.random.default_rng(5)
  images = rng.normal(size=(8, 2, 2, 3)).astype(np.float32)
  labels = np.arange(8, dtype=np.int32)
  mix_fn = jax.jit(lambda key: mixup_lib.mix_batch(images, labels, key, alpha=1.0))
  mixed, partners, lam = mix_fn(jax.random.key(3))
  again = mix_fn(jax.random.key(3))
  for a, b in zip((mixed, partners, lam), again):
    np.testing.assert_array_equal(a, b)  # what makes a resumed run mix as an uninterrupted one
  assert not np.array_equal(mix_fn(jax.random.key(4))[1], partners)
  assert sorted(np.asarray(partners)) == list(range(8)) and 0.0 <= float(lam) <= 1.0  # a permutation, one λ
  np.testing.assert_allclose(mixed, float(lam) * images + (1 - float(lam)) * images[np.asarray(partners)],
                             rtol=1e-5, atol=1e-6)
  batch = {'image': jnp.asarray(images), 'label': jnp.asarray(labels)}
  inputs, extra = methods.get_method('regmixup').inputs(batch, jax.random.key(3), {'alpha': 1.0}, None)
  np.testing.assert_array_equal(inputs[:8], images)  # [x; x̃] through one forward pass
  np.testing.assert_allclose(inputs[8:], mixed, rtol=1e-6)
  np.testing.assert_array_equal(extra['partner_label'], partners)


def test_regmixup_and_mixup_objectives():
  logits, batch, z_clean, z_mixed, y = _batch(seed=6, n_in=6, n_out=6)
  partners = np.roll(y, 2)
  batch = {**batch, 'partner_label': jnp.asarray(partners), 'mix': jnp.float32(0.4)}
  regmixup = methods.get_method('regmixup')
  loss, aux = jax.jit(lambda z, b: regmixup.loss(z, None, b, **regmixup.hparams))(logits, batch)
  ce = lambda z, labels: -_np_log_softmax(z)[np.arange(len(labels)), labels]
  # The reference code's F.cross_entropy over the 2B rows [x; x̃]: half of the mean of CE + mixup CE.
  want = 0.5 * np.mean(ce(z_clean, y) + 0.4 * ce(z_mixed, y) + 0.6 * ce(z_mixed, partners))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(aux['accuracy']), np.mean(z_clean.argmax(-1) == y))
  mixup = methods.get_method('mixup')
  loss, _ = jax.jit(lambda z, b: mixup.loss(z, None, b, **mixup.hparams))(logits[:6], batch)
  np.testing.assert_allclose(float(loss), np.mean(0.4 * ce(z_clean, y) + 0.6 * ce(z_clean, partners)), rtol=1e-5)


def test_confbranch_objective_weighs_with_the_heads_lambda_and_draws_hints():
  method = methods.get_method('confbranch')
  assert method.head == 'confidence' and method.scores[0] == 'energy'  # energy of its logits = log c
  rng = np.random.default_rng(7)
  z, s, y = rng.normal(size=(8, 3)) * 2, rng.normal(size=8), rng.integers(0, 3, 8)
  hints = np.array([True, False] * 4)
  outputs = np.concatenate([z, s[:, None], np.full((8, 1), 0.25)], axis=1).astype(np.float32)
  batch = {'label': jnp.asarray(y, jnp.int32), 'hints': jnp.asarray(hints)}
  loss, aux = jax.jit(lambda o, b: method.loss(o, None, b, **method.hparams))(outputs, batch)
  p, c = np.exp(_np_log_softmax(z)), 1 / (1 + np.exp(-s))
  c_used = np.where(hints, c, 1.0)
  p_y = c_used * p[np.arange(8), y] + (1 - c_used)  # DeVries & Taylor 2018: p' = c·p + (1 − c)·y
  np.testing.assert_allclose(float(loss), np.mean(-np.log(p_y) - 0.25 * np.log(c)), rtol=1e-5)
  assert float(aux['lambda']) == 0.25
  _, extra = method.inputs({'image': jnp.zeros((4000, 1)), 'label': jnp.zeros(4000, jnp.int32)},
                           jax.random.key(0), method.hparams, None)
  assert 0.45 < float(jnp.mean(extra['hints'])) < 0.55  # hints on a random half


def _toy_problem(n=64, k=4, seed=8):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, k, n)
  x = rng.normal(size=(k, 8))[labels] * 2 + rng.normal(size=(n, 8))
  return {'image': jnp.asarray(x.reshape(n, 2, 4, 1), jnp.float32), 'label': jnp.asarray(labels, jnp.int32)}


@pytest.mark.parametrize('name', OPENOOD_BASELINES)
def test_openood_baselines_train_on_a_toy_problem(name):
  method = methods.get_method(name)
  model = models.make_classifier('mlp', method.head, 4, hidden=(32,),
                                 head_kwargs={k: method.hparams[k] for k in method.head_hparams})
  optimizer = optax.adam(1e-2)
  state = step.create_state(model, optimizer, (2, 4, 1), jax.random.key(0))
  train_step = jax.jit(functools.partial(step.train_step, model=model, method=method, optimizer=optimizer,
                                         schedule=lambda s: 1e-2, hparams=method.hparams, key=jax.random.key(1)))
  batch, values = _toy_problem(), []
  for _ in range(40):
    state, logged = train_step(state, batch)
    values.append(float(logged['loss']))
  assert np.all(np.isfinite(values)) and int(state.bad_step) == -1
  assert np.mean(values[-5:]) < 0.7 * np.mean(values[:5]), values
  logits, _ = model.apply(step.model_variables(state.params, state.batch_stats), batch['image'])
  assert logits.shape == (64, 4) and np.mean(np.argmax(logits, -1) == batch['label']) > 0.8


def test_openood_baselines_train_and_evaluate_from_the_digits_config(tmp_path):
  # The MLP: the trainer path under test (inputs, head, loss, evaluation of each method's outputs) does not
  # depend on the backbone, and it compiles in a second where the CNN takes four.
  for name in OPENOOD_BASELINES:
    config = _smoke(name, backbone='mlp')
    config.eval.ood_sets = ('digits/near',)
    results = train.train_and_evaluate(config, str(tmp_path / name))
    method = methods.get_method(name)
    assert results['method'] == name and results['default_score'] == method.scores[0]
    assert set(results['ood']['digits/near']) == set(method.scores)
    assert 0.0 <= results['in_distribution']['accuracy'] <= 1.0 and results['in_distribution']['nll'] > 0


# ------------------------------------------------------------------------------------------
# RotPred (Hendrycks et al. 2019) and MixOE (Zhang et al. 2023).


def test_rotpred_turns_the_batch_and_composes_openoods_two_cross_entropies():
  method = methods.get_method('rotpred')
  assert method.head == 'rotation' and method.model_scores == ('rotpred',)
  assert 'rotpred' in detectors.names() and detectors.get('rotpred').needs == {'model'}
  images = np.random.default_rng(9).normal(size=(3, 4, 4, 2)).astype(np.float32)
  turned = np.asarray(jax.jit(lambda x: method.inputs({'image': x}, None, method.hparams, None))(images))
  want = np.concatenate([np.rot90(images, r, axes=(1, 2)) for r in range(4)])  # torch.rot90(x, r, [2, 3]) in NCHW
  np.testing.assert_array_equal(turned, want)
  with pytest.raises(ValueError, match='must be square'):
    method.inputs({'image': jnp.zeros((2, 4, 3, 1))}, None, method.hparams, None)
  rng = np.random.default_rng(10)
  outputs = (rng.normal(size=(12, 5 + 4)) * 2).astype(np.float32)  # [4B, K + 4]: class logits, rotation logits
  y = np.array([0, 4, 2], np.int32)
  loss, aux = jax.jit(lambda o, b: method.loss(o, None, b, **method.hparams))(outputs, {'label': jnp.asarray(y)})
  # OpenOOD's RotPredTrainer: F.cross_entropy(logits[:B], y) + F.cross_entropy(rot_logits, [0]*B + ... + [3]*B).
  rotation_targets = np.repeat(np.arange(4), 3)
  want = (np.mean(-_np_log_softmax(outputs[:3, :5])[np.arange(3), y]) +
          np.mean(-_np_log_softmax(outputs[:, 5:])[np.arange(12), rotation_targets]))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(float(aux['rotation_accuracy']), np.mean(outputs[:, 5:].argmax(-1) == rotation_targets))


def test_mix_outliers_pastes_one_box_of_the_outliers_and_mixes_pure_in_the_key():
  rng = np.random.default_rng(11)
  images = rng.normal(size=(3, 8, 8, 2)).astype(np.float32)
  outliers = rng.normal(size=(3, 8, 8, 2)).astype(np.float32) + 10.0  # never equal to an image pixel
  method = methods.get_method('mixoe')
  batch = {'image': images, 'label': np.arange(3, dtype=np.int32), 'outlier': np.concatenate([outliers, outliers])}
  both = jax.jit(lambda keys: (  # one compilation: the two ops over many keys, and MixOE's inputs
      jax.vmap(lambda k: [mixup_lib.mix_outliers(images, outliers, k, alpha=0.1, beta=1.0, op=op)
                          for op in ('cutmix', 'mixup')])(keys),
      method.inputs(batch, keys[0], method.hparams, None)))
  keys = jax.random.split(jax.random.key(0), 400)
  ((mixed, lam), (mixed_up, lam_up)), (inputs, extra) = jax.tree.map(np.asarray, both(keys))
  again = np.asarray(both(keys)[0][0][0])
  np.testing.assert_array_equal(mixed, again)  # a function of the key alone: what bitwise resume needs
  for m, share in zip(mixed[:50], lam[:50]):
    from_outlier = (m == outliers)
    assert np.all(from_outlier | (m == images))
    box = from_outlier[0, :, :, 0]
    np.testing.assert_array_equal(from_outlier, np.broadcast_to(box[None, :, :, None], m.shape))  # one box, all rows
    rows, columns = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    if box.any():  # a rectangle
      assert box[rows.min():rows.max() + 1, columns.min():columns.max() + 1].all()
      assert box.sum() == rows.size * columns.size
    np.testing.assert_allclose(share, 1 - box.mean(), rtol=1e-6)  # λ = the share of the image's pixels left
  np.testing.assert_allclose(mixed_up, lam_up[:, None, None, None, None] * images +
                             (1 - lam_up[:, None, None, None, None]) * outliers, rtol=1e-5, atol=1e-5)
  # λ ~ Beta(0.1, 1), mean 1/11: mostly outlier. The box (even half-sides, clipped) leaves a little more image.
  assert abs(lam_up.mean() - 1 / 11) < 0.03 and lam.mean() >= lam_up.mean()
  # MixOE feeds [x; x̃] through one forward pass, x̃ mixing image i with outlier i (the first B of the stream).
  np.testing.assert_array_equal(inputs[:3], images)
  np.testing.assert_array_equal(inputs[3:], mixed[0])
  assert float(extra['mix']) == float(lam[0])
  with pytest.raises(ValueError, match='outlier batch'):
    jax.eval_shape(lambda b: method.inputs(b, keys[0], method.hparams, None), {**batch, 'outlier': outliers[:2]})
  with pytest.raises(ValueError, match='must be one of'):
    mixup_lib.mix_outliers(images, outliers, keys[0], alpha=0.1, beta=1.0, op='cut')
  with pytest.raises(ValueError, match='outliers must have the shape'):
    mixup_lib.mix_outliers(images, outliers[:2], keys[0], alpha=0.1, beta=1.0)


def test_mixoe_composes_openoods_loss():
  method = methods.get_method('mixoe')
  assert method.needs_outliers and method.hparams == {'alpha': 0.1, 'beta': 1.0, 'mix_op': 'cutmix', 'weight': 1.0}
  logits, labelled, z_in, z_mixed, y = _batch(seed=13, n_in=6, n_out=6, k=5)
  loss, _ = jax.jit(lambda z, b: method.loss(z, None, b, **method.hparams))(
      logits, {**labelled, 'mix': jnp.float32(0.2)})
  # OpenOOD's MixOETrainer: CE(net(x), y) + lambda_oe·SoftCE(net(x̃), λ·onehot(y) + (1 − λ)·uniform).
  target = 0.2 * np.eye(5)[y] + 0.8 / 5
  want = np.mean(-_np_log_softmax(z_in)[np.arange(6), y]) + np.mean(-np.sum(target * _np_log_softmax(z_mixed), -1))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)

