"""Sphinx configuration of the ood_jax documentation (MyST Markdown pages, API reference by autodoc).

Build (as .ci/run does; no network needed, warnings are errors):

  pip install -e '.[all,docs]'
  sphinx-build -W --keep-going -b html docs docs/_build/html
"""

import pathlib
import re
import sys

DOCS = pathlib.Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(REPO))  # autodoc imports ood_jax from this checkout


def _read(pattern: str, path: pathlib.Path) -> str:
  """A constant of setup.py or ood_jax/__init__.py, read without importing either."""
  return re.search(pattern, path.read_text(encoding='utf-8'), flags=re.M).group(1)


# The repository's address has one home, setup.py's URL; the version one, ood_jax.__version__.
REPOSITORY_URL = _read(r"^URL = '([^']+)'", REPO / 'setup.py')
release = _read(r"^__version__ = '([^']+)'$", REPO / 'ood_jax' / '__init__.py')
version = release

project = 'ood_jax'
author = 'the ood_jax authors'
copyright = 'the ood_jax authors'  # pylint: disable=redefined-builtin

extensions = [
    'myst_parser',
    'sphinx.ext.autodoc',
    'sphinx.ext.napoleon',
]
source_suffix = {'.md': 'markdown'}
root_doc = 'index'
exclude_patterns = [
    '_build',
    # Tables written by `python -m experiments.digits_methods` / `experiments.digits_calibration`: included into
    # results_digits.md, not pages of their own.
    'digits_methods.md',
    'digits_leaderboard.md',
    'digits_c_summary.md',
    # A digits run's results.md, copied: included into digits_detectors.md.
    'digits_run_results.md',
]

# MyST: `[text](page.md#a-heading)` links to headings; ```{directive} fences are on by default.
myst_heading_anchors = 3
myst_enable_extensions = ['colon_fence', 'dollarmath', 'substitution']
# `{{ version }}` and `{{ repository_url }}` in a page's text (not in code blocks): one home for each.
myst_substitutions = {'version': release, 'repository_url': REPOSITORY_URL}

# The API reference: Google-style docstrings, members in source order. No extension fetches other projects'
# object inventories: the build needs no network.
autodoc_default_options = {
    'members': True,
    'member-order': 'bysource',
    'ignore-module-all': True,  # document each object once, where it is defined (packages re-export)
}
autodoc_typehints = 'description'
autodoc_typehints_format = 'short'
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # dataclass fields are listed once, not once per Attributes entry and per field
# Docstrings write inline code as `x`, the Markdown way; render it as code.
default_role = 'code'

html_theme = 'sphinx_book_theme'
html_title = f'ood_jax {release}'
html_theme_options = {
    'repository_url': REPOSITORY_URL,
    'repository_branch': 'main',
    'path_to_docs': 'docs',
    'use_repository_button': True,
    'use_source_button': True,
    'show_toc_level': 2,
}
html_static_path = []
html_last_updated_fmt = None

# ----------------------------------------------------------------------------------------------
# Docstrings are plain text written for `help()` and for reading in the source: Markdown-style code
# spans, |x| for absolute values and norms, indented formulas and code, a few Markdown tables. Before
# napoleon reads them, this makes such text valid reStructuredText without changing what it says.

_SECTION = re.compile(r'^(Args|Arguments|Parameters|Keyword Args|Keyword Arguments|Other Parameters|Attributes|'
                      r'Raises|Returns|Return|Yields|Yield|Example|Examples|Note|Notes|Warning|Warnings|'
                      r'References|Todo):\s*$')
_ENTRY_SECTIONS = {'Args', 'Arguments', 'Parameters', 'Keyword Args', 'Keyword Arguments', 'Other Parameters',
                   'Attributes', 'Raises'}
_CODE = re.compile(r'(?<![`\\])`([^`]+)`(?![`_])')
_STRONG = re.compile(r'(?<![\w*\\])\*\*(?=\S)([^*]+?)(?<=\S)\*\*(?![\w*])')
_EMPHASIS = re.compile(r'(?<![\w*\\])\*(?=[^\s*])([^*]+?)(?<=[^\s*])\*(?![\w*])')
_PARAMETER = re.compile(r'^(\s*)(\*{1,2}\w+)(\s*(?:\([^)]*\))?:)')
_UNDERLINE = re.compile(r'^\s*([-=~^])\1{2,}\s*$')
_BULLET = re.compile(r'^(?:[*+-]|\d+[.)])\s+')
_BULLET_LINE = re.compile(r'^\s*(?:[*+-]|\d+[.)])\s+')


def _indent(line: str) -> int:
  return len(line) - len(line.lstrip())


def _inline(text: str) -> str:
  """Code spans as inline literals, bare `*` and `|` escaped; emphasis and strong kept."""
  pieces, last = [], 0
  for match in _CODE.finditer(text):
    pieces.append(('text', text[last:match.start()]))
    pieces.append(('code', match.group(1)))
    last = match.end()
  pieces.append(('text', text[last:]))
  out = []
  for i, (kind, value) in enumerate(pieces):
    if kind == 'code':
      before = out[-1][-1:] if out and out[-1] else ''
      after = pieces[i + 1][1][:1] if i + 1 < len(pieces) else ''
      span = '``' + value.strip() + '``' if value.strip() else '`` ``'
      if before and (before.isalnum() or before in ')]}'):
        span = '\\ ' + span
      if after and (after.isalnum() or after in '([{'):
        span += '\\ '
      out.append(span)
      continue
    kept = {}

    def keep(match, kept=kept):
      kept[f'\0{len(kept)}\0'] = match.group(0)
      return f'\0{len(kept) - 1}\0'

    value = _STRONG.sub(keep, value)
    value = _EMPHASIS.sub(keep, value)
    value = value.replace('*', '\\*').replace('|', '\\|').replace('`', '\\`')
    for key, original in kept.items():
      value = value.replace(key, original)
    out.append(value)
  return ''.join(out)


