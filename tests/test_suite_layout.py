"""The suite's own rules: no test file imports another, and slow tests stay out by default."""
import ast
import glob
import os
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def imported_modules(path):
  tree = ast.parse(open(path, encoding='utf-8').read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from ((node.lineno, a.name) for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      yield node.lineno, node.module


def test_no_test_file_imports_another():
  files = sorted(glob.glob(os.path.join(TESTS, 'test_*.py')))
  test_modules = {os.path.basename(f)[:-3] for f in files}
  assert 'test_suite_layout' in test_modules
  bad = [f'{os.path.basename(f)}:{line} imports {name}' for f in files
         for line, name in imported_modules(f) if name.split('.')[0] in test_modules]
  assert not bad, 'shared helpers belong in tests/helpers.py or conftest.py: ' + '; '.join(bad)


def test_the_checker_sees_both_import_forms(tmp_path):
  path = tmp_path / 'test_x.py'
  path.write_text('import os\nimport test_a\ndef f():\n  from test_b import g\n')
  assert [n for _, n in imported_modules(str(path))] == ['os', 'test_a', 'test_b']


def collected(tmp_path, *args):
  """Test ids that the project's pytest settings collect from a file with a slow test."""
  (tmp_path / 'test_marks.py').write_text(
      'import pytest\n\n@pytest.mark.slow\ndef test_slow():\n  pass\n\ndef test_fast():\n  pass\n')
  out = subprocess.run(
      [sys.executable, '-m', 'pytest', '-c', os.path.join(ROOT, 'pyproject.toml'),
       '--rootdir', str(tmp_path), '-p', 'no:cacheprovider', '-n', '0', '--collect-only', '-q',
       *args, str(tmp_path / 'test_marks.py')],
      capture_output=True, text=True, cwd=str(tmp_path), check=False)
  assert out.returncode == 0, out.stdout + out.stderr
  return sorted(l.split('::')[-1] for l in out.stdout.splitlines() if '::' in l)


def test_slow_tests_are_left_out_by_default_and_run_with_m_slow(tmp_path):
  assert collected(tmp_path) == ['test_fast']
  assert collected(tmp_path, '-m', 'slow') == ['test_slow']
