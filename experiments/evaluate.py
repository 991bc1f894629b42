r"""Evaluate the latest checkpoint of a run: python -m experiments.evaluate --workdir=<dir>.

  python -m experiments.evaluate --workdir=runs/digits --benchmark=digits --detectors=all
  python -m experiments.evaluate --workdir=runs/c10_resnet18 --benchmark=openood_v1_5 --detectors=all

Uses the config the run saved in <workdir>/config.json (or --config=<file>); --benchmark and
--detectors override its eval.benchmark / eval.detectors. Each set's logits and features are cached
in <workdir>/features, so adding a detector later does not run the model again. Writes
<workdir>/results.json and results.md (with the leaderboard table for a benchmark) and prints a summary.
--helpfull lists every flag and config field. A mistake in the command, the config or its data exits with
status 2 and a line or two saying what (`experiments.cli`; --verbosity=1 adds the traceback).
"""

from experiments import cli  # first: it sets TensorFlow's logging before anything loads it

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from ml_collections import config_flags

from ood_jax.trainer import checkpoint
from ood_jax.trainer import evaluate
from ood_jax.evaluation import report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
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
  flags.mark_flags_as_required(['workdir'])
  cli.run(main)
