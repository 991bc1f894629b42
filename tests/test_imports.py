"""The package's import graph: a DAG, with every `ood_jax` import at module level.

Function-level imports of our own modules are how import circles hide; a circle makes the import
order decide whether a module is half-initialised. The graph is read from the source (no import is
executed), so this test is fast and names the offending line.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'ood_jax'


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob('*.py'))}


def _imported(node) -> list[str]:
  """The `ood_jax` modules an import statement loads (a `from pkg import name` loads pkg.name if it is one)."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names if alias.name.split('.')[0] == 'ood_jax']
  if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or '').split('.')[0] == 'ood_jax':
    return [f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in MODULES else node.module
            for alias in node.names]
  return []


def _graph():
  edges, nested = {}, []
  for name, path in MODULES.items():
    tree = ast.parse(path.read_text(encoding='utf-8'))
    edges[name] = {target for node in tree.body for target in _imported(node)} - {name}
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        for inner in ast.walk(node):
          if _imported(inner):
            nested.append(f'{path.relative_to(PACKAGE.parent)}:{inner.lineno} imports {_imported(inner)}')
  return edges, nested


def test_no_function_level_import_of_an_ood_jax_module():
  _, nested = _graph()
  assert not nested, 'function-level imports of ood_jax modules:\n' + '\n'.join(nested)


def _cycle(edges):
  """A cycle as a list of modules, or None (depth-first search with colours)."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for target in sorted(edges.get(node, ())):
      if state.get(target) == 'open':
        return stack[stack.index(target):] + [target]
      if target not in state:
        found = visit(target)
        if found:
          return found
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(edges):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_import_graph_is_acyclic():
  edges, _ = _graph()
  assert 'ood_jax.trainer.train' in edges and 'ood_jax.trainer.evaluate' in edges['ood_jax.trainer.train']
  cycle = _cycle(edges)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
  # The check above is only as good as its search: a planted circle must be reported.
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None


def _reachable(edges, start):
  seen, todo = set(), [start]
  while todo:
    node = todo.pop()
    for target in edges.get(node, ()):
      # `from ood_jax import x` loads the package `ood_jax` too; its __init__ is the core's namespace.
      if target not in seen:
        seen.add(target)
        todo.append(target)
  return seen


def test_core_never_imports_the_trainer_wing():
  # The library core is what a Flax project imports with `pip install ood_jax`: nothing it loads, directly or
  # through another core module, may be a module of the trainer wing (which needs the 'train' extra).
  edges, _ = _graph()
  core = [name for name in MODULES if not name.startswith('ood_jax.trainer')]
  assert {'ood_jax', 'ood_jax.detectors', 'ood_jax.evaluation', 'ood_jax.plots'} <= set(core)
  offending = {name: sorted(t for t in _reachable(edges, name) if t.startswith('ood_jax.trainer')) for name in core}
  offending = {name: targets for name, targets in offending.items() if targets}
  assert not offending, f'core modules reaching the trainer wing: {offending}'
  # The check sees an edge where there is one: the trainer's evaluator reaches the core and its own wing.
  assert 'ood_jax.trainer.inference' in _reachable(edges, 'ood_jax.trainer.evaluate')


def test_architecture_doc_maps_every_module():
  # docs/architecture.md is the map a contributor reads first: every module of each wing is named in its section.
  doc = (PACKAGE.parent / 'docs' / 'architecture.md').read_text(encoding='utf-8')
  core_doc = doc[doc.index('### The library core'):doc.index('### The trainer wing')]
  trainer_doc = doc[doc.index('### The trainer wing'):]
  missing = []
  for name, path in MODULES.items():
    section = trainer_doc if name.startswith('ood_jax.trainer') else core_doc
    stem = path.parent.name if path.stem == '__init__' else path.stem
    if name != 'ood_jax' and f'`{stem}' not in section and f'{stem}.py' not in section and f'{stem}/' not in section:
      missing.append(name)
  assert not missing, f'modules missing from docs/architecture.md: {missing}'
