"""The annotations are part of the API (the package ships ``py.typed``): mypy
passes on the package and on a typed use of it, and refuses misuses of it."""

import pathlib
import re
import runpy
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
HERE = pathlib.Path(__file__).resolve().parent / "typing"


def test_the_package_ships_its_annotations():
  assert (ROOT / "jaxrnn" / "py.typed").is_file()


def test_mypy_passes_on_the_package_and_a_typed_use_and_refuses_each_misuse(tmp_path):
  files = ["jaxrnn", "tests/typing/usage.py", "tests/typing/misuse.py"]
  run = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path),
                        "--no-error-summary", "--hide-error-context", *files],
                       cwd=ROOT, capture_output=True, text=True)
  assert run.returncode in (0, 1), run.stderr + run.stdout   # 2: mypy itself failed
  errors = {}
  for line in run.stdout.splitlines():
    m = re.match(r"(.+?):(\d+): error: (.*)", line)
    if m:
      errors.setdefault((pathlib.Path(m[1]).as_posix(), int(m[2])), []).append(m[3])
  misuse = HERE / "misuse.py"
  expected = {("tests/typing/misuse.py", n)
              for n, text in enumerate(misuse.read_text().splitlines(), 1) if "# error:" in text}
  assert len(expected) == 9
  unexpected = {k: v for k, v in errors.items() if k not in expected}
  assert not unexpected, f"mypy errors outside the marked misuses: {unexpected}"
  missed = sorted(n for _, n in expected - errors.keys())
  assert not missed, f"mypy accepted the misuses on lines {missed} of {misuse.name}"


def test_the_typed_use_runs():
  """The usage file's calls are real ones: the types it states are what returns."""
  runpy.run_path(str(HERE / "usage.py"))
