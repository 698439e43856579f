"""The README's Python examples run as printed, in order, in one session (as a reader pastes them).

Before this test, three of the five had drifted: the ragged-batch example fed
D = 1 inputs to the API tour's D = 3 model, the training example then trained
on its many-to-one targets, and the sharding and streaming examples used names
that no example defined (``P``, ``chunks``).
"""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _examples():
  return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def test_readme_examples_run_in_order():
  examples = _examples()
  assert len(examples) >= 5, "the README's Python examples were not found"
  session = {}
  for i, code in enumerate(examples):
    exec(compile(code, f"README.md, Python example {i + 1}", "exec"), session)  # noqa: S102
  # what their comments say they give
  assert [h.shape for h in session["hs"]] == [(20, 4, 16), (20, 4, 8)]
  assert [d.shape for d in session["deltas"]] == [(20, 4, 16), (20, 4, 8)]
  assert [h.shape for h in session["dh0"]] == [(4, 16), (4, 8)]
  assert session["result"].history["step"][-1] == 999 and session["result"].skipped == 0
  assert np.isfinite(float(session["loss"]))
