"""The documentation site (docs/): its code examples run, its API reference covers every public module, each
config has a reproduction page, every detector's paper has its BibTeX, and the conventions are stated once.

Code examples: the ```python blocks of each page run in order in one namespace. A block whose first line is
`# not run: <reason>` is shown but not executed (it trains for minutes or needs the reader's data). The
Sphinx build itself (warnings as errors) runs in .ci/run.
"""

import importlib
import pathlib
import pkgutil
import re
import sys

import pytest

import ood_jax
from ood_jax import detectors

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / 'docs'
NOT_RUN = '# not run:'
# Pages written by experiments (included into other pages, never edited by hand).
GENERATED = {'digits_methods.md', 'digits_leaderboard.md', 'digits_c_summary.md', 'digits_run_results.md'}


def _pages():
  return sorted(path for path in DOCS.rglob('*.md') if '_build' not in path.parts)


def _python_blocks(path):
  return re.findall(r'^```python\n(.*?)^```', path.read_text(encoding='utf-8'), flags=re.S | re.M)


PAGES_WITH_CODE = [path for path in _pages() if _python_blocks(path)]


@pytest.mark.parametrize('path', PAGES_WITH_CODE, ids=lambda path: str(path.relative_to(DOCS)))
def test_page_examples_run(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # examples that save files write them here
  namespace = {'__name__': f'docs.{path.stem}'}
  ran = 0
  for block in _python_blocks(path):
    if block.lstrip().startswith(NOT_RUN):
      assert re.match(r'# not run: \S', block.lstrip()), f'{path.name}: say why a block is not run'
      continue
    exec(compile(block, str(path), 'exec'), namespace)  # pylint: disable=exec-used
    ran += 1
  assert ran or all(b.lstrip().startswith(NOT_RUN) for b in _python_blocks(path))


def _public_modules():
  names = ['ood_jax']
  for info in pkgutil.walk_packages(ood_jax.__path__, 'ood_jax.'):
    if not any(part.startswith('_') for part in info.name.split('.')):
      names.append(info.name)
  return names


def test_api_reference_documents_every_public_module():
  documented = set()
  for path in (DOCS / 'api').glob('*.md'):
    documented |= set(re.findall(r'^\.\. automodule:: (\S+)$', path.read_text(encoding='utf-8'), flags=re.M))
  modules = set(_public_modules())
  assert {'ood_jax.evaluation.evaluator', 'ood_jax.trainer.train', 'ood_jax.detectors.gaussian'} <= modules
  assert not modules - documented, f'add to docs/api/*.md: {sorted(modules - documented)}'
  assert not documented - modules, f'no such public module: {sorted(documented - modules)}'
  index = (DOCS / 'api' / 'index.md').read_text(encoding='utf-8')
  for path in (DOCS / 'api').glob('*.md'):
    assert path.name == 'index.md' or f'\n{path.stem}\n' in index, f'{path.name} is not in api/index.md'


def _train_commands(text):
  text = re.sub(r'\\\n\s*', ' ', text)
  return [' '.join(line.split()) for line in text.splitlines()
          if line.strip().startswith('python -m experiments.train')]


CONFIGS = sorted(path.stem for path in (REPO / 'configs').glob('*.py') if path.stem not in ('__init__', 'common'))


@pytest.mark.parametrize('name', CONFIGS)
def test_every_config_has_a_reproduction_page_built_from_its_docstring(name):
  page = DOCS / 'papers' / f'{name}.md'
  assert page.exists(), f'docs/papers/{name}.md is missing'
  text = page.read_text(encoding='utf-8')
  assert f'.. automodule:: configs.{name}' in text  # the docstring itself: command, hardware, runtime, numbers
  assert f'({name}.md)' in (DOCS / 'papers' / 'index.md').read_text(encoding='utf-8')
  doc = importlib.import_module(f'configs.{name}').__doc__
  documented = set(_train_commands(doc))
  shown = _train_commands(text)
  assert shown, f'{page.name} shows no command'
  assert set(shown) <= documented, f'{page.name} shows commands not in its config docstring: {set(shown) - documented}'
  for heading in ('## Reproduce', '## Numbers', '## The config'):
    assert heading in text, (page.name, heading)


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_every_train_command_in_the_docs_parses_as_the_cli_parses_it(monkeypatch):
  from tests.experiments import test_configs  # pylint: disable=import-outside-toplevel
  from ood_jax.trainer import experiment  # pylint: disable=import-outside-toplevel
  commands = [c for path in _pages() for c in test_configs._train_commands(path.read_text(encoding='utf-8'))]
  assert len(commands) >= 20
  monkeypatch.chdir(REPO)
  test_configs._pretend_base_models_are_softmax_runs(monkeypatch)
  for command in dict.fromkeys(commands):
    _, config = test_configs._parse_as_the_cli(command)
    experiment.check_config(config)


def test_citations_page_has_every_detector_paper_and_the_five_papers():
  text = (DOCS / 'citations.md').read_text(encoding='utf-8')
  entries = set(re.findall(r'^@\w+\{(\w+),$', text, flags=re.M))
  for det in detectors.resolve('all'):
    row = re.search(rf'^\| `{det.name}` \| {re.escape(det.paper)} \| {det.year} \| `(\w+)` \|$', text, flags=re.M)
    assert row, f'docs/citations.md has no row for {det.name} ({det.paper})'
    assert row.group(1) in entries, f'no BibTeX entry {row.group(1)} for {det.name}'
  for key in ('macedo2021entropic', 'padhy2020revisiting', 'wu2022ice', 'regmi2024reweightood', 'smot2023'):
    assert key in entries


def _prose_pages():
  return [path for path in _pages() if path.name not in GENERATED and path.parent.name != 'api']


def test_conventions_are_stated_once_and_every_fpr_table_links_to_them():
  conventions = (DOCS / 'conventions.md').read_text(encoding='utf-8')
  for key in ('fpr95_id_positive', 'fpr95_ood_positive', 'aupr_in', 'aupr_out', '15 equal-width bins',
              'higher = more in-distribution', '## Which table shows which'):
    assert key in conventions, key
  # The contradictions this page replaced.
  texts = {path: path.read_text(encoding='utf-8') for path in [*_prose_pages(), REPO / 'README.md']}
  for path, text in texts.items():
    assert 'ood_jax does not' not in text and 'computed with ID as the positive class' not in text, path
    if path.name != 'conventions.md' and re.search(r'FPR@?95', text):
      link = 'conventions.md' if path.parent != DOCS / 'papers' else '../conventions.md'
      link = 'docs/conventions.md' if path.name == 'README.md' else link
      assert f']({link}' in text, f'{path.name} reports FPR@95 without linking the conventions page'
      # Every FPR@95 a page shows is named: the key, or ID / OOD positive, or (ID+) / (OOD+).
      assert re.search(r'fpr95_(id|ood)_positive|(ID|OOD) positive|\((ID|OOD)\+\)', text), path.name


def test_docs_cite_papers_by_author_and_year_not_file_numbers():
  pattern = re.compile(r'papers? 00\d|issue[ -]\d|stop \d|papers/README|/work/', flags=re.I)
  # Docs, configs, and code and tests too: a docstring is documentation (the two tests holding the pattern excepted).
  code = [path for folder in ('ood_jax', 'experiments', 'tests') for path in (REPO / folder).rglob('*.py')
          if path.name not in ('test_docs.py', 'test_readme.py')]
  paths = [*_pages(), REPO / 'README.md', REPO / 'CHANGELOG.md', *(REPO / 'configs').glob('*.py'), *code,
           *(REPO / 'colab').glob('*.ipynb')]
  hits = [f'{path.relative_to(REPO)}:{n}' for path in paths
          for n, line in enumerate(path.read_text(encoding='utf-8').splitlines(), 1) if pattern.search(line)]
  assert not hits, hits


def test_ci_builds_the_docs_strictly_and_offline():
  ci = (REPO / '.ci' / 'run').read_text(encoding='utf-8')
  assert 'sphinx-build -W --keep-going -b html docs docs/_build/html' in ci
  conf = (DOCS / 'conf.py').read_text(encoding='utf-8')
  assert 'intersphinx' not in conf  # no inventory fetched over the network
  assert 'docs/_build/' in (REPO / '.gitignore').read_text(encoding='utf-8').splitlines()


def test_docstring_sanitizer_turns_plain_text_into_valid_markup():
  sys.path.insert(0, str(DOCS))
  try:
    import conf  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(str(DOCS))
  lines = ['The `Detector`s of |x| and a*b:', '', '  s = det.score(state, x)', '', 'Args:', '  x: the `[N, D]`',
           '    features.', '  **hparams: keyword-only.', '', '| a | b |', '|---|---|']
  out = conf.sanitize(lines)
  assert out[0] == 'The ``Detector``\\ s of \\|x\\| and a\\*b::'
  assert '  s = det.score(state, x)' in out  # a literal block, as typed
  assert '  x: the ``[N, D]``' in out and '  **hparams: keyword-only.' in out
  assert out[-3:] == ['  | a | b |', '  |---|---|', '']


def test_version_has_one_source_and_a_changelog_entry():
  setup = (REPO / 'setup.py').read_text(encoding='utf-8')
  assert not re.search(r"version\s*=\s*'", setup)  # read from ood_jax/__init__.py
  assert re.fullmatch(r'\d+\.\d+\.\d+', ood_jax.__version__)
  assert f'\n## {ood_jax.__version__}\n' in (REPO / 'CHANGELOG.md').read_text(encoding='utf-8')
  conf = (DOCS / 'conf.py').read_text(encoding='utf-8')
  assert "_read(r\"^URL = '([^']+)'\", REPO / 'setup.py')" in conf  # the repository URL has one home too
