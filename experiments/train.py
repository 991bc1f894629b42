r"""Train and evaluate a method: python -m experiments.train --config=configs/<x>.py --workdir=<dir>.

Override any config field on the command line, e.g. --config.method=isomax --config.num_epochs=5.
Re-running the same command after an interruption resumes from the latest checkpoint in workdir.
Prints a short summary at the end; the tables are in <workdir>/results.md, every metric in results.json.

--helpfull lists every flag, and with the --config flag every config field and its default.

Exit status: 0 finished; 2 (`cli.USAGE_EXIT_CODE`) a mistake in the command, the config or its data (an
unknown flag, field or name, a bad value, a missing data set, checkpoints of another config): one or two
lines say what, --verbosity=1 or OOD_JAX_TRACEBACK=1 adds the traceback; 75 (`train.PREEMPTED_EXIT_CODE`,
os.EX_TEMPFAIL) a preemption notice (SIGTERM) stopped training after saving the last completed step: run the
same command again to resume; anything else is an error, with its traceback (docs/fault_tolerance.md).
"""

import sys

from experiments import cli  # first: it sets TensorFlow's logging before anything loads it

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from absl import logging
from ml_collections import config_flags

from ood_jax.evaluation import report
from ood_jax.trainer import train


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  try:
    results = train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
  except train.PreemptedError as e:
    logging.warning('%s', e)
    sys.stdout.flush()
    sys.exit(train.PREEMPTED_EXIT_CODE)
  print(report.summary(results, results_dir=flags.FLAGS.workdir))


if __name__ == '__main__':
  # Defined here, not on import: importing two scripts must not define a flag twice.
  config_flags.DEFINE_config_file('config', None, cli.config_help('Path to an ml_collections config file.'),
                                 lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run(main)
