"""Nothing lost when a run dies: atomic checkpoints, corruption detection, bitwise resume."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrnn
from jaxrnn._src import persist
from helpers import make_problem

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _state():
  params, _, _ = make_problem(0, T=3, B=2, hidden=(3,))
  return params, optax.adam(0.1).init(params)


def test_newest_corrupted_or_truncated_checkpoint_falls_back(tmp_path):
  template = _state()
  for step in (10, 20, 30):
    persist.save(tmp_path, step, jax.tree.map(lambda x: x + step, template), dict(note=step))
  newest = tmp_path / "ckpt_000000030.npz"
  data = newest.read_bytes()
  newest.write_bytes(data[: len(data) // 2])                     # truncated
  (state, record), warned = _load_latest_warned(tmp_path, template)
  assert record["step"] == 20 and record["note"] == 20
  assert len(warned) == 1 and re.search(r"skipping checkpoint .*ckpt_000000030", warned[0])
  # a flipped byte in the payload: the checksum catches it
  middle = tmp_path / "ckpt_000000020.npz"
  raw = bytearray(middle.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  middle.write_bytes(bytes(raw))
  (_, record), warned = _load_latest_warned(tmp_path, template)
  assert record["step"] == 10
  assert [re.search(r"ckpt_0000000\d0", w).group() for w in warned] == [
      "ckpt_000000030", "ckpt_000000020"]                      # newest first, each named once
  # a checkpoint of another model does not fit the template
  other = make_problem(0, T=3, B=2, hidden=(5,))[0]
  loaded, warned = _load_latest_warned(tmp_path, (other, optax.adam(0.1).init(other)))
  assert loaded is None
  assert len(warned) == 3 and "the state expects" in warned[2] and "ckpt_000000010" in warned[2]
  # a state of more or fewer arrays (another optimizer): the counts, not a KeyError
  for opt, n in ((optax.sgd(0.1), 5), (optax.chain(optax.adam(0.1), optax.adam(0.1)), 27)):
    loaded, warned = _load_latest_warned(tmp_path, (template[0], opt.init(template[0])))
    assert loaded is None and "ckpt_000000010" in warned[2], warned
    assert f"it holds 16 arrays, the state has {n}" in warned[2], warned


def test_checkpoints_are_ordered_by_step_number_and_keep_is_checked(tmp_path):
  template = _state()
  for step in (999_999_999, 1_000_000_000, 1_000_000_001):  # the name grows a digit
    persist.save(tmp_path, step, template, {}, keep=2)
  (tmp_path / "ckpt_best.npz").write_bytes(b"not a checkpoint of a step")
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "ckpt_1000000000.npz", "ckpt_1000000001.npz", "ckpt_best.npz"]
  _, record = persist.load_latest(tmp_path, template)
  assert record["step"] == 1_000_000_001
  for kw, words in ((dict(keep=0), ["keep", ">= 1", "0"]), (dict(step=-1), ["step", ">= 0"]),
                    (dict(step=1.0), ["step", "int", "float"])):
    with pytest.raises(ValueError) as info:
      persist.save(tmp_path, **dict(dict(step=5, state=template, record={}), **kw))
    assert all(w in str(info.value) for w in words), str(info.value)
  assert len(list(tmp_path.iterdir())) == 3  # nothing written, nothing deleted


def test_checkpoint_folder_and_record_errors_name_them(tmp_path):
  state = (jnp.ones(2),)
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  for call in (lambda: jaxrnn.save_checkpoint(a_file, 1, state, {}),
               lambda: jaxrnn.load_latest_checkpoint(a_file, state),
               lambda: jaxrnn.start_from_checkpoint(a_file, state)):
    with pytest.raises(NotADirectoryError, match="'.*a_file' is a file, not a folder"):
      call()
  with pytest.raises(TypeError, match="record must be JSON-serialisable"):
    jaxrnn.save_checkpoint(tmp_path / "run", 1, state, {"when": object()})
  assert not (tmp_path / "run").exists()   # refused before anything was written


def test_bfloat16_state_round_trips(tmp_path):
  """NumPy's file format has no bfloat16: such leaves are stored as raw bits and come
  back bit for bit (before, every bfloat16 checkpoint failed its checksum and was skipped)."""
  params = jaxrnn.init_params(jax.random.key(0), 2, (3,), 1, dtype=jax.numpy.bfloat16)
  state = (params, jax.numpy.arange(3.0))           # float64 leaves stay plain NumPy arrays
  persist.save(tmp_path, 7, state, dict(note="x"))
  loaded, record = persist.load_latest(tmp_path, state)
  assert record == dict(note="x", step=7)
  jax.tree.map(np.testing.assert_array_equal, loaded, state)
  assert all(a.dtype == b.dtype for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state)))
  # a float32 template does not silently take the bfloat16 bits
  as32 = jax.tree.map(lambda a: a.astype(np.float32), state)
  loaded, warned = _load_latest_warned(tmp_path, as32)
  assert loaded is None and "bfloat16[2, 3], the state expects float32[2, 3]" in warned[0]


def test_typed_prng_keys_round_trip(tmp_path):
  """A typed PRNG key (``jax.random.key``, what JAX recommends, and what the state of
  optax.noisy_sgd / add_noise holds) has no NumPy form: its key data is stored and the
  key rewrapped with its implementation (before, save raised NumPy's TypeError)."""
  keys = (jax.random.key(3), jax.random.split(jax.random.key(4, impl="rbg"), 3),
          jax.random.PRNGKey(5))                    # a raw uint32[2] key stays an array
  state = (keys, jnp.arange(3.0))
  persist.save(tmp_path, 2, state, {})
  loaded, record = persist.load_latest(tmp_path, state)
  assert record == dict(step=2)
  assert [a.dtype for a in jax.tree.leaves(loaded)] == [a.dtype for a in jax.tree.leaves(state)]
  for got, want in zip(loaded[0][:2], keys[:2]):
    np.testing.assert_array_equal(jax.random.key_data(got), jax.random.key_data(want))
  np.testing.assert_array_equal(loaded[0][2], keys[2])
  # the restored keys draw what the saved ones draw
  np.testing.assert_array_equal(jax.random.normal(loaded[0][0], (4,)),
                                jax.random.normal(keys[0], (4,)))
  # a template of another implementation, or a raw key, does not take the typed one
  for other, words in ((jax.random.key(3, impl="rbg"), "key<fry>[], the state expects key<rbg>[]"),
                       (jax.random.PRNGKey(3), "key<fry>[], the state expects uint32[2]")):
    template = ((other,) + keys[1:], state[1])
    loaded, warned = _load_latest_warned(tmp_path, template)
    assert loaded is None and words in warned[0], warned


def _jitter(scale, seed):
  """An optax transformation that adds noise from a typed key it carries in its state."""
  def init(params):
    return jax.random.key(seed)

  def update(updates, key, params=None):
    key, sub = jax.random.split(key)
    leaves, treedef = jax.tree.flatten(updates)
    noise = [scale * jax.random.normal(k, u.shape, u.dtype)
             for k, u in zip(jax.random.split(sub, len(leaves)), leaves)]
    return treedef.unflatten([u + n for u, n in zip(leaves, noise)]), key
  return optax.GradientTransformation(init, update)


def test_fit_with_a_prng_key_in_the_optimizer_state_resumes_bitwise(tmp_path):
  """fit checkpoints an optimizer state holding a typed key (before, its first checkpoint
  raised TypeError after the step had run) and resumes bitwise."""
  params, xs, targets = make_problem(1, T=4, B=2, hidden=(3,))
  opt = optax.chain(_jitter(1e-3, seed=7), optax.sgd(0.05))
  step = jaxrnn.make_train_step(opt)
  batches = lambda i: dict(xs=xs * (1 + 0.01 * i), targets=targets)
  full = jaxrnn.fit(step, params, opt.init(params), batches, 6, progress=False)
  def crashing(i):
    if i == 4:
      raise KeyboardInterrupt("the run dies at step 4")
    return batches(i)

  with pytest.raises(KeyboardInterrupt):
    jaxrnn.fit(step, params, opt.init(params), crashing, 6, progress=False,
               checkpoint_dir=tmp_path, checkpoint_every=3)
  assert [p.name for p in tmp_path.iterdir()] == ["ckpt_000000003.npz"]
  resumed = jaxrnn.fit(step, params, opt.init(params), batches, 6, progress=False,
                       checkpoint_dir=tmp_path, checkpoint_every=3)
  np.testing.assert_array_equal(jax.random.key_data(resumed.opt_state[0]),
                                jax.random.key_data(full.opt_state[0]))
  jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
  assert resumed.history == full.history


def _load_latest_warned(path, template):
  """``persist.load_latest`` and the messages of every RuntimeWarning it raised (at least one)."""
  with pytest.warns(RuntimeWarning) as record:
    loaded = persist.load_latest(path, template)
  return loaded, [str(w.message) for w in record]


def test_fit_resumes_bitwise(tmp_path):
  params, xs, targets = make_problem(1, T=6, B=2, hidden=(4,))
  opt = optax.adam(0.05)
  step = jaxrnn.make_train_step(opt)
  batches = lambda i: dict(xs=xs * (1 + 0.01 * i), targets=targets)
  full = jaxrnn.fit(step, params, opt.init(params), batches, 20, log_every=3, progress=False)
  def crashing(i):
    if i == 10:
      raise KeyboardInterrupt("the run dies at step 10")
    return batches(i)

  with pytest.raises(KeyboardInterrupt):
    jaxrnn.fit(step, params, opt.init(params), crashing, 20, log_every=3, progress=False,
               checkpoint_dir=tmp_path, checkpoint_every=5)
  # the checkpoint after step 9 is written, though step 9's metrics are read only
  # once step 10 is dispatched, and step 10's batch is where the run died
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000005.npz",
                                                        "ckpt_000000010.npz"]
  resumed = jaxrnn.fit(step, params, opt.init(params), batches, 20, log_every=3,
                       progress=False, checkpoint_dir=tmp_path, checkpoint_every=5)
  jax.tree.map(np.testing.assert_array_equal, (resumed.params, resumed.opt_state),
               (full.params, full.opt_state))
  assert resumed.history == full.history


