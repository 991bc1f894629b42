"""Defaults shared by every config; each config file changes what its recipe needs."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """The full set of fields the trainer and evaluator read, with neutral defaults."""
  c = ml_collections.ConfigDict()
  c.dataset = 'cifar10'           # ood_jax.data.registry name
  c.data_dir = None               # TFDS data_dir (None: TFDS default, ~/tensorflow_datasets)
  c.model = 'resnet18'            # ood_jax.models.BACKBONES name
  c.model_kwargs = ml_collections.ConfigDict()
  c.method = 'softmax'            # ood_jax.methods.METHODS name; the method picks the head
  c.method_kwargs = ml_collections.ConfigDict()  # overrides of the method's loss hyperparameters
  c.dtype = 'float32'             # or 'bfloat16' compute (parameters stay float32)
  c.seed = 0
  c.batch_size = 128              # global, over all devices
  c.num_epochs = 100
  c.num_steps = 0                 # > 0 overrides num_epochs
  c.augment = 'crop_flip'         # ood_jax.data.pipeline augmentation
  c.normalization = 'dataset'     # or 'symmetric' ([−1, 1] inputs, paper 002)
  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
      schedule='step', decay_epochs=(), decay_factor=0.1, warmup_epochs=0.0))
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 2
  c.num_devices = 0               # 0: every device; n: the first n (e.g. to compare with 1 device)
  c.distributed = False           # jax.distributed.initialize() for multi-host runs
  c.eval = ml_collections.ConfigDict(dict(
      batch_size=500, ood_sets=(), corruptions=(), severities=(1, 2, 3, 4, 5)))
  return c
