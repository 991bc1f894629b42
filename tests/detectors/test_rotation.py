"""RotPred's score (Hendrycks et al. 2019; OpenOOD's RotPredPostprocessor) against a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ood_jax import detectors
from ood_jax import models
from ood_jax.detectors import rotation


def _np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _np_rotpred(logits, rotation_logits):
  """OpenOOD's postprocessor literally: kl_div(d1, d2) = Σ d1·log2(d1 / d2) over d1 ≠ 0, in bits."""
  def kl_div(d1, d2):
    return np.sum(np.where(d1 != 0, d1 * np.log2(np.where(d1 != 0, d1, 1.0) / d2), 0.0), axis=1)

  k = logits.shape[1]
  cls_loss = kl_div(np.full(logits.shape, 1.0 / k), _np_softmax(logits))
  rot_losses = [kl_div(np.eye(4)[np.full(len(logits), r)], _np_softmax(rotation_logits[:, r])) for r in range(4)]
  return cls_loss - sum(rot_losses) / 4.0


def _toy_apply_fn(seed=0, k=3):
  """A network that sees orientation: a random linear map of the flattened image to K + 4 logits."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=(6 * 6 * 2, k + 4)).astype(np.float32) * 0.3

  def apply_fn(x):
    out = jnp.reshape(x, (x.shape[0], -1)) @ w
    return {'logits': out[:, :k], 'rotation_logits': out[:, k:]}

  return apply_fn, w


def test_rotpred_score_matches_openoods_postprocessor_in_bits():
  rng = np.random.default_rng(1)
  z = (rng.normal(size=(7, 5)) * 3).astype(np.float32)
  rho = (rng.normal(size=(7, 4, 4)) * 3).astype(np.float32)
  np.testing.assert_allclose(np.asarray(jax.jit(rotation.rotpred_score)(z, rho)), _np_rotpred(z, rho), rtol=1e-5,
                             atol=1e-5)
  # A uniform class prediction and sure rotations: KL(u ‖ u) = 0 and −log2 1 = 0.
  sure = np.broadcast_to(np.eye(4) * 50.0, (1, 4, 4)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(rotation.rotpred_score(np.zeros((1, 5), np.float32), sure)), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match=r'rotation_logits must have shape \(7, R, R\)'):
    rotation.rotpred_score(z, rho[:, :3])


def test_rotpred_turns_the_images_runs_the_model_once_and_scores_every_turn():
  apply_fn, w = _toy_apply_fn()
  x = np.random.default_rng(2).normal(size=(5, 6, 6, 2)).astype(np.float32)
  det = detectors.get('rotpred')
  got = np.asarray(jax.jit(lambda v: det.score((), {'inputs': v, 'apply_fn': apply_fn}))(x))
  # np.rot90 over (H, W) is torch.rot90 over OpenOOD's NCHW dims [2, 3].
  outs = [np.rot90(x, r, axes=(1, 2)).reshape(5, -1).astype(np.float64) @ w for r in range(4)]
  want = _np_rotpred(outs[0][:, :3], np.stack([o[:, 3:] for o in outs], axis=1))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  calls = []
  det.score((), {'inputs': x, 'apply_fn': lambda v: calls.append(v.shape) or apply_fn(v)})
  assert calls == [(20, 6, 6, 2)]  # the four turns in one batch
  pair = det.score((), {'inputs': x, 'apply_fn': lambda v: tuple(apply_fn(v).values())})
  np.testing.assert_allclose(np.asarray(pair), got, rtol=1e-6, atol=1e-6)


def test_rotpred_reads_a_classifiers_rotation_head_and_refuses_models_without_one():
  x = np.random.default_rng(3).normal(size=(4, 6, 6, 1)).astype(np.float32)
  model = models.make_classifier('mlp', 'rotation', 3, hidden=(8,))
  variables = model.init(jax.random.key(0), x)
  logits, features = model.apply(variables, x)
  assert logits.shape == (4, 3)  # inference: the class logits only
  (train_out, _), _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
  head = variables['params']['head']
  outputs = rotation.model_apply_fn(model, variables)(x)
  np.testing.assert_allclose(outputs['rotation_logits'], features @ head['rotation_kernel'] + head['rotation_bias'],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(train_out, np.concatenate([logits, outputs['rotation_logits']], axis=1), rtol=1e-5,
                             atol=1e-6)  # training: [class logits, rotation logits]
  det = detectors.get('rotpred')
  assert np.all(np.isfinite(det.score((), {'inputs': x, 'apply_fn': rotation.model_apply_fn(model, variables)})))
  dense = models.make_classifier('mlp', 'dense', 3, hidden=(8,))
  dense_fn = rotation.model_apply_fn(dense, dense.init(jax.random.key(0), x))
  with pytest.raises(ValueError, match='rotation head'):
    det.score((), {'inputs': x, 'apply_fn': dense_fn})
  with pytest.raises(ValueError, match='runs the model'):
    det.score((), {'logits': logits})
  with pytest.raises(ValueError, match='must be square'):
    det.score((), {'inputs': x[:, :, :5], 'apply_fn': dense_fn})
  # 'all' where no model is at hand (the evaluators' logits / features / head) leaves it out, as ODIN.
  assert 'rotpred' not in [d.name for d in detectors.resolve('all', available=('logits', 'features', 'head'))]
