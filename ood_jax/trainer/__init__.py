"""The trainer wing: a config becomes a checked `Experiment`, a trained model and an evaluated run.

Needs the 'train' extra (`pip install 'ood_jax[train]'`; in Colab, or beside any existing `tensorflow`,
`ood_jax[colab]`). The library core (`ood_jax.layers`, `losses`, `scores`, `detectors`, `metrics`,
`calibration`, `evaluation`, ...) never imports this package; `tests/test_imports.py` keeps it so.

  experiment  the config, every name checked before any I/O, read once into the `Experiment` record
  train       the loop and `train_and_evaluate(config, workdir)`; evaluate: a model's or a workdir's results
  step, optim, sharding, inference, checkpoint, preemption, finetune, feature_cache, throughput,
  xla_options, data/ (TFDS, folders, digits, the named-set catalog, the device pipeline)

docs/architecture.md maps every module.
"""

from ood_jax import _extras

# Checked before any module below imports one of them: a missing package names the extra to install.
_extras.require(_extras.MODULES['ood_jax.trainer'], needed_by='ood_jax.trainer (the trainer and its data layer)')
