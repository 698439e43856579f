"""The experiments: every script in --smoke mode, manual == autodiff, and the full-config targets.

charlm's and gradient_flow's full targets are checked by experiments/run_all.py
(charlm trains for minutes), and reported in results/README.md.
"""

import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "experiments"))

SCRIPTS = ("counting", "bitsum", "sine", "charlm", "gradient_flow", "truncation")


def _numbers(tree):
  """Every number in a JSON-like tree, flattened (strings and bools dropped)."""
  if isinstance(tree, dict):
    return [x for k in sorted(tree) if k != "config" for x in _numbers(tree[k])]
  if isinstance(tree, (list, tuple)):
    return [x for v in tree for x in _numbers(v)]
  if isinstance(tree, (int, float)) and not isinstance(tree, bool):
    return [float(tree)]
  return []


def _run(name, tmp_path, *args):
  import importlib
  module = importlib.import_module(name)
  with jax.numpy_dtype_promotion("standard"):  # the scripts run under default settings
    return module.main(["--out", str(tmp_path), *args])


@pytest.mark.parametrize("name", SCRIPTS)
def test_smoke_manual_equals_autodiff(name, tmp_path):
  manual = _run(name, tmp_path / "manual", "--smoke", "--dtype", "float64")
  auto = _run(name, tmp_path / "autodiff", "--smoke", "--dtype", "float64", "--grad", "autodiff")
  assert (tmp_path / "manual" / "metrics.json").exists()
  assert (tmp_path / "manual" / f"{name}.png").stat().st_size > 10_000
  saved = json.loads((tmp_path / "manual" / "metrics.json").read_text())
  a, b = _numbers(manual), _numbers(auto)
  assert len(a) == len(b) > 0 and len(_numbers(saved)) >= len(a) - 5
  assert all(math.isfinite(x) for x in a), name
  time_keys = ("train_seconds",)  # wall-clock time is the one number allowed to differ
  a = _numbers({k: v for k, v in manual.items() if k not in time_keys})
  b = _numbers({k: v for k, v in auto.items() if k not in time_keys})
  np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def test_compare_gradients_smoke(tmp_path):
  import compare_gradients
  rows = compare_gradients.main(["--smoke", "--out", str(tmp_path)])
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert len(metrics["rows"]) == len(rows) == 5  # 4 cases (below), finite differences
  assert [r["case"]["tau_max"] is not None for r in rows[:-1]] == [False, True, False, False]
  assert [r["case"]["ragged"] for r in rows[:-1]] == [False, False, True, False]
  assert [r["case"]["checkpoint_every"] for r in rows[:-1]] == [None, None, None, 10]
  for r in rows[:-1]:
    assert max(r["rel_error_vs_autodiff"].values()) < 1e-10
    assert np.isfinite(r["time_manual_s"]) and np.isfinite(r["time_autodiff_s"])
  assert max(rows[-1]["rel_error_vs_finite_differences"].values()) < 1e-6
  assert (tmp_path / "table.md").exists()


def test_run_all_smoke_writes_report(tmp_path):
  import run_all
  targets = run_all.main(["--smoke", "--only", "counting,gradient_flow", "--out", str(tmp_path)])
  report = (tmp_path / "README.md").read_text()
  assert "![counting](counting/counting.png)" in report and "Smoke run" in report
  assert set(targets) == {"counting", "gradient_flow"}


FULL = ("counting", "bitsum", "sine", "truncation")


