r"""What the command-line entry points share: a quiet start, short answers to mistakes, the config's fields in --help.

  from experiments import cli  # before anything that imports JAX or TensorFlow: it sets their logging first
  ...
  if __name__ == '__main__':
    config_flags.DEFINE_config_file('config', None, cli.config_help('Path to a config file.'), lock_config=True)
    cli.run(main)

`run` is `absl.app.run` with these differences:

* A mistake on the command line or in the config prints what is wrong (with the closest valid name where the
  valid ones are known) in one or two lines, without a traceback, and exits with status 2 (`USAGE_EXIT_CODE`):
  an unknown flag or config field, a value of the wrong type, an unknown name (method, dataset, detector, ...:
  anything `experiment.make_experiment` rejects), a bad config argument or a missing config file, a missing
  data set (every one listed), a config that differs from the workdir's checkpoints, a workdir without
  config.json or checkpoint. `--verbosity=1` (absl's flag) or OOD_JAX_TRACEBACK=1 adds the traceback. Anything
  else is a bug and keeps its traceback and exit status 1; `PreemptedError`'s 75 is the script's own.
* --help / --helpfull exit with status 0 (absl's: 1); `config_help` lists every config field and its default
  in the config flag's help.
* Start-up notices stay off the console: the C++ INFO lines of TensorFlow and XLA (TF_CPP_MIN_LOG_LEVEL=1 unless
  set: "This TensorFlow binary is optimized to use ...", "PjRt-IFRT device count ..."; their warnings still
  show), JAX's INFO line on each backend it could not start ("Unable to initialize backend 'tpu'"), and the
  lines TensorFlow's C++ writes to stderr while it loads, before its logging is set up ("All log messages
  before absl::InitializeLog() ...", "oneDNN custom operations are on ..."). No environment variable reaches
  those short of TF_ENABLE_ONEDNN_OPTS=0, which would change TensorFlow's numerics, so TensorFlow loads with
  stderr captured and every other line is written back. Under --verbosity=1 only TF_CPP_MIN_LOG_LEVEL stays
  (it is read before the flags are).
"""

import os

# Read once by TensorFlow's (and XLA's) C++ logging when it loads, so set before any import that loads it:
# 1 drops INFO (e.g. "This TensorFlow binary is optimized to use available CPU instructions"), keeps warnings.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

import difflib
import importlib.abc
import importlib.util
import logging as std_logging
import re
import sys
import tempfile
import traceback

from absl import app
from absl import flags
from absl import logging
import ml_collections

from ood_jax.evaluation import report
from ood_jax.trainer import checkpoint
from ood_jax.trainer import defaults
from ood_jax.trainer import experiment
from ood_jax.trainer.data import sources

USAGE_EXIT_CODE = 2  # a mistake in the command or the config, as argparse and most Unix tools exit
TRACEBACK_ENV = 'OOD_JAX_TRACEBACK'

# Errors that are a mistake in the command, the config or the data wherever they are raised.
_MISTAKES = (app.UsageError, sources.DatasetNotFoundError, checkpoint.ConfigChangedError,
             checkpoint.CheckpointRestoreError)
# The checks a run makes before it trains: a ValueError, TypeError or missing file raised under one of them is a
# mistake in the config or the workdir; the same error raised anywhere else is a bug.
_CHECKS = frozenset(f.__code__ for f in (experiment.make_experiment, experiment.check_config, experiment.check_data,
                                         checkpoint.load_config, checkpoint.restore, report.load_results))
# The lines TensorFlow's C++ writes to stderr while it loads (see the module docstring).
_LOAD_NOTICES = ('All log messages before absl::InitializeLog() is called are written to STDERR',
                 'oneDNN custom operations are on')
# Config groups of free-form keys (ood_jax/trainer/defaults.py): a locked config takes a new key only in a whole dict.
_FREE_FORM = ('backbone_kwargs', 'method_kwargs')
_HELP_FLAG = re.compile(r'--?(help|helpshort|helpfull|helpxml|\?)(=\w*)?')
_CONFIG_FLAG = re.compile(r'-{1,2}config(=|$)')  # how ml_collections finds the config argument
_OVERRIDE_FLAG = re.compile(r'-{1,2}(?:no)?config\.([^=]+)')


