"""What every config file shares: `base_config` (from `ood_jax.trainer.defaults`), argument parsing, smoke runs."""

import difflib

import ml_collections

from ood_jax.trainer.defaults import base_config  # noqa: F401  (the configs' starting point)


def parse_arg(arg, **groups) -> dict:
  """Reads a config argument such as 'cifar100,resnet34,smoke' into one choice per group.

  ml_collections hands a config file the text after ':' of `--config=file.py:text`; every config
  takes a comma-separated list of tokens, at most one from each group, plus 'smoke' (in any order).

  Args:
    arg: the text after ':', or None.
    **groups: group name → its valid tokens, e.g. dataset=('cifar10', 'cifar100').

  Returns:
    group name → the token given, or None where the group had none; and 'smoke' → bool.

  Raises:
    ValueError: for an unknown token (offering the closest one) or two tokens of one group; the message lists the
      valid ones.
  """
  chosen = dict.fromkeys(groups)
  chosen['smoke'] = False
  for token in (arg or '').split(','):
    token = token.strip()
    if not token:
      continue
    if token == 'smoke':
      chosen['smoke'] = True
      continue
    group = next((name for name, tokens in groups.items() if token in tokens), None)
    if group is None:
      valid = '; '.join(f'{name}: {", ".join(tokens)}' for name, tokens in groups.items())
      close = difflib.get_close_matches(token, [t for tokens in groups.values() for t in tokens] + ['smoke'], n=1)
      hint = f'did you mean {close[0]!r}? ' if close else ''
      raise ValueError(f'Unknown config argument {token!r}; {hint}valid ({valid}; and smoke), comma-separated.')
    if chosen[group] is not None:
      raise ValueError(f'Config argument gives two {group}s: {chosen[group]!r} and {token!r}.')
    chosen[group] = token
  return chosen


def shrink_for_smoke(c: ml_collections.ConfigDict) -> None:
  """Cuts a paper config down to a CPU smoke run: same data, model and method, a few tiny steps.

  The evaluation keeps one OOD set (the noise sets hold 10,000 images, too many for a CPU smoke
  run) and two corruptions at the extreme severities.
  """
  c.num_steps = 4
  c.batch_size = 16  # divisible by the 8 fake devices of the tests
  c.log_every_steps = 2
  c.checkpoint_every_steps = 2
  c.eval.batch_size = 16
  c.eval.ood_sets = tuple(c.eval.ood_sets)[:1]
  c.eval.corruptions = tuple(c.eval.corruptions)[:2]
  c.eval.severities = (1, 5)
