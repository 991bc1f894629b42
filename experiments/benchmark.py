r"""Training-step cost of each logit head relative to the dense head, on one backbone.

  python -m experiments.benchmark [--model=resnet18 --batch_size=128 --dtype=float32 \
      --heads=dense,distance,mahalanobis --steps=5 --warmup=2 --rounds=5]

One jitted step = forward, backward and an SGD (momentum 0.9) update of a `Classifier(backbone, head)`
on random 32×32×3 inputs, state donated, on one device, compiled with the trainer's `ood_jax.trainer.xla_options`
(`--xla_cpu_defaults`: without). Every head trains with the same softmax cross-entropy, so the differences
are the heads' own cost (affine, −‖f − p_k‖, triangular-solve
Mahalanobis) and nothing else. All heads are compiled and warmed up first; then `rounds` rounds time
`steps` steps of each head in turn from its initial state, blocking on the result, so slow drift of
the machine affects every head alike. The ratio uses each head's best round: other load on the machine only ever adds
time, so the minimum is the least disturbed estimate (the median is printed beside it).

Runtime: under a minute on a GPU, mostly compilation. On a 2-core CPU the default (ResNet-18, batch
128) takes about 5 minutes, `--model=resnet18 --batch_size=32` about 70 s and `--model=resnet20` 45 s.
"""

from __future__ import annotations

import functools
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ood_jax.trainer import experiment
from ood_jax import losses
from ood_jax import models
from ood_jax.trainer import xla_options


def make_step(model, optimizer, params_transform=None):
  """The jitted (params, batch_stats, opt_state, images, labels) → same + loss step.

  `params_transform` (params → params), if given, is applied inside the differentiated loss, e.g. a
  `stop_gradient` of some parameters for an ablation (`experiments.benchmark_peers --ablate`).
  """

  def loss_fn(params, batch_stats, images, labels):
    if params_transform is not None:
      params = params_transform(params)
    (logits, _), updates = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=True,
                                       mutable=['batch_stats'])
    return jnp.mean(losses.softmax_cross_entropy(logits, labels)), updates.get('batch_stats', batch_stats)

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, batch_stats, opt_state, images, labels):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, images, labels)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return step


def _time(step, state, batch, num_steps):
  """Seconds per step of `num_steps` steps from a private copy of `state`; blocks on the last outputs."""
  state = jax.block_until_ready(jax.tree.map(jnp.copy, state))  # donated by the step, so copied
  start = time.perf_counter()
  for _ in range(num_steps):
    state = step(*state, *batch)[:3]
  jax.block_until_ready(state)
  return (time.perf_counter() - start) / num_steps


def main(argv):
  del argv
  heads = list(dict.fromkeys(flags.FLAGS.heads))
  if 'dense' not in heads:
    raise app.UsageError('--heads must include dense, the reference of the ratios.')
  dtype = experiment.DTYPES[flags.FLAGS.dtype]
  key_init, key_images, key_labels = jax.random.split(jax.random.key(0), 3)
  batch = (jax.random.normal(key_images, (flags.FLAGS.batch_size, 32, 32, 3), jnp.float32),
           jax.random.randint(key_labels, (flags.FLAGS.batch_size,), 0, flags.FLAGS.num_classes))
  optimizer = optax.sgd(0.01, momentum=0.9)

  steps, initial, counts, compile_seconds, gflops = {}, {}, {}, {}, {}
  for head in heads:
    model = models.make_classifier(flags.FLAGS.model, head, flags.FLAGS.num_classes, dtype=dtype)
    variables = model.init(key_init, batch[0][:1], train=False)
    params, batch_stats = variables['params'], variables.get('batch_stats', {})
    counts[head] = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    initial[head] = (params, batch_stats, optimizer.init(params))
    start = time.perf_counter()
    options = xla_options.compiler_options(not flags.FLAGS.xla_cpu_defaults)
    steps[head] = make_step(model, optimizer).lower(*initial[head], *batch).compile(options)
    compile_seconds[head] = time.perf_counter() - start
    # XLA's own count: shows how little of the step the head is, whatever the timings say.
    gflops[head] = (steps[head].cost_analysis() or {}).get('flops', float('nan')) / 1e9
    _time(steps[head], initial[head], batch, flags.FLAGS.warmup)

  # Every round restarts from the initial state. Training on and on with one batch drives the loss
  # to 0, where exponentials underflow to subnormal numbers that slow CPUs down many times over, and
  # the timings would measure how fast each head memorises the batch instead of what it costs.
  seconds = {head: [] for head in heads}
  for _ in range(flags.FLAGS.rounds):
    for head in heads:
      seconds[head].append(_time(steps[head], initial[head], batch, flags.FLAGS.steps))

  device = jax.devices()[0]
  print(f'{flags.FLAGS.model} · batch {flags.FLAGS.batch_size} · {flags.FLAGS.dtype} · '
        f'{flags.FLAGS.num_classes} classes · '
        f'1 × {device.platform} ({device.device_kind}); {flags.FLAGS.rounds} rounds × {flags.FLAGS.steps} steps '
        f'after {flags.FLAGS.warmup} warm-up steps')
  print(f'{"head":<12} {"params":>12} {"GFLOP/step":>11} {"compile s":>10} {"best ms/step":>13} {"median":>9} '
        f'{"× dense":>8}')
  reference = min(seconds['dense'])
  for head in heads:
    best, median = min(seconds[head]), statistics.median(seconds[head])
    print(f'{head:<12} {counts[head]:>12,} {gflops[head]:>11.2f} {compile_seconds[head]:>10.1f} '
          f'{1000 * best:>13.2f} {1000 * median:>9.2f} {best / reference:>8.3f}')


if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  flags.DEFINE_enum('model', 'resnet18', list(models.BACKBONES), 'Backbone.')
  flags.DEFINE_list('heads', ['dense', 'distance', 'mahalanobis'],
                    'Logit heads to time (ood_jax.models.HEADS); dense, the reference, must be one.')
  flags.DEFINE_integer('batch_size', 128, 'Images per step.', lower_bound=1)
  flags.DEFINE_enum('dtype', 'float32', list(experiment.DTYPES), 'Backbone computation dtype.')
  flags.DEFINE_integer('num_classes', 10, 'K (10: CIFAR-10, 100: CIFAR-100).', lower_bound=1)
  flags.DEFINE_bool('xla_cpu_defaults', False, "Compile with XLA's CPU defaults, not ood_jax.trainer.xla_options "
                    '(what the trainer uses).')
  flags.DEFINE_integer('steps', 5, 'Timed steps per head per round.', lower_bound=1)
  flags.DEFINE_integer('warmup', 2, 'Untimed steps per head after compilation.', lower_bound=1)
  flags.DEFINE_integer('rounds', 5, 'Timing rounds; the best and the median are reported.',
                       lower_bound=1)
  app.run(main)
