"""Feature access on any Flax model: logits, penultimate features, feature maps, final-layer weights.

Post-hoc detectors need more than logits: the features entering the final affine layer, that layer's
W and b, and sometimes intermediate feature maps. OpenOOD asks models for `return_feature`, `get_fc`
and `forward_threshold` methods; here nothing is asked of the model. Given the path of the final
linear layer (and optionally of other submodules), `feature_extractor` wraps the model's own forward
pass and records

* 'logits': the final layer's output,
* 'features': the final layer's input (or the output of the submodule at `features_path`),
* 'feature_maps': the outputs of the submodules at `map_paths`, in order,

with Flax's own mechanisms: `flax.linen.intercept_methods` for Linen modules (the interceptor sees
every submodule call with its path and passes it through unchanged), and for NNX modules a wrapper
swapped in for the named submodules of a merged copy inside the traced function (the user's module
is not modified). `head_weights` reads W `[D, K]` and b `[K]` from the parameters.

Extraction is evaluation, so it is deterministic: an NNX module is run in eval mode (its copy gets
`.eval()`: dropout off, BatchNorm on its running averages) whatever mode the user's module was left in.
Left in train mode, the jitted copy would otherwise apply one dropout mask frozen into its state to every
batch, and normalise each batch by its own statistics. A Linen module takes its mode from the apply
keyword arguments (`train=False`, `deterministic=True`), as `Module.apply` always does.

Paths are '/'-separated names ('head', 'backbone/fc') or tuples; NNX paths are attribute names, with
integers for list entries ('blocks/3/fc' or ('blocks', 3, 'fc')). A submodule called several times in
one forward pass is recorded at its last call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

__all__ = ['feature_extractor', 'head_weights']


def _path(path) -> tuple:
  if isinstance(path, str):
    return tuple(int(p) if p.isdigit() else p for p in path.strip('/').split('/') if p)
  if isinstance(path, Sequence):
    return tuple(path)
  raise TypeError(f'a module path must be a "/"-separated string or a tuple, got {type(path).__name__}.')


def _path_name(path: tuple) -> str:
  return '/'.join(str(p) for p in path)


def head_weights(model_or_variables, path='head'):
  """The final linear layer's (kernel `[D, K]`, bias `[K]`).

  Args:
    model_or_variables: Linen variables (a dict with 'params', or the params dict itself) or an NNX
      module.
    path: path of the `nn.Dense` / `nnx.Linear` layer. A layer without bias gets a zero bias.

  Returns:
    `(kernel, bias)` as JAX arrays.

  Raises:
    ValueError: no such layer, or it has no 2-D 'kernel'.
  """
  parts = _path(path)
  if isinstance(model_or_variables, nnx.Module):
    layer = model_or_variables
    for p in parts:
      try:
        layer = layer[p] if isinstance(p, int) else getattr(layer, p)
      except (AttributeError, IndexError, KeyError, TypeError):
        raise ValueError(f'the NNX module has no submodule at {_path_name(parts)!r} (failed at {p!r}).') from None
    kernel = getattr(layer, 'kernel', None)
    bias = getattr(layer, 'bias', None)
    kernel = None if kernel is None else jnp.asarray(kernel[...])
    bias = None if bias is None else jnp.asarray(bias[...])
  else:
    if not isinstance(model_or_variables, Mapping):
      raise TypeError(f'expected Linen variables (a dict) or an NNX module, got {type(model_or_variables).__name__}.')
    tree = model_or_variables.get('params', model_or_variables)
    for p in parts:
      if not isinstance(tree, Mapping) or str(p) not in tree:
        keys = sorted(tree) if isinstance(tree, Mapping) else []
        raise ValueError(f'no parameters at {_path_name(parts)!r} (failed at {p!r}; available: {keys}).')
      tree = tree[str(p)]
    kernel, bias = tree.get('kernel'), tree.get('bias')
  if kernel is None or jnp.ndim(kernel) != 2:
    raise ValueError(f'the layer at {_path_name(parts)!r} has no 2-D kernel (a Dense / Linear layer is '
                     f'needed), got {None if kernel is None else jnp.shape(kernel)}.')
  kernel = jnp.asarray(kernel)
  bias = jnp.zeros(kernel.shape[1], kernel.dtype) if bias is None else jnp.asarray(bias)
  return kernel, bias


def _finish(record, head_path, features_path, map_paths):
  if 'logits' not in record:
    raise ValueError(f'the final layer {_path_name(head_path)!r} was never called in the forward pass.')
  out = {'logits': record['logits'].astype(jnp.promote_types(record['logits'].dtype, jnp.float32))}
  if features_path is None:
    out['features'] = record['head_input']
  elif ('out', features_path) in record:
    out['features'] = record[('out', features_path)]
  else:
    raise ValueError(f'the features layer {_path_name(features_path)!r} was never called.')
  out['features'] = out['features'].astype(jnp.promote_types(out['features'].dtype, jnp.float32))
  if map_paths:
    missing = [_path_name(p) for p in map_paths if ('out', p) not in record]
    if missing:
      raise ValueError(f'feature-map layers never called in the forward pass: {missing}.')
    out['feature_maps'] = {_path_name(p): record[('out', p)] for p in map_paths}
  return out


def _first_array(args, what):
  if not args or not hasattr(args[0], 'shape'):
    raise ValueError(f'the {what} must take an array as its first positional argument.')
  return args[0]


def _linen_extractor(module, variables, head_path, features_path, map_paths, apply_kwargs):
  wanted = set(map_paths) | ({features_path} if features_path is not None else set())

  def run(variables, x):
    record = {}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name == '__call__':
        path = tuple(context.module.path)
        if path == head_path:
          record['head_input'] = _first_array(args, 'final layer')
          record['logits'] = out
        if path in wanted:
          record[('out', path)] = out
      return out

    with nn.intercept_methods(interceptor):
      module.apply(variables, x, **apply_kwargs)
    return _finish(record, head_path, features_path, map_paths)

  jitted = jax.jit(run)
  return lambda x: jitted(variables, x)


class _Recorder:
  """Stands in for an NNX submodule inside the traced copy: calls it and records input and output."""

  def __init__(self, module, path, record):
    self.module, self.path, self.record = module, path, record

  def __call__(self, *args, **kwargs):
    out = self.module(*args, **kwargs)
    self.record[('in', self.path)] = args[0] if args else None
    self.record[('out', self.path)] = out
    return out

  def __getattr__(self, name):  # Attribute access (e.g. .kernel) goes to the wrapped module.
    return getattr(self.module, name)


def _nnx_extractor(module, head_path, features_path, map_paths, call):
  graphdef, state = nnx.split(module)
  paths = [head_path] + [p for p in [features_path, *map_paths] if p is not None and p != head_path]

  def swap(root, path, record):
    parent = root
    for p in path[:-1]:
      parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    last = path[-1]
    child = parent[last] if isinstance(last, int) else getattr(parent, last)
    if not callable(child):
      raise ValueError(f'{_path_name(path)!r} is not a callable submodule.')
    wrapper = _Recorder(child, path, record)
    if isinstance(last, int):
      parent[last] = wrapper
    else:
      object.__setattr__(parent, last, wrapper)

  def run(state, x):
    model = nnx.merge(graphdef, state)
    model.eval()  # the traced copy only: the user's module keeps its mode
    record = {}
    for p in paths:
      try:
        swap(model, p, record)
      except (AttributeError, IndexError, KeyError, TypeError):
        raise ValueError(f'the NNX module has no submodule at {_path_name(p)!r}.') from None
    call(model, x)
    if ('out', head_path) in record:
      record['logits'] = record[('out', head_path)]
      record['head_input'] = _first_array((record[('in', head_path)],), 'final layer')
    return _finish(record, head_path, features_path, map_paths)

  jitted = jax.jit(run)
  return lambda x: jitted(state, x)


def feature_extractor(module, variables=None, *, head='head', features=None, maps=(),
                      call: Callable | None = None, **apply_kwargs) -> Callable:
  """A jitted function images → {'logits', 'features'[, 'feature_maps']} for any Linen or NNX model.

  Example (Linen, a user's model whose last layer is `nn.Dense(10, name='fc')`):

    extract = feature_extractor(model, variables, head='fc', maps=('layer4',), train=False)
    out = extract(images)   # out['logits'] [N, 10], out['features'] [N, D], out['feature_maps']['layer4']
    kernel, bias = head_weights(variables, 'fc')

  Args:
    module: a `flax.linen.Module` (with `variables`) or a `flax.nnx.Module` (`variables` None).
    variables: the Linen variables dict (params, batch_stats, ...).
    head: path of the final linear layer; its input is the penultimate feature vector.
    features: optional path of a submodule whose output is the feature vector instead (rarely needed).
    maps: paths of submodules whose outputs are returned under 'feature_maps' (e.g. ('backbone',) for
      the map before global pooling of `ood_jax.models.Classifier`).
    call: NNX only: `(model, x) -> anything` that runs the forward pass (default `model(x)`) on a copy in
      eval mode (`.eval()`: dropout off, BatchNorm on running averages, even for a module left in train
      mode); use it to pass flags, e.g. `lambda m, x: m(x, train=False)` for a model with its own flag.
    **apply_kwargs: Linen only: extra keyword arguments of `module.apply`, e.g. `train=False`.

  Returns:
    `extract(x) -> dict`; logits and features are float32 (or wider); compiled once per input shape.
  """
  head_path = _path(head)
  features_path = None if features is None else _path(features)
  map_paths = tuple(_path(p) for p in ((maps,) if isinstance(maps, str) else maps))
  if isinstance(module, nnx.Module):
    if variables is not None:
      raise ValueError('an NNX module carries its own state; pass variables=None.')
    if apply_kwargs:
      raise ValueError(f'apply keyword arguments {sorted(apply_kwargs)} are Linen-only; for NNX pass '
                       f'call=lambda model, x: model(x, ...).')
    return _nnx_extractor(module, head_path, features_path, map_paths, call or (lambda m, x: m(x)))
  if isinstance(module, nn.Module):
    if variables is None:
      raise ValueError('a Linen module needs its variables (from module.init).')
    if call is not None:
      raise ValueError('call= is NNX-only; for Linen pass apply keyword arguments instead.')
    return _linen_extractor(module, variables, head_path, features_path, map_paths, apply_kwargs)
  raise TypeError(f'module must be a flax.linen or flax.nnx Module, got {type(module).__name__}.')
