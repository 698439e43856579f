"""Streaming truncated BPTT: per-chunk gradients, equivalence to bptt, flat memory, one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrnn
from helpers import assert_trees_close, call_donating, make_problem, objective_recorder


def capture():
  """An optax transformation that applies no update and keeps the last gradient as its state."""
  return optax.GradientTransformation(
      init=lambda p: jax.tree.map(jnp.zeros_like, p),
      update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))


def _run(stream, params, xs, targets, tau_b, resets=None, loss_weights=None, h0=None):
  opt_state, state = stream.init(params, xs.shape[1], h0=h0)
  grads, losses = [], []
  chunk = lambda a, sl: None if a is None else a[sl]
  with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
    for c in range(xs.shape[0] // tau_b):
      sl = slice(c * tau_b, (c + 1) * tau_b)
      params, opt_state, state, loss = stream.step(
          params, opt_state, state, xs[sl], targets[sl], chunk(resets, sl),
          chunk(loss_weights, sl))
      grads.append(opt_state)
      losses.append(loss)
  return params, grads, losses, state


@pytest.mark.parametrize("method", ["manual", "autodiff"])
@pytest.mark.parametrize("tau_b,tau_max,loss", [(3, 5, "mse"), (4, 4, "xent"), (2, 7, "mse"),
                                                 (2, 4, "xent")])
def test_chunk_gradients_equal_bptt(tau_b, tau_max, loss, method):
  """Each chunk's gradient is bptt on its window from the exact state; they sum to
  truncated bptt. (2, 4): the kept steps fill exactly (kept 0 -> 2 = P), the case where
  the second window once started from a state of the not-yet-real steps."""
  T, hidden = 8 * tau_b, (3, 2)
  params, xs, targets = make_problem(tau_b * 10 + tau_max, T=T, B=2, hidden=hidden, loss=loss)
  stream = jaxrnn.make_tbptt_stream(capture(), tau_b=tau_b, tau_max=tau_max, loss=loss,
                                    method=method)
  _, grads, losses, state = _run(stream, params, xs, targets, tau_b)
  hs = jaxrnn.forward(params, xs)[1]
  zeros = tuple(jnp.zeros((2, h)) for h in hidden)
  for c, g in enumerate(grads):
    e = (c + 1) * tau_b
    s = max(0, e - tau_max)
    weights = (jnp.arange(s, e) >= c * tau_b).astype(xs.dtype)[:, None] * jnp.ones((1, 2))
    h_start = zeros if s == 0 else tuple(h[s - 1] for h in hs)
    value, want = jaxrnn.bptt(params, xs[s:e], targets[s:e], loss=loss, h0=h_start,
                              loss_weights=weights)
    np.testing.assert_allclose(losses[c], value, rtol=1e-10)
    assert_trees_close(g, want, 1e-10, err=f"chunk {c}")
  # with fixed parameters the chunks add up to truncated BPTT of the whole stream
  value, total = jaxrnn.bptt(params, xs, targets, loss=loss, tau_b=tau_b, tau_max=tau_max)
  assert_trees_close(jax.tree.map(lambda *g: sum(g), *grads), total, 1e-10)
  np.testing.assert_allclose(sum(losses), value, rtol=1e-10)
  # the carried state is the exact forward state
  assert_trees_close(state.h, tuple(h[-1] for h in hs), 1e-12)
  assert int(state.steps) == T


@pytest.mark.parametrize("method", ["manual", "autodiff"])
@pytest.mark.parametrize("tau_b,tau_max", [(2, 6), (3, 4)])
def test_chunks_with_h0_resets_and_loss_weights_sum_to_bptt(tau_b, tau_max, method):
  """With an initial state, resets and loss weights, the chunks' losses and gradients
  (fixed parameters) sum to truncated bptt of the whole stream, and the carried state
  is the forward state. Found by a random search: with tau_max - tau_b a multiple of
  tau_b, the losses were off (a 6.8x loss at T = 20, identity)."""
  T, B, hidden = 6 * tau_b, 3, (3, 2)
  params, xs, targets = make_problem(7, T=T, B=B, hidden=hidden)
  rng = np.random.default_rng(8)
  h0 = tuple(jnp.asarray(rng.normal(size=(B, h))) for h in hidden)
  resets = jnp.asarray(rng.random((T, B)) < 0.2)
  weights = jnp.asarray(rng.uniform(0, 2, size=(T, B)))
  stream = jaxrnn.make_tbptt_stream(capture(), tau_b=tau_b, tau_max=tau_max, method=method)
  _, grads, losses, state = _run(stream, params, xs, targets, tau_b, resets, weights, h0)
  value, total = jaxrnn.bptt(params, xs, targets, tau_b=tau_b, tau_max=tau_max, h0=h0,
                            resets=resets, loss_weights=weights)
  np.testing.assert_allclose(sum(losses), value, rtol=1e-10)
  assert_trees_close(jax.tree.map(lambda *g: sum(g), *grads), total, 1e-10)
  assert_trees_close(state.h, jaxrnn.forward(params, xs, h0=h0, resets=resets)[0], 1e-12)


@pytest.mark.parametrize("method", ["manual", "autodiff"])
def test_optimizers_get_the_chunks_objective(method):
  """An optimizer that reads the objective (optax's extra arguments, as optax.lbfgs and
  optax.contrib.reduce_on_plateau do) gets the chunk's loss and gradient, and value_fn is
  the window's loss at other params, with the window's gradient as its jax.grad."""
  tau_b, tau_max, hidden = 2, 3, (3, 2)
  params, xs, targets = make_problem(12, T=3 * tau_b, B=2, hidden=hidden)
  opt, moved = objective_recorder(params)
  stream = jaxrnn.make_tbptt_stream(opt, tau_b=tau_b, tau_max=tau_max, method=method)
  _, records, losses, _ = _run(stream, params, xs, targets, tau_b)
  hs = jaxrnn.forward(params, xs)[1]
  for c, (value, grad, moved_value, moved_grad) in enumerate(records):
    e = (c + 1) * tau_b
    s = max(0, e - tau_max)
    weights = (jnp.arange(s, e) >= c * tau_b).astype(xs.dtype)[:, None] * jnp.ones((1, 2))
    kw = dict(h0=tuple(jnp.zeros((2, h)) for h in hidden) if s == 0 else
              tuple(h[s - 1] for h in hs), loss_weights=weights)
    want = jaxrnn.autodiff_bptt(params, xs[s:e], targets[s:e], **kw)
    np.testing.assert_allclose([value, losses[c]], [want[0]] * 2, rtol=1e-12)
    assert_trees_close(grad, want[1], 1e-10, err=f"chunk {c}")
    want = jaxrnn.autodiff_bptt(moved, xs[s:e], targets[s:e], **kw)
    np.testing.assert_allclose(moved_value, want[0], rtol=1e-12)
    assert_trees_close(moved_grad, want[1], 1e-10, err=f"chunk {c}, moved")


def test_chunks_may_be_nested_lists():
  """A chunk given as lists (which jit traces as lists of scalars) steps as its arrays."""
  params, xs, targets = make_problem(3, T=4, B=2, hidden=(3,))
  rng = np.random.default_rng(0)
  resets, weights = rng.random((4, 2)) < 0.3, rng.uniform(0, 2, size=(4, 2))
  stream = jaxrnn.make_tbptt_stream(capture(), tau_b=4, tau_max=6)
  opt_state, state = stream.init(params, 2)
  lists = stream.step(params, opt_state, state, np.asarray(xs).tolist(),
                      np.asarray(targets).tolist(), resets.tolist(), weights.tolist())
  arrays = stream.step(params, opt_state, state, xs, targets, jnp.asarray(resets),
                       jnp.asarray(weights))
  jax.tree.map(np.testing.assert_array_equal, lists, arrays)


def test_manual_and_autodiff_streams_train_identically():
  params, xs, targets = make_problem(1, T=40, B=3, hidden=(4,))
  runs = []
  for method in ("manual", "autodiff"):
    stream = jaxrnn.make_tbptt_stream(optax.adam(0.05), tau_b=5, tau_max=8, method=method)
    runs.append(_run(stream, params, xs, targets, 5))
  assert_trees_close(runs[0][0], runs[1][0], 1e-10)
  np.testing.assert_allclose(runs[0][2], runs[1][2], rtol=1e-10)
  assert runs[0][2][-1] < runs[0][2][0]  # it learns


@pytest.mark.parametrize("method", ["manual", "autodiff"])
def test_the_step_can_donate_its_arguments(method):
  """As its docstring says: wrapped in a jit that donates params, opt_state and state, the
  stream runs the same, bit for bit, and XLA reuses the buffers it reads: params, the
  optimizer's state, the kept inputs. (An argument the step does not read is not donated
  and stays valid: the last state, which the next window recomputes.)"""
  params, xs, targets = make_problem(4, T=6, B=2, hidden=(3, 2))
  stream = jaxrnn.make_tbptt_stream(optax.adam(0.1), tau_b=3, tau_max=5, method=method)
  carried = (params, *stream.init(params, 2))
  with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
    for sl in (slice(0, 3), slice(3, 6)):
      want = stream.step(*carried, xs[sl], targets[sl])
      got, (p, o, s) = call_donating(stream.step, (*carried, xs[sl], targets[sl]), (0, 1, 2))
      jax.tree.map(np.testing.assert_array_equal, got, want)
      assert all(a.is_deleted() for a in jax.tree.leaves((p, o, s.xs_kept)))
      carried = want[:3]


def _rss_mib():
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096 / 2**20


def test_long_stream_flat_memory_and_one_compile():
  """100,000 steps: the step compiles once and the process does not grow."""
  tau_b, B, D = 50, 4, 3
  params = jaxrnn.init_params(jax.random.key(0), D, (16,), 2, dtype=jnp.float32)
  stream = jaxrnn.make_tbptt_stream(optax.sgd(1e-3), tau_b=tau_b, tau_max=75)
  opt_state, state = stream.init(params, B)
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.normal(size=(tau_b, B, D)), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(tau_b, B, 2)), jnp.float32)
  rss = []
  with jax.numpy_dtype_promotion("standard"):
    for c in range(100_000 // tau_b):
      params, opt_state, state, loss = stream.step(params, opt_state, state, xs, ys)
      if c in (200, 1999):
        jax.block_until_ready(loss)
        rss.append(_rss_mib())
  assert int(state.steps) == 100_000
  assert np.isfinite(float(loss))
  assert stream.step._cache_size() == 1
  assert rss[1] - rss[0] < 16, f"memory grew from {rss[0]:.1f} to {rss[1]:.1f} MiB"


@pytest.mark.parametrize("kw,words", [
    (dict(tau_b=0), ["tau_b", ">= 1"]),
    (dict(tau_b=4, tau_max=3), ["tau_max must be >= tau_b"]),
    (dict(tau_b=2, loss="l1"), ["loss", "'l1'"]),
    (dict(tau_b=2, method="magic"), ["method", "'magic'"]),
])
def test_bad_stream_options(kw, words):
  with pytest.raises(ValueError) as info:
    jaxrnn.make_tbptt_stream(optax.sgd(0.1), **kw)
  for w in words:
    assert w in str(info.value)


@pytest.mark.parametrize("case,exc,words", [
    ("batch", ValueError, ["state does not fit", "(B = 1)", "state.h has shape ((2, 4), (2, 3))",
                           "expected ((1, 4), (1, 3))", "state.xs_kept has shape (1, 2, 2)"]),
    ("hidden", ValueError, ["state.h has shape ((2, 4), (2, 3)), expected ((2, 5),)"]),
    ("other_stream", ValueError, ["tau_max - tau_b = 2", "state.xs_kept has shape (1, 2, 2), "
                                  "expected (2, 2, 2)", "state.resets_kept"]),
    ("not_state", TypeError, ["state must be the StreamState", "tuple"]),
    ("D", ValueError, ["xs has input size D = 5", "D = 2"]),
    ("int_xs", TypeError, ["xs must have a floating dtype", "int32"]),
    ("targets", ValueError, ["targets must have shape [T, B, O] = (3, 2, 2)", "(3, 2, 1)"]),
    ("resets", TypeError, ["resets must have dtype bool", "float"]),
    ("weights", TypeError, ["loss_weights must have a floating dtype", "int32"]),
])
def test_bad_chunks_raise_clear_errors(case, exc, words):
  """Each chunk is checked against the params and the state before anything runs."""
  params, xs, targets = make_problem(0, T=3, B=2, D=2, hidden=(4, 3), O=2)
  stream = jaxrnn.make_tbptt_stream(optax.sgd(0.1), tau_b=3, tau_max=4)
  opt_state, state = stream.init(params, 2)
  args = [params, opt_state, state, xs, targets]
  kw = {}
  if case == "batch":
    args[3:] = xs[:, :1], targets[:, :1]
  elif case == "hidden":
    args[0] = make_problem(0, T=3, B=2, D=2, hidden=(5,), O=2)[0]
  elif case == "other_stream":
    stream = jaxrnn.make_tbptt_stream(optax.sgd(0.1), tau_b=3, tau_max=5)
  elif case == "not_state":
    args[2] = tuple(state)
  elif case == "D":
    args[3] = jnp.ones((3, 2, 5), xs.dtype)
  elif case == "int_xs":
    args[3] = xs.astype(jnp.int32)
  elif case == "targets":
    args[4] = targets[..., :1]
  elif case == "resets":
    kw["resets"] = jnp.zeros((3, 2))
  else:
    kw["loss_weights"] = jnp.ones((3, 2), jnp.int32)
  with pytest.raises(exc) as info:
    stream.step(*args, **kw)
  for w in words:
    assert w in str(info.value), (w, str(info.value))


def test_wrong_chunk_length():
  params, xs, targets = make_problem(0, T=6, B=2)
  stream = jaxrnn.make_tbptt_stream(optax.sgd(0.1), tau_b=4)
  opt_state, state = stream.init(params, 2)
  with pytest.raises(ValueError, match=r"xs must have shape \[tau_b, B, D\] with tau_b = 4"):
    stream.step(params, opt_state, state, xs, targets)
