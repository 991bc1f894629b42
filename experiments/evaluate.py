r"""Evaluate the latest checkpoint of a run: python -m experiments.evaluate --workdir=<dir>.

  python -m experiments.evaluate --workdir=runs/digits --benchmark=digits --detectors=all
  python -m experiments.evaluate --workdir=runs/c10_resnet18 --benchmark=openood_v1_5 --detectors=all

Uses the config the run saved in <workdir>/config.json (or --config=<file>); --benchmark and
--detectors override its eval.benchmark / eval.detectors. Each set's logits and features are cached
in <workdir>/features, so adding a detector later does not run the model again. Writes
<workdir>/results.json and results.md (with the leaderboard table for a benchmark) and prints a summary.
--helpfull lists every flag and config field. A mistake in the command, the config or its data exits with
status 2 and a line or two saying what (`experiments.cli`; --verbosity=1 adds the traceback).

A model of your own, not trained by ood_jax, on a protocol (ImageNet: streamed and sharded over processes):

  python -m experiments.evaluate --model=my_models.resnet:ResNet50 --model_kwargs='{"num_classes": 1000}' \
      --checkpoint=resnet50.msgpack --benchmark=openood_v1_5 --dataset=imagenet --workdir=runs/r50_imagenet \
      --head=head --detectors=msp,energy,react,knn,vim

--model names a Flax module class as <module path>:<class name> (imported; --model_kwargs, a JSON object, are
its constructor's arguments); --checkpoint is a Flax msgpack file or an orbax checkpoint folder
(`ood_jax.evaluation.evaluator.load_variables`). The outputs are cached in <workdir>/features and the
report is written to <workdir> by process 0; with --distributed every process of a multi-host job runs
the same command and reads its own shard of every set.
"""

from experiments import cli  # first: it sets TensorFlow's logging before anything loads it

import importlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import json

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from ood_jax.evaluation import evaluator
from ood_jax.trainer import checkpoint
from ood_jax.trainer import evaluate
from ood_jax.trainer import train
from ood_jax.evaluation import report


def load_model(spec: str, kwargs_json: str | None):
  """The module `<module path>:<class name>` instantiated with the JSON object `kwargs_json`."""
  module_path, _, class_name = spec.partition(':')
  if not module_path or not class_name:
    raise app.UsageError(f'--model must be <module path>:<class name>, e.g. my_models.resnet:ResNet50; got {spec!r}.')
  try:
    kwargs = json.loads(kwargs_json) if kwargs_json else {}
  except json.JSONDecodeError as err:
    raise app.UsageError(f'--model_kwargs must be a JSON object: {err}') from None
  if not isinstance(kwargs, dict):
    raise app.UsageError(f'--model_kwargs must be a JSON object, got {kwargs_json!r}.')
  try:
    cls = getattr(importlib.import_module(module_path), class_name)
  except (ImportError, AttributeError) as err:
    raise app.UsageError(f'--model={spec!r} cannot be imported: {err}') from None
  return cls(**kwargs)


def evaluate_own_model() -> None:
  """--model and --checkpoint: a model of your own on --benchmark for --dataset, results into --workdir."""
  f = flags.FLAGS
  if not (f.checkpoint and f.benchmark and f.dataset):
    raise app.UsageError('--model needs --checkpoint, --benchmark and --dataset.')
  if f.distributed:
    train.initialize_distributed()
  model = load_model(f.model, f.model_kwargs)
  variables = evaluator.load_variables(f.checkpoint)
  detectors = 'all' if f.detectors in (None, 'all') else tuple(d.strip() for d in f.detectors.split(',') if d.strip())
  result = evaluate.evaluate_protocol(
      model, variables, protocol=f.benchmark, dataset=f.dataset, workdir=f.workdir, batch_size=f.batch_size,
      chunk_size=f.chunk_size, data_dir=f.data_dir, benchmark_dir=f.benchmark_dir, detectors=detectors,
      head=f.head, apply_kwargs=json.loads(f.apply_kwargs) if f.apply_kwargs else None)
  if jax.process_index() == 0:
    result.save(f.workdir)
    print(result.markdown())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if flags.FLAGS.model:
    evaluate_own_model()
    return
  workdir = flags.FLAGS.workdir
  config = flags.FLAGS.config or checkpoint.load_config(workdir)
  for field in ('benchmark', 'detectors'):
    if flags.FLAGS[field].value is not None:
      config.eval[field] = flags.FLAGS[field].value
  if flags.FLAGS.download is not None:
    config.download = flags.FLAGS.download
  print(report.summary(evaluate.evaluate(workdir, config), results_dir=workdir))


if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  config_flags.DEFINE_config_file('config', None, cli.config_help('Optional config file (default: the saved one).'))
  flags.DEFINE_string('workdir', None, 'Workdir of a training run.')
  flags.DEFINE_string('benchmark', None, "Protocol of ood_jax.trainer.data.protocols, e.g. 'openood_v1_5' or 'digits'.")
  flags.DEFINE_string('detectors', None, "Post-hoc detectors: 'all', or comma-separated names.")
  flags.DEFINE_bool('download', None, 'Let TFDS download and prepare missing datasets (config.download).')
  flags.DEFINE_string('model', None, 'A model of your own: <module path>:<class name> of a Flax Linen module.')
  flags.DEFINE_string('model_kwargs', None, 'JSON object of the --model constructor arguments.')
  flags.DEFINE_string('checkpoint', None, "--model's variables: a Flax msgpack file or an orbax checkpoint folder.")
  flags.DEFINE_string('dataset', None, "--model's in-distribution dataset of the protocol, e.g. 'imagenet200'.")
  flags.DEFINE_string('head', 'head', "Path of --model's final dense layer ('/'-separated), e.g. 'fc'.")
  flags.DEFINE_string('apply_kwargs', None, 'JSON object of module.apply keyword arguments, e.g. {"train": false}.')
  flags.DEFINE_integer('batch_size', 256, 'Rows per forward pass (--model).')
  flags.DEFINE_integer('chunk_size', 4096, 'Rows per cached chunk of a streamed set (--model, large protocols).')
  flags.DEFINE_string('data_dir', None, 'TFDS data directory (--model).')
  flags.DEFINE_string('benchmark_dir', None, 'Folder of the benchmark releases, e.g. holding openood/ (--model).')
  flags.DEFINE_bool('distributed', False, 'jax.distributed.initialize() first (--model on several processes).')
  flags.mark_flags_as_required(['workdir'])
  cli.run(main)
