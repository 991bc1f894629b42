"""Every config field the trainer and the evaluator read, with its default: the one place defaults live.

`configs/*.py` start from `base_config()` and change what their recipe needs; `checkpoint.load_config` lays a
run's saved config.json over it, so a run saved before a field existed reads that field's default.
"""

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
  """The full set of fields the trainer and evaluator read, with neutral defaults."""
  c = ml_collections.ConfigDict()
  c.dataset = 'cifar10'           # ood_jax.trainer.data.registry name
  c.data_dir = config_dict.placeholder(str)  # TFDS data_dir (None: TFDS default, ~/tensorflow_datasets)
  # True: TFDS may download and prepare missing datasets into data_dir (needs internet: Colab, a
  # workstation). False never downloads: a missing dataset fails with the command that prepares it.
  c.download = False
  c.backbone = 'resnet18'         # ood_jax.models.BACKBONES name (the head is the method's)
  c.backbone_kwargs = ml_collections.ConfigDict()  # backbone attribute overrides, e.g. dropout_rate
  c.method = 'softmax'            # ood_jax.methods.METHODS name; the method picks the head
  c.method_kwargs = ml_collections.ConfigDict()  # overrides of the method's loss hyperparameters
  c.dtype = 'float32'             # or 'bfloat16' compute (parameters stay float32)
  c.seed = 0
  c.batch_size = 128              # global, over all devices
  c.num_epochs = 100
  c.num_steps = 0                 # > 0 overrides num_epochs
  # Held out of the training split (stratified, fixed draw) for post-hoc calibration and detector
  # tuning; 0 trains on the whole split, as the papers do.
  c.validation_fraction = 0.1
  c.augment = 'crop_flip'         # ood_jax.trainer.data.pipeline augmentation
  c.normalization = 'dataset'     # or 'symmetric' ([−1, 1] inputs, as Padhy et al. 2020 train)
  c.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
      schedule='step', decay_epochs=(), decay_factor=0.1, warmup_epochs=0.0,
      grad_clip_norm=0.0))  # > 0: clip the global gradient norm first
  c.outliers = ml_collections.ConfigDict(dict(  # auxiliary outliers (methods oe, energy, ice)
      source=config_dict.placeholder(str), batch_size=256, augment=config_dict.placeholder(str),
      split='train', max_examples=config_dict.placeholder(int)))
  c.init_from = config_dict.placeholder(str)  # fine-tune from a workdir or checkpoint (see init_head)
  c.required_fields = ()           # fields the recipe cannot run without, e.g. ('init_from',) to fine-tune
  c.base_model = config_dict.placeholder(str)  # workdir of the frozen base model (method smot)
  # The head *policy* of init_from (ood_jax.trainer.experiment.HEAD_POLICIES): 'auto' keeps the pretrained head
  # if it fits, else re-inits it; 'keep'; 'reinit'; 'class_stats': a Mahalanobis head (ice) at the class
  # means and covariance of the pretrained features.
  c.init_head = 'auto'
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  c.checkpoint_every_minutes = 0.0  # > 0: also save when this much wall-clock time passed (long epochs)
  c.keep_checkpoints = 2
  # Resume a workdir whose checkpoints were trained under a config that differs in a field that
  # counts (ood_jax.trainer.checkpoint.RESUME_IGNORED_FIELDS lists those that do not); refused otherwise.
  c.allow_config_change = False
  c.num_devices = 0               # 0: every device; n: the first n (e.g. to compare with 1 device)
  c.distributed = False           # jax.distributed.initialize() for multi-host runs
  # True: compile the train step with XLA's own CPU defaults instead of ood_jax.trainer.xla_options' faster
  # choice (only float32 rounding differs; GPU/TPU are never changed).
  c.xla_cpu_defaults = False
  # Dense peak TFLOP/s of one device, for the MFU in the training log on devices ood_jax.trainer.throughput does
  # not list (CPUs, new chips); unset: the table's peak, or no MFU.
  c.peak_tflops = config_dict.placeholder(float)
  # True: on GPU, XLA_FLAGS gets --xla_gpu_deterministic_ops=true before JAX starts (kernels chosen without timing
  # them), so that a resumed run continues bitwise. False gives that up for the autotuner's fastest kernels
  # (docs/accelerators.md). CPU and TPU are unaffected.
  c.deterministic = True
  # Steps (as numbered in the training log) to trace with jax.profiler into <workdir>/profile, for TensorBoard's
  # profile tab: e.g. '10,11' or '10-12'; '' none.
  c.profile_steps = ''
  # Folder of JAX's persistent compilation cache: a rerun or a resumed run loads its compiled programs from there.
  c.compilation_cache_dir = config_dict.placeholder(str)
  c.eval = ml_collections.ConfigDict(dict(
      knn_k=50,  # KNN neighbour for contrastive models (Regmi et al. 2024: 100 CIFAR-10, 300 CIFAR-100)
      batch_size=512,  # global; a power of two splits evenly over 1, 2, 4, 8, ... devices
      ood_sets=(), corruptions=(), severities=(1, 2, 3, 4, 5),
      # Post-hoc detectors (ood_jax.detectors) to fit on the training features and report: '' none,
      # 'all' (every one the model allows), or comma-separated names, e.g. 'react,vim,knn'.
      detectors='',
      # Pinned detector hyperparameters, 'detector.name=value' comma-separated (e.g. 'react.percentile=95,knn.k=100'):
      # used as given and no longer tuned on validation OOD.
      detector_kwargs='',
      # A protocol of ood_jax.trainer.data.protocols ('openood_v1_5', 'digits', ...): its near/far test sets are
      # evaluated (with ood_sets), detector hyperparameters tuned on its validation OOD sets, and results.md
      # gets the leaderboard table. '' for none.
      benchmark='',
      validation_ood_sets=(),  # OOD sets for hyperparameter tuning without a protocol (never test sets)
      # Cache each set's logits / features in <workdir>/features (keyed by a hash of the weights), so a
      # re-evaluation with other detectors does not run the model again.
      feature_cache=True))
  # Folder of downloaded benchmark releases (openood/, odin/); None: $OOD_JAX_BENCHMARK_DIR or ~/ood_jax_data.
  c.benchmark_dir = config_dict.placeholder(str)
  return c
