"""Every experiment script runs end to end in --smoke mode."""

import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))


def test_compare_gradients_smoke(tmp_path):
  import compare_gradients
  rows = compare_gradients.main(["--smoke", "--out", str(tmp_path)])
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert len(metrics["rows"]) == len(rows) >= 4
  for r in rows[:-1]:
    assert max(r["rel_error_vs_autodiff"].values()) < 1e-10
    assert np.isfinite(r["time_manual_s"]) and np.isfinite(r["time_autodiff_s"])
  assert max(rows[-1]["rel_error_vs_finite_differences"].values()) < 1e-6
  assert (tmp_path / "table.md").exists()