def _fix_line(line: str) -> str:
  match = _PARAMETER.match(line) or _BULLET_LINE.match(line)  # napoleon reads `*args:`; list markers stay
  if match:
    return line[:match.end()] + _inline(line[match.end():])
  return _inline(line)


def _unpaired(line: str) -> bool:
  return len(re.findall(r'(?<!\\)`', line)) % 2 == 1


def sanitize(lines: list[str]) -> list[str]:
  """The docstring's lines as reStructuredText: literal blocks where text is indented, tables kept as typed."""
  out: list[str] = []
  section, section_indent, entry_indent, literal_indent = None, -1, None, None
  previous = None  # indent of the last non-blank line, None after a blank line
  item = None  # indent of the text of the list item the last line belongs to

  def open_literal(indent: int, *, attach: bool = True) -> None:
    """Starts a literal block at `indent`: '::' ends the paragraph above (attach) or stands alone."""
    nonlocal literal_indent
    while out and not out[-1].strip():
      out.pop()
    last = out[-1].rstrip() if out else ''
    if last.endswith('::'):  # already reStructuredText's literal-block marker
      pass
    elif attach and last and not _SECTION.match(last.strip()):
      out[-1] = last + (':' if last.endswith(':') else ' ::')
    else:
      out.extend([''] if out else [])
      out.append(' ' * max(indent - 2, 0) + '::')
    out.append('')
    literal_indent = indent

  i = 0
  while i < len(lines):
    line = lines[i]
    stripped = line.strip()
    if not stripped:
      out.append('')
      previous = None
      i += 1
      continue
    indent = _indent(line)
    if literal_indent is not None:
      if indent >= literal_indent:
        out.append(line)
        previous = indent
        i += 1
        continue
      literal_indent = None
      if out and out[-1].strip():
        out.append('')
    if section is not None and indent <= section_indent:
      section, entry_indent = None, None
    header = _SECTION.match(stripped)
    if header:
      section, section_indent, entry_indent = header.group(1), indent, None
      out.append(line)
      previous = indent
      i += 1
      continue
    # A Markdown table: shown as typed.
    if stripped.startswith('|'):
      rows = []
      while i < len(lines) and lines[i].strip().startswith('|'):
        rows.append(lines[i])
        i += 1
      open_literal(indent + 2, attach=previous is not None)
      out.extend('  ' + row for row in rows)
      out.append('')
      literal_indent, previous = None, None
      continue
    # A heading underlined with ----- or =====: a bold line (no sections inside a docstring).
    if i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]) and not _UNDERLINE.match(line):
      out.append(' ' * indent + '**' + stripped + '**')
      out.append('')
      previous = None
      i += 2
      continue
    if section in _ENTRY_SECTIONS and entry_indent is None:
      entry_indent = indent
    base = entry_indent if section in _ENTRY_SECTIONS else None
    deeper = previous is not None and indent > previous
    continuation = (base is not None and previous == base and indent > base) or indent == item
    after_header = previous is not None and out and _SECTION.match(out[-1].strip())
    # An indented block right under a line of text (no blank line): formulas, code, nested lists.
    if deeper and not continuation and not after_header:
      open_literal(indent)
      out.append(line)
      previous = indent
      i += 1
      continue
    # An indented block after a blank line, outside a list item and the Google sections: code or formulas.
    if (previous is None and section is None and indent > 0 and indent != item and len(out) >= 2
        and out[-2].strip() and _indent(out[-2]) < indent and not _SECTION.match(out[-2].strip())):
      open_literal(indent)
      out.append(line)
      previous = indent
      i += 1
      continue
    if _unpaired(line):  # a code span running on to the next lines of the paragraph
      end = i + 1
      while end < len(lines) and lines[end].strip() and _unpaired('\n'.join(lines[i:end])):
        end += 1
      if not _unpaired('\n'.join(lines[i:end])):
        if section in ('Returns', 'Return', 'Yields', 'Yield'):  # napoleon splits a return type off line 1
          fixed = [_fix_line(' '.join([lines[i].rstrip()] + [rest.strip() for rest in lines[i + 1:end]]))]
        else:
          fixed = _fix_line('\n'.join(lines[i:end])).split('\n')
        out.extend(fixed)
        previous = _indent(lines[end - 1])
        item = None
        i = end
        continue
    bullet = _BULLET.match(stripped)
    if bullet and previous is not None and item is None and out and out[-1].strip():
      out.append('')  # a list right under a paragraph: reStructuredText needs the blank line
    out.append(_fix_line(line))
    if bullet:
      item = indent + bullet.end()
    elif item is not None and indent != item:
      item = None
    previous = indent
    i += 1
  return out


def _process_docstring(app, what, name, obj, options, lines):  # pylint: disable=unused-argument
  lines[:] = sanitize(lines)


def setup(app):
  # Before napoleon (priority 500) turns the Google-style sections into fields.
  app.connect('autodoc-process-docstring', _process_docstring, priority=400)