def run(main, *, load_quietly=('tensorflow',)) -> None:
  """`absl.app.run(main)` with the answers of the module docstring; `load_quietly`: what `main` may import that
  writes start-up notices (TensorFlow), loaded without them."""
  app.run(lambda argv: _run_main(main, argv, load_quietly), flags_parser=_parse_flags)


def config_help(text: str) -> str:
  """`text`, then every field of `ood_jax.trainer.defaults.base_config()` with its default: a config flag's help."""
  fields = '\n'.join(f'config.{name} = {value!r}' for name, value in flat_fields(defaults.base_config()).items())
  return (f'{text}\nOverride any field with --config.<field>=<value>; the fields, with the defaults of '
          f'ood_jax/trainer/defaults.py (a config file changes some):\n{fields}')


def flat_fields(config: ml_collections.ConfigDict, prefix: str = '') -> dict:
  """Dotted field name → value of every field of `config`; an empty group (method_kwargs) is one field."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and value:
      out.update(flat_fields(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
  return out


def _parse_flags(argv):
  try:
    args = flags.FLAGS(argv)
  except SystemExit as e:
    if e.code == 1 and any(_HELP_FLAG.fullmatch(arg) for arg in argv[1:]):
      sys.exit(0)  # absl exits 1 after printing the help that was asked for
    raise
  except Exception as e:  # pylint: disable=broad-except
    message = _flag_mistake(e, argv)
    if message is None:
      raise
    _fail(e, message, argv)
  if 'config' in flags.FLAGS:
    config = flags.FLAGS['config'].value
    if config is not None and not isinstance(config, ml_collections.ConfigDict):
      # ml_collections defers a config file that did not load to the first use of the config.
      _fail(None, _config_file_problem(argv) or 'the config file did not load.', argv)
  return args


def _run_main(main, argv, load_quietly):
  verbose = _verbose(argv)
  if not verbose:
    std_logging.getLogger('jax._src.xla_bridge').setLevel(std_logging.WARNING)  # "Unable to initialize backend"
    sys.meta_path[:0] = [_QuietLoad(name) for name in load_quietly if name not in sys.modules]
  # Orbax narrates every save at INFO; keep the progress lines readable.
  logging.get_absl_handler().addFilter(lambda record: '/orbax/' not in record.pathname)
  try:
    return main(argv)
  except Exception as e:  # pylint: disable=broad-except
    checked = any(frame.f_code in _CHECKS for frame, _ in traceback.walk_tb(e.__traceback__))
    if isinstance(e, _MISTAKES) or (checked and isinstance(e, (ValueError, TypeError, FileNotFoundError))):
      _fail(e, str(e), argv)
    raise


def _fail(error, message: str, argv) -> None:
  """Prints `message` (after the traceback of `error` when asked for) and exits with `USAGE_EXIT_CODE`."""
  if error is not None and _verbose(argv):
    traceback.print_exception(error)
  if isinstance(error, (flags.Error, app.UsageError)):
    message += '\nPass --helpfull for every flag and config field.'
  sys.stderr.write(f'error: {message}\n')
  sys.exit(USAGE_EXIT_CODE)


def _verbose(argv) -> bool:
  if os.environ.get(TRACEBACK_ENV, '') not in ('', '0'):
    return True
  if 'verbosity' in flags.FLAGS and flags.FLAGS['verbosity'].present:
    return flags.FLAGS.verbosity >= 1
  # The flags did not parse (as far as --verbosity): read it as absl would.
  for arg, following in zip(argv[1:], [*argv[2:], '']):
    match = re.fullmatch(r'--?(?:v|verbosity)(?:=(-?\d+))?', arg)
    if match:
      value = match.group(1) if match.group(1) is not None else following
      return value.lstrip('-').isdigit() and int(value) >= 1
  return False


def _flag_mistake(error: Exception, argv) -> str | None:
  """What a failure to parse the command line says to a person, or None for a failure that is no mistake of theirs."""
  if isinstance(error, (AttributeError, KeyError)):  # ml_collections, on an override of a field the config lacks
    return _unknown_field(argv)
  if isinstance(error, OSError):  # an override of a config whose file did not load
    return _config_file_problem(argv)
  if not isinstance(error, flags.Error):
    return None
  text = str(error)
  root = error
  while root.__cause__ or root.__context__:
    root = root.__cause__ or root.__context__
  if root is not error and '\n' in text:
    # The config file's get_config raised; ml_collections put its traceback into the message.
    return f'{text.split(": ", 1)[0].removeprefix("flag ")}: {root}'
  match = re.match(r'flag --config\.([\w.]+)=', text)
  if match:
    return _bad_value(match.group(1), text) or text
  return text


def _bad_value(name: str, text: str) -> str | None:
  config = flags.FLAGS['config'].value if 'config' in flags.FLAGS else None
  *parents, last = name.split('.')
  try:
    for parent in parents:
      config = config[parent]
    kind, current = config.get_type(last), config[last]
  except (AttributeError, KeyError, TypeError):
    return None
  kind = getattr(kind, '__name__', kind)
  detail = text.split(': ', 1)[1] if ': ' in text else text
  return f'bad value for config.{name} (type {kind}; this config: {current!r}): {detail}'


def _config_argument(argv) -> str | None:
  for i, arg in enumerate(argv[1:], 1):
    if _CONFIG_FLAG.match(arg):
      return arg.split('=', 1)[1] if '=' in arg else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def _unknown_field(argv) -> str | None:
  argument = _config_argument(argv)
  try:
    config = flags.FLAGS['config'].parser.parse(argument) if argument else None
  except (OSError, ValueError, TypeError):
    config = None
  if not isinstance(config, ml_collections.ConfigDict):
    return None
  fields = flat_fields(config)
  known = set(fields) | {name.rsplit('.', i)[0] for name in fields for i in range(1, name.count('.') + 1)}
  for arg in argv[1:]:
    match = _OVERRIDE_FLAG.match(arg)
    name = match.group(1) if match else None
    if name is None or name in known:
      continue
    group, _, key = name.rpartition('.')
    if group in _FREE_FORM:
      return (f'unknown config field {name!r}: a key this config lacks goes into config.{group} as one dict, '
              f'--config.{group}="{{{key!r}: <value>}}" (this config: {config[group].to_dict()}).')
    where = group if group in known else ''  # the group the name is in, else the top level
    # In a known group only the last part can be the typo: compared whole, the shared 'optimizer.' would make
    # any two names of the group look alike.
    close = [f'{where}.{field}' for field in experiment.closest(key, config[where])] if where else (
        experiment.closest(name, known))
    if close:
      return f'unknown config field {name!r}; did you mean {close[0]!r}?'
    siblings = ', '.join(sorted(config[where] if where else config))
    return f'unknown config field {name!r}; the fields of config{"." + where if where else ""}: {siblings}.'
  return None


def _config_file_problem(argv) -> str | None:
  argument = _config_argument(argv)
  if argument is None:  # the error did not come from a config file
    return None
  path = argument.split(':', 1)[0]
  if not os.path.isfile(path):
    folder = os.path.dirname(path) or '.'
    files = [os.path.join(os.path.dirname(path), f) for f in os.listdir(folder) if f.endswith('.py')] if (
        os.path.isdir(folder)) else []
    close = difflib.get_close_matches(path, files, n=1)
    hint = f'; did you mean {close[0]!r}?' if close else ' (paths are relative to the current directory).'
    return f'config file {path!r} does not exist{hint}'
  try:
    flags.FLAGS['config'].value.lock()  # raises the deferred error
  except OSError as e:
    return f'--config={argument}: ' + ' '.join(str(e).split()).split('failure to load: ', 1)[-1]
  return f'--config={argument} did not load.'


class _QuietLoad(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Loads the module `name` (when something first imports it) with stderr, file descriptor 2, captured, then
  writes back every line but `_LOAD_NOTICES`. Waiting for the import, rather than importing it up front, keeps
  a mistake in the config from paying for TensorFlow's few seconds of loading."""

  def __init__(self, name: str):
    self._name = name
    self._loader = None

  def find_spec(self, fullname, path, target=None):
    if fullname != self._name:
      return None
    sys.meta_path.remove(self)  # once, and the real finders find it
    spec = importlib.util.find_spec(fullname)
    if spec is None or spec.loader is None:
      return spec
    self._loader, spec.loader = spec.loader, self
    return spec

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
      os.dup2(captured.fileno(), 2)
      try:
        self._loader.exec_module(module)
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        captured.seek(0)
        lines = captured.read().decode(errors='replace').splitlines(keepends=True)
        sys.stderr.write(''.join(line for line in lines if not any(notice in line for notice in _LOAD_NOTICES)))
