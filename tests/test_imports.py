"""The import graph, read from the source: no cycle in bitbert_jax, and bitbert_serve below it.

Every import counts, also those inside functions: a cycle through a deferred import is still a
pair of modules that each need the other.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('bitbert_jax', 'bitbert_serve')


def _modules():
  """{dotted name: file} of every module of the two packages."""
  out = {}
  for package in PACKAGES:
    for d, _, files in os.walk(os.path.join(ROOT, package)):
      for f in files:
        if f.endswith('.py'):
          name = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, '.')
          out[name.removesuffix('.__init__')] = os.path.join(d, f)
  return out


def _imports(name, path, modules):
  """Names imported by one module (dotted, resolved; a `from a import b` names a.b when that is
  a module, else a)."""
  package = name if path.endswith('__init__.py') else name.rpartition('.')[0]
  found = set()
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')[:len(package.split('.')) - node.level + 1]
        base = '.'.join(parts + ([base] if base else []))
      for a in node.names:
        found.add(f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base)
  return found


@pytest.fixture(scope='module')
def graph():
  modules = _modules()
  return {m: _imports(m, p, modules) for m, p in modules.items()}


def _cycle(graph):
  """One import cycle as a list of modules [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for n in sorted(graph[m]):
      if n not in graph or n == m:
        continue
      if state.get(n) == 'open':
        return stack[stack.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    state[m] = 'done'
    stack.pop()
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def test_finds_a_cycle_when_there_is_one():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _cycle({'a': {'b', 'os'}, 'b': set()}) is None


def test_no_import_cycle(graph):
  assert len(graph) > 40 and 'bitbert_jax.packed.write' in graph
  cycle = _cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_serving_imports_no_jax_and_nothing_of_bitbert_jax(graph):
  """bitbert_serve installs alone (serving/): it may import numpy, onnxruntime, tokenizers."""
  for module, names in graph.items():
    if module.startswith('bitbert_serve'):
      bad = {n for n in names if n.split('.')[0] in ('bitbert_jax', 'jax', 'flax', 'torch',
                                                       'transformers', 'safetensors')}
      assert not bad, f'{module} imports {sorted(bad)}'


def test_model_and_quant_never_import_the_packed_package(graph):
  for module, names in graph.items():
    if module.startswith(('bitbert_jax.model', 'bitbert_jax.quant')):
      assert not {n for n in names if n.startswith('bitbert_jax.packed')}, module