def test_fit_never_mixes_its_checkpoints_with_another_runs(tmp_path):
  """Checkpoints rotate by step number, so an earlier run's at higher steps outrank a new
  run's: before, a fresh fit (resume=False, or resume=True with a state the files do not
  fit) had each of its checkpoints deleted as the oldest, and a later resume continued the
  earlier run. Now fit refuses before any step, naming the files, and touches nothing."""
  params, xs, targets = make_problem(1, T=6, B=2, hidden=(4,))
  opt = optax.sgd(0.1)
  step = jaxrnn.make_train_step(opt)
  batches = lambda i: dict(xs=xs, targets=targets)
  jaxrnn.fit(step, params, opt.init(params), batches, 30, progress=False,
             checkpoint_dir=tmp_path, checkpoint_every=10)
  before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
  assert sorted(before) == ["ckpt_000000010.npz", "ckpt_000000020.npz", "ckpt_000000030.npz"]
  steps_run = []
  counting = lambda i: steps_run.append(i) or batches(i)
  with pytest.raises(ValueError, match=r"it holds an earlier run's checkpoints and resume=False: "
                                       r"ckpt_000000010.npz, ckpt_000000020.npz, "
                                       r"ckpt_000000030.npz\. .* resume=True"):
    jaxrnn.fit(step, params, opt.init(params), counting, 10, progress=False,
               checkpoint_dir=tmp_path, checkpoint_every=5, resume=False)
  other = make_problem(1, T=6, B=2, hidden=(5,))[0]
  with pytest.warns(RuntimeWarning, match="the state expects") as warned, \
      pytest.raises(ValueError, match="none of its checkpoints fits this training state"):
    jaxrnn.fit(step, other, opt.init(other), counting, 10, progress=False,
               checkpoint_dir=tmp_path, checkpoint_every=5)
  assert len(warned) == 3 and "It was the oldest one." in str(warned[-1].message)
  assert steps_run == [] and {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
  # what still works: resuming the run (done: nothing to do), a fresh run in a new folder
  done = jaxrnn.fit(step, params, opt.init(params), counting, 30, progress=False,
                    checkpoint_dir=tmp_path, checkpoint_every=10)
  assert steps_run == [] and done.history["step"][-1] == 29
  with pytest.raises(ValueError, match=r"newest usable checkpoint is at step 30, past "
                                       r"num_steps=20\. Ask for at least 30 steps"):
    jaxrnn.fit(step, params, opt.init(params), counting, 20, progress=False,
               checkpoint_dir=tmp_path)                 # was: the 30-step state, silently
  jaxrnn.fit(step, params, opt.init(params), counting, 2, progress=False,
             checkpoint_dir=tmp_path / "new", resume=False)
  assert steps_run == [0, 1]


def _sine(out, *extra):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_ENABLE_X64")}
  # On a GPU two processes can pick different matrix-product kernels (autotuning)
  # and reduce in different orders; bitwise reproducibility needs these there.
  # The CPU ignores them.
  env["XLA_FLAGS"] = "--xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0"
  return subprocess.Popen([sys.executable, str(ROOT / "experiments" / "sine.py"), "--steps",
                           "2000", "--checkpoint_every", "50", "--out", str(out), *extra],
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _result(out):
  metrics = json.loads((out / "metrics.json").read_text())
  metrics.pop("config")
  with np.load(out / "params.npz") as z:
    params = [z[k] for k in sorted(z.files)]
  return metrics, params


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
  a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
  runs = [_sine(a), _sine(b), _sine(c)]
  # kill run c once it has written a checkpoint part-way
  deadline = time.time() + 300
  while not any(int(p.stem[5:]) >= 400 for p in (c / "checkpoints").glob("ckpt_*.npz")):
    assert runs[2].poll() is None, "the run ended before it could be killed"
    assert time.time() < deadline
    time.sleep(0.02)
  runs[2].send_signal(signal.SIGKILL)
  runs[2].communicate()                       # reads and closes its stderr pipe
  assert runs[2].returncode == -signal.SIGKILL and not (c / "metrics.json").exists()
  resumed = _sine(c, "--resume", "true")
  for p in runs[:2] + [resumed]:
    err = p.communicate(timeout=300)[1]
    assert p.returncode == 0, err[-2000:]

  (ma, pa), (mb, pb), (mc, pc) = _result(a), _result(b), _result(c)
  assert ma == mb, "two runs with the same config and seed differ"
  assert ma == mc, "the resumed run differs from the uninterrupted one"
  for x, y, z in zip(pa, pb, pc):
    np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(x, z)


def test_streaming_charlm_resumes_bitwise(tmp_path):
  """The streaming trainer checkpoints params, optimizer state and the stream's carried
  state; a run that lost its newest checkpoints resumes from an older one and ends the same."""
  import shutil
  sys.path.insert(0, str(ROOT / "experiments"))
  import charlm
  args = ["--smoke", "--checkpoint_every", "3"]      # 12 updates; keeps 6, 9 and 12
  with jax.numpy_dtype_promotion("standard"):
    full = charlm.main(args + ["--out", str(tmp_path / "a")])
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")
    for step in (9, 12):                                # as if it died after update 6
      (tmp_path / "b" / "checkpoints" / f"ckpt_{step:09d}.npz").unlink()
    resumed = charlm.main(args + ["--resume", "true", "--out", str(tmp_path / "b")])
  for m in (full, resumed):
    m.pop("config")
    m.pop("train_seconds")
  assert full == resumed
  # another model's checkpoints are never trained on top of (they would outrank the new ones)
  with pytest.warns(RuntimeWarning, match="the state expects"), \
      pytest.raises(ValueError, match="checkpoints.*: none of its checkpoints fits this "
                                      "training state"):
    charlm.main(args + ["--resume", "true", "--hidden", "8", "--out", str(tmp_path / "b")])
  with pytest.raises(ValueError, match=r"checkpoints.*: its newest usable checkpoint is at "
                                       r"step 12, past num_steps=6"):
    charlm.main(args + ["--resume", "true", "--steps", "6", "--out", str(tmp_path / "b")])