@pytest.fixture(scope="module")
def full_runs(request, tmp_path_factory):
  """The full default configs, run as a user runs them: separate processes with default
  JAX/XLA settings (the suite's float64 and low XLA optimisation level would make
  training several times slower), all started at once. (Starting them with the module,
  to overlap its smoke tests, was measured slower: the two cores are already busy.)

  Only the configs whose tests were selected start (``-k``), and a run that no test
  waited for (one that failed first, or, under ``--dist load``, another worker's) is
  killed at the end of the module, never left running."""
  import os
  import subprocess
  selected = {item.callspec.params["name"] for item in request.session.items
              if getattr(item, "originalname", "") == "test_full_config_meets_its_targets"}
  root = tmp_path_factory.mktemp("full")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
  here = pathlib.Path(__file__).resolve().parent.parent / "experiments"
  procs = {name: subprocess.Popen([sys.executable, str(here / f"{name}.py"), "--out",
                                   str(root / name)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
           for name in FULL if name in selected}
  yield root, procs
  for proc in procs.values():
    if proc.returncode is None:
      proc.kill()
      proc.communicate()


@pytest.mark.xdist_group("full_configs")  # one worker starts the runs once (module fixture)
@pytest.mark.parametrize("name", FULL)
def test_full_config_meets_its_targets(name, full_runs):
  root, procs = full_runs
  out, _ = procs[name].communicate(timeout=600)
  assert procs[name].returncode == 0, out[-3000:]
  metrics = json.loads((root / name / "metrics.json").read_text())
  assert metrics["targets"] and all(metrics["targets"].values()), metrics["targets"]
  if name == "sine":  # it learned a sine, not the training sequence: it goes on past t = 4π
    assert metrics["beyond_training_rmse"] < 0.15, metrics["beyond_training_rmse"]
  if name == "counting":  # the reading of the target, spelled out
    assert abs(metrics["w_x"] - 1) < 1e-2 and abs(metrics["w_rec"] - 1) < 1e-2
    assert abs(metrics["test_count"] - metrics["test_true_count"]) < 0.05
    # the contrast it draws: SGD ends far from (1, 1) at every rate it tries
    sweep = metrics["sgd_sweep"]
    assert set(sweep) == {f"{lr:g}" for lr in metrics["config"]["sgd_sweep"]}
    assert len(sweep) == 7 and f"{metrics['config']['sgd_lr']:g}" in sweep
    assert all(np.hypot(r["final_params"][0] - 1, r["final_params"][1] - 1) > 0.5
               for r in sweep.values()), sweep


@pytest.mark.parametrize("name,args,words", [
    ("sine", ["--steps", "0"], "--steps must be > 0; got 0"),
    ("sine", ["--window", "100"], "--window must be < --n_points; got 100 >= 100"),
    ("sine", ["--resume", "maybe"], "argument --resume: expected true or false"),
    ("counting", ["--start", "(1, 2, 3)"], "argument --start: expected a tuple of 2"),
    ("counting", ["--sgd_lr=-1e-5"], "--sgd_lr must be >= 0"),
    ("counting", ["--grid", "1"], "--grid must be >= 2; got 1"),
    ("bitsum", ["--hidden", "(4, 0)"], "--hidden must be a non-empty tuple with every element > 0"),
    ("bitsum", ["--hidden", "('a',)"], "argument --hidden: expected a tuple like (6, 4)"),
    ("bitsum", ["--min_bits", "9"], "--min_bits must be <= --max_bits; got 9 > 8"),
    ("charlm", ["--tau_max", "10"], "--tau_max must be >= --tau_b; got 10 < 25"),
    ("charlm", ["--grad", "numeric"], "--grad must be one of ('manual', 'autodiff')"),
    ("charlm", ["--heldout_every", "1"], "--heldout_every must be >= 2; got 1"),
    ("charlm", ["--smoke", "--train_chars", "32"],
     "--train_chars must be >= --streams * --tau_b + 1 = 33; got 32"),
    ("charlm", ["--heldout_chars", "800"],
     "--heldout_chars must be >= --streams * --tau_b + 1 = 801; got 800"),
    ("gradient_flow", ["--activations", "('gelu',)"], "--activations must be a non-empty tuple"),
    ("gradient_flow", ["--T", "1"], "--T must be >= 2 (a rate is fitted over lags); got 1"),
    ("gradient_flow", ["--radii", "(1.0, 0.0)"],
     "--radii must be a non-empty tuple with every element > 0"),
    ("truncation", ["--lag", "30"], "--lag must be < --T; got 30 >= 30"),
    ("truncation", ["--lag", "0"], "--lag must be > 0; got 0"),
    ("compare_gradients", ["--repeats", "0"], "--repeats must be > 0"),
    ("bench", ["--precision", "tf32"], "--precision must be one of ('default', 'float32')"),
    ("bench", ["--points", "(10,)"], "--points must be distinct row indices in [0, 10) of the grid"),
    ("profile_ops", ["--calls", "0"], "--calls must be > 0"),
    ("profile_ops", ["--tau_max", "2", "--tau_b", "3"], "--tau_max must be >= --tau_b; got 2 < 3"),
])
def test_bad_overrides_are_usage_errors(name, args, words, capsys):
  """A bad --option stops the script before it runs, with argparse's usage error (exit 2)."""
  import importlib
  module = importlib.import_module(name)
  with pytest.raises(SystemExit) as info:
    module.parse_config(module.Config, args, smoke=getattr(module, "SMOKE", None))
  assert info.value.code == 2
  assert words in capsys.readouterr().err


@pytest.mark.parametrize("name", SCRIPTS + ("compare_gradients", "bench", "profile_ops"))
def test_help_shows_each_options_comment(name, capsys):
  """--help prints every option with the comments the config's source gives it (above the
  field and at the end of its line) and its default. A '%' in a comment once made argparse
  fail on --help (sine's and bitsum's 'decay to 1% of it')."""
  import dataclasses
  import importlib
  from _common import field_comments
  module = importlib.import_module(name)
  with pytest.raises(SystemExit) as info:
    module.parse_config(module.Config, ["--help"])
  assert info.value.code == 0
  text = " ".join(capsys.readouterr().out.split())      # argparse wraps lines
  comments = field_comments(module.Config)
  for f in dataclasses.fields(module.Config):
    if f.name != "smoke":
      assert f"--{f.name} {f.name.upper()}" in text, f.name
    if f.name in comments:
      assert " ".join(comments[f.name].split()) in text, f.name
  expected = {"counting": ("grad", "manual | autodiff"),
              "bench": ("precision", 'float32 matrix products: "default" leaves each library')}
  if name in expected:                                   # a trailing and a leading comment
    field, words = expected[name]
    assert comments[field].startswith(words)


def test_charlm_names_a_corpus_too_small_for_its_streams(tmp_path, monkeypatch):
  """The config's bound is met, but this Python's stdlib holds less text than asked for:
  a ValueError naming the sizes, not a division by zero or a NaN held-out score."""
  import charlm
  real = charlm.load_corpus

  def tiny(cfg):
    corpus, n = real(cfg)
    text, starts = corpus["train"]
    corpus["train"] = (text[:20], starts[starts < 20])
    return corpus, n
  monkeypatch.setattr(charlm, "load_corpus", tiny)
  with pytest.raises(ValueError, match=r"the training text has 20 characters, too few for one "
                                       r"chunk of --tau_b 8 in each of --streams 4"):
    charlm.run(charlm.SMOKE)


def test_gradient_flow_fits_rates_only_where_the_dtype_holds_the_deltas():
  """In float32 the deltas of identity with ρ = 3 overflow after some dozens of steps (and
  sigmoid's underflow): the rate is fitted over the steps before, and is still log(ρ γ);
  norms of entries near the float32 limit are computed without overflow."""
  import gradient_flow as gf
  lags = np.arange(60)[::-1]                                      # lag 0: the last step
  grow = np.where(lags > 40, np.inf, 1e-5 * 3.0 ** lags).astype(np.float32)   # overflowed
  fall = (0.125 ** lags).astype(np.float32)                       # subnormal, then 0
  d = [np.stack([grow, 2 * grow], -1)[:, None, :],                # [T, B = 1, H = 2]
       np.stack([fall, fall], -1)[:, None, :]]
  norms, ok = gf.delta_norms(d, np.float32)
  assert ok[0].sum() == 41 and ok[1].sum() == 43   # 0.125^42 = 2^-126: float32's least normal
  np.testing.assert_allclose(gf.fit_rate(norms[0], ok[0]), np.log(3.0), rtol=1e-6)
  np.testing.assert_allclose(gf.fit_rate(norms[1], ok[1]), np.log(0.125), rtol=1e-6)
  big = np.full((1, 1, 4), 1e30, np.float32)           # squares overflow float32, not the norm
  np.testing.assert_allclose(gf.delta_norms([big], np.float32)[0], [[2e30]], rtol=1e-6)
  assert gf.fit_rate(norms[0], np.arange(60) == 3) is None    # one measurable step: no rate

  cfg = gf.Config(T=60, hidden=(4,), radii=(3.0,), activations=("identity",), dtype="float32")
  metrics, _ = gf.run(cfg)
  row, = metrics["rates"]
  assert 2 <= row["fitted_steps"] < 60
  np.testing.assert_allclose(row["fitted_rate"], np.log(3.0), atol=1e-4)


def test_results_are_strict_json(tmp_path):
  """NaN and infinity (a diverged run, an overflowed norm) are written as null: strict JSON."""
  from _common import write_json

  def strict(token):
    raise AssertionError(f"invalid JSON token {token}")
  write_json(tmp_path / "m.json", dict(a=float("nan"), b=[1.0, -np.inf], c=np.array([2.0, np.nan]),
                                       d=np.float32(2.5), e=(np.int64(3), "x", None, True)))
  saved = json.loads((tmp_path / "m.json").read_text(), parse_constant=strict)
  assert saved == dict(a=None, b=[1.0, None], c=[2.0, None], d=2.5, e=[3, "x", None, True])


def test_counting_reports_a_run_whose_every_step_overflowed(tmp_path, capsys):
  """From (50, 50) the gradient overflows float32 at once, so every step is skipped: the
  metrics say so (final loss None, targets missed) instead of failing on an empty list."""
  metrics = _run("counting", tmp_path, "--smoke", "--start", "(50.0, 50.0)", "--steps", "2",
                 "--dtype", "float32")
  assert metrics["final_loss"] == dict(rprop=None, adam=None, sgd=None)
  assert metrics["skipped_steps"] == dict(rprop=2, adam=2, sgd=2)
  assert not any(metrics["targets"].values())
  assert "loss not finite at any step" in capsys.readouterr().out


def test_run_all_names_an_unknown_experiment(capsys):
  import run_all
  with pytest.raises(SystemExit) as info:
    run_all.main(["--only", "counting,bogus", "--smoke"])
  assert info.value.code == 2
  assert "--only: unknown experiment(s) ['bogus']" in capsys.readouterr().err


def test_bench_precision_is_checked():
  import bench
  with pytest.raises(ValueError, match="precision must be one of"):
    bench.set_precision("tf32")


def test_bench_smoke(tmp_path):
  import bench
  result = bench.main(["--smoke", "--out", str(tmp_path)])
  assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.md").exists()
  for r in result["rows"]:
    assert all(np.isfinite(t) and t > 0 for t in r["time_s"].values())
    assert r["temp_bytes"]["jaxrnn.bptt"] > 0
  (ck,) = result["summary"]["checkpoint"]     # one checkpointed row in the smoke grid
  assert ck["mode"] == "bptt checkpoint_every=7" and 0 < ck["temp_memory_ratio"] < 1


def test_bench_points_and_environment(tmp_path, monkeypatch):
  """``--points`` runs the named grid rows; allocator and XLA variables are recorded."""
  import bench
  assert bench.select_points(bench.GRID, ()) == bench.GRID
  assert bench.select_points(bench.GRID, 2) == (bench.GRID[2],)
  assert bench.select_points(bench.GRID, (5, 0)) == (bench.GRID[5], bench.GRID[0])
  for bad in ((10,), (-1,), (1, 1), (True,), ("2",)):
    with pytest.raises(ValueError, match=r"points must be distinct row indices in \[0, 10\)"):
      bench.select_points(bench.GRID, bad)
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert bench.environment()["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=1"
  assert "XLA_FLAGS" not in bench.environment()
  result = bench.main(["--smoke", "--peers", "false", "--points", "(1,)", "--out", str(tmp_path)])
  assert [r["options"] for r in result["rows"]] == [bench.SMOKE_GRID[1][1]]
  table = (tmp_path / "bench.md").read_text()
  assert "GLIBC_TUNABLES=glibc.malloc.arena_max=1" in table and "Only rows (1,)" in table


def test_bench_compiles_only_the_named_methods():
  """``compiled_methods(names=...)`` (what profile_ops.py uses): those methods, or a ValueError."""
  import bench
  dims, opts = (6, 2, 3, 4, 1), dict(checkpoint_every=3)
  compiled, _ = bench.compiled_methods(dims, opts, names=(bench.checkpointed_name(3),))
  assert list(compiled) == ["bptt checkpoint_every=3"]
  with pytest.raises(ValueError, match=r"names must be among \['jaxrnn.bptt', "
                                       r"'jaxrnn.autodiff_bptt', 'bptt checkpoint_every=3'\]"):
    bench.compiled_methods(dims, opts, names=("jaxrnn.grad",))


def test_bench_heap_option_moves_memory_not_values():
  """``--heap_mib``: XLA's temp memory split into heaps; same results, bit for bit."""
  import bench
  assert bench.compiler_options(0) is None
  assert bench.compiler_options(30) == {"xla_multiheap_size_constraint_per_heap": 30 << 20}
  with pytest.raises(ValueError, match="heap_mib must be >= 0"):
    bench.compiler_options(-1)
  params = jaxrnn.init_params(jax.random.key(0), 3, (8, 8), 3, dtype=jnp.float32)
  xs = jax.random.normal(jax.random.key(1), (30, 4, 3), jnp.float32)
  f = jax.jit(lambda p, x: jaxrnn.bptt(p, x, x)).lower(params, xs)
  one, split = f.compile(), f.compile(compiler_options=bench.compiler_options(1 / 256))
  # 4 KiB heaps: [30, 4, 8] float32 arrays (3.75 KiB) no longer share one allocation
  assert (split.memory_analysis().temp_size_in_bytes
          > one.memory_analysis().temp_size_in_bytes)
  for a, b in zip(jax.tree.leaves(one(params, xs)), jax.tree.leaves(split(params, xs))):
    np.testing.assert_array_equal(a, b)


def test_profile_smoke(tmp_path):
  """experiments/profile_ops.py: per-operation times of one call, loop operations T times a call."""
  if jax.default_backend() != "cpu":
    pytest.skip("profile_ops.py reads XLA:CPU's thread events")
  import profile_ops as prof
  result = prof.main(["--smoke", "--out", str(tmp_path)])
  suffixes = {p.suffix for p in tmp_path.iterdir()}
  assert suffixes == {".json", ".md", ".png"}
  T = result["dims"][0]
  runs = [r["runs_per_call"] for r in result["ops"]]
  assert T in runs and T - 1 in runs            # forward loop steps; reverse loop (step 0 peeled)
  loop_products = [r for r in result["ops"]
                   if r["runs_per_call"] >= T - 1 and "dot_general" in r["source"]]
  assert len(loop_products) == 2, result["ops"]  # one per loop: h W_hh and δz W_hhᵀ
  assert all(r["shape"] == "f32[4,8]" for r in loop_products)
  assert result["wall_ms"] > 0 and result["temp_mb"] > 0
  assert all(r["us_per_run"] >= 0 for r in result["ops"])


def test_profile_checks_its_config():
  import profile_ops as prof
  with pytest.raises(ValueError, match="method must be one of"):
    prof.Config(method="grad")
  with pytest.raises(ValueError, match="checkpoint_every is an option of method 'bptt'"):
    prof.Config(method="autodiff", checkpoint_every=10)
  with pytest.raises(ValueError, match="--H must be > 0; got 0"):
    prof.Config(H=0)
