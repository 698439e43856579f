"""Truncated BPTT: manual == stop_gradient autodiff, and both == independent references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from helpers import assert_trees_close, make_problem, random_h0

OPTIONS = list(itertools.product([False, True], [(4,), (3, 2)], ["mse", "xent"]))


def _grid():
  cases = []
  for T in (1, 7, 20):
    for tau_b in sorted({1, 3, 5, T}):
      for tau_max in dict.fromkeys([tau_b, tau_b + 2, T, None]):
        if tau_max is not None and tau_max < tau_b:
          continue  # invalid by definition (tested in test_bad_truncation_options)
        cases.append((T, tau_b, tau_max))
  # Rotate the remaining options so every value meets every truncation setting. Grid
  # points that are the same computation (same T and canonical truncation: all of
  # T = 1, say) get the same options, so they reuse one compiled function.
  from jaxrnn._src.checks import canonical_truncation
  slot = {}
  out = []
  for T, tau_b, tau_max in cases:
    key = (T,) + canonical_truncation(np.zeros((T, 1, 1)), tau_max, tau_b)
    out.append((T, tau_b, tau_max) + OPTIONS[slot.setdefault(key, len(slot)) % len(OPTIONS)])
  return out


@pytest.mark.parametrize("T,tau_b,tau_max,many_to_one,hidden,loss", _grid())
def test_truncated_manual_equals_autodiff(T, tau_b, tau_max, many_to_one, hidden, loss):
  params, xs, targets = make_problem(T * 100 + tau_b, T=T, B=2, hidden=hidden, loss=loss,
                                     many_to_one=many_to_one)
  h0 = random_h0(T, 2, hidden)
  kw = dict(loss=loss, many_to_one=many_to_one, h0=h0, tau_b=tau_b, tau_max=tau_max,
            return_dh0=True)
  value, grads, dh0 = jaxrnn.bptt(params, xs, targets, **kw)
  ref_value, ref_grads, ref_dh0 = jaxrnn.autodiff_bptt(params, xs, targets, **kw)
  np.testing.assert_allclose(value, ref_value, rtol=1e-10)
  # the forward pass and the loss value are never truncated
  np.testing.assert_allclose(value, jaxrnn.loss(params, xs, targets, loss=loss,
                                                many_to_one=many_to_one, h0=h0), rtol=1e-12)
  assert_trees_close(grads, ref_grads, 1e-10, err="grads")
  assert_trees_close(dh0, ref_dh0, 1e-10, err="dh0")


def _loop_reference(params, xs, targets, h0, tau_b, tau_max, loss, many_to_one):
  """The definition, written as plainly as possible: per chunk, a full forward
  loop whose state is cut (stop_gradient) after step e - tau_max."""
  T, B = xs.shape[:2]
  total = 0.0
  for start in range(0, T, tau_b):
    end = min(start + tau_b, T) - 1
    h = list(h0)
    for t in range(end + 1):
      inp = xs[t]
      for l, layer in enumerate(params.layers):
        h[l], inp = jaxrnn.elman_step(layer, h[l], inp, activation=params.activation)
      if t == end - tau_max:
        h = [jax.lax.stop_gradient(x) for x in h]
      scored = (t == T - 1) if many_to_one else True
      if start <= t and scored:
        o = inp @ params.readout.W_hy + params.readout.b_y[None]
        y = targets if many_to_one else targets[t]
        if loss == "mse":
          total += 0.5 * jnp.sum((o - y) ** 2)
        else:
          total -= jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(o), y[:, None], axis=1))
  return total / B


@pytest.mark.parametrize("T,tau_b,tau_max,hidden,loss,many_to_one", [
    (7, 3, 5, (3, 2), "xent", False),
    (9, 1, 3, (4,), "mse", False),
    (8, 3, 3, (3,), "mse", True),
    (6, 4, 4, (2, 3), "mse", False),
])
def test_truncated_equals_stop_gradient_loop(T, tau_b, tau_max, hidden, loss, many_to_one):
  params, xs, targets = make_problem(T + tau_b, T=T, B=2, hidden=hidden, loss=loss,
                                     many_to_one=many_to_one)
  h0 = random_h0(1, 2, hidden)
  ref_value, (ref_grads, ref_dh0) = jax.jit(jax.value_and_grad(
      lambda p, h: _loop_reference(p, xs, targets, h, tau_b, tau_max, loss, many_to_one),
      argnums=(0, 1)))(params, h0)
  value, grads, dh0 = jaxrnn.bptt(params, xs, targets, loss=loss, many_to_one=many_to_one,
                                  h0=h0, tau_b=tau_b, tau_max=tau_max, return_dh0=True)
  np.testing.assert_allclose(value, ref_value, rtol=1e-10)
  assert_trees_close(grads, ref_grads, 1e-10, err="grads")
  assert_trees_close(dh0, ref_dh0, 1e-10, err="dh0")


def _states(params, xs, h0):
  """h_{-1} .. h_{T-1} of every layer: index t + 1 holds the state after step t."""
  hs = jaxrnn.forward(params, xs, h0)[1]
  return [jnp.concatenate([h[None], s], axis=0) for h, s in zip(h0, hs)]


def _sum_trees(trees):
  return jax.tree.map(lambda *x: sum(x), *trees)


def test_no_truncation_for_every_tau_b():
  params, xs, targets = make_problem(3, T=7, B=2, hidden=(3, 2))
  full = jaxrnn.bptt(params, xs, targets)
  for tau_b in (1, 3, 5, 7, 9):
    got = jaxrnn.bptt(params, xs, targets, tau_b=tau_b)
    jax.tree.map(np.testing.assert_array_equal, got, full)
  jax.tree.map(np.testing.assert_array_equal, jaxrnn.bptt(params, xs, targets, tau_max=7), full)


@pytest.mark.parametrize("T,k", [(12, 4), (11, 4), (7, 1)])
def test_classic_tbptt_is_chunkwise_bptt(T, k):
  """tau_b = tau_max = k: state carried across chunks, gradient cut at chunk boundaries.

  When k does not divide T, the shorter last chunk (ending at e = T-1) still
  reaches back k steps, to e-k+1, by the definition: its window starts
  inside the previous chunk, whose steps are unscored there.
  """
  hidden = (3, 2)
  params, xs, targets = make_problem(T + k, T=T, B=2, hidden=hidden)
  h0 = random_h0(2, 2, hidden)
  states = _states(params, xs, h0)
  parts = []
  for c in range(0, T, k):
    e = min(c + k, T)
    s = max(0, e - k)
    start = tuple(h[s] for h in states) if s > 0 else h0
    weights = (jnp.arange(s, e) >= c).astype(xs.dtype)[:, None] * jnp.ones((1, 2))
    parts.append(jaxrnn.bptt(params, xs[s:e], targets[s:e], h0=start, loss_weights=weights)[1])
  _, grads = jaxrnn.bptt(params, xs, targets, h0=h0, tau_max=k)  # tau_b defaults to tau_max
  assert_trees_close(grads, _sum_trees(parts), 1e-10)


def test_per_output_truncation():
  """tau_b = 1: each loss term reaches back at most tau_max steps (bptt_truncate)."""
  T, k, hidden = 9, 3, (4,)
  params, xs, targets = make_problem(5, T=T, B=2, hidden=hidden, loss="xent")
  h0 = random_h0(3, 2, hidden)
  states = _states(params, xs, h0)
  parts = []
  for t in range(T):
    s = max(0, t - k + 1)
    parts.append(jaxrnn.bptt(params, xs[s:t + 1], targets[t], loss="xent", many_to_one=True,
                             h0=tuple(h[s] for h in states))[1])
  _, grads = jaxrnn.bptt(params, xs, targets, loss="xent", h0=h0, tau_b=1, tau_max=k)
  assert_trees_close(grads, _sum_trees(parts), 1e-10)


def test_many_to_one_truncated_reaches_back_k_steps():
  T, k, hidden = 10, 4, (3, 2)
  params, xs, targets = make_problem(6, T=T, B=2, hidden=hidden, many_to_one=True)
  states = _states(params, xs, tuple(jnp.zeros((2, h)) for h in hidden))
  want = jaxrnn.bptt(params, xs[T - k:], targets, many_to_one=True,
                     h0=tuple(h[T - k] for h in states))
  got = jaxrnn.bptt(params, xs, targets, many_to_one=True, tau_max=k)
  np.testing.assert_allclose(got[0], jaxrnn.loss(params, xs, targets, many_to_one=True))
  assert_trees_close(got[1], want[1], 1e-10)


@pytest.mark.parametrize("tau_b,tau_max", [(3, 3), (2, 5), (1, 4)])
def test_scalar_linear_rnn_truncated_closed_form(tau_b, tau_max):
  """s_k = s_{k-1} w_rec + x_k w_x (many-to-many, mse): the chunk ending at e backpropagates
  through steps e-tau_max+1..e, so

    ∂L/∂w_x   = Σ_t (s_t − y_t) Σ_{j=max(0, e(t)−tau_max+1)}^{t} x_j     w_rec^{t−j}
    ∂L/∂w_rec = Σ_t (s_t − y_t) Σ_{j=max(0, e(t)−tau_max+1)}^{t} s_{j−1} w_rec^{t−j}
  """
  w_x, w_rec = 0.8, 1.1
  x = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
  y = np.linspace(0.0, 5.0, len(x))
  T = len(x)
  s = [0.0]
  for k in range(T):
    s.append(s[-1] * w_rec + x[k] * w_x)
  s_prev = np.array(s[:-1])          # s_{j-1}
  s = np.array(s[1:])                # s_t
  g_x = g_rec = 0.0
  for t in range(T):
    e = min((t // tau_b + 1) * tau_b, T) - 1
    j = np.arange(max(0, e - tau_max + 1), t + 1)
    g_x += (s[t] - y[t]) * np.sum(x[j] * w_rec ** (t - j))
    g_rec += (s[t] - y[t]) * np.sum(s_prev[j] * w_rec ** (t - j))

  layer = jaxrnn.LayerParams(jnp.array([[w_x]]), jnp.array([[w_rec]]), jnp.zeros((1,)))
  params = jaxrnn.RNNParams((layer,), None, "identity")
  _, grads = jaxrnn.bptt(params, jnp.asarray(x)[:, None, None], jnp.asarray(y)[:, None, None],
                         tau_b=tau_b, tau_max=tau_max)
  np.testing.assert_allclose(grads.layers[0].W_xh.squeeze(), g_x, rtol=1e-12)
  np.testing.assert_allclose(grads.layers[0].W_hh.squeeze(), g_rec, rtol=1e-12)


@pytest.mark.parametrize("fn", [jaxrnn.bptt, jaxrnn.autodiff_bptt])
@pytest.mark.parametrize("kw,words", [
    (dict(tau_max=0), ["tau_max", ">= 1", "0"]),
    (dict(tau_b=-2), ["tau_b", ">= 1", "-2"]),
    (dict(tau_max=2.5), ["tau_max", "int", "2.5"]),
    (dict(tau_b="3"), ["tau_b", "int", "'3'"]),
    (dict(tau_max=2, tau_b=3), ["tau_max must be >= tau_b", "tau_max=2", "tau_b=3"]),
])
def test_bad_truncation_options(fn, kw, words):
  params, xs, targets = make_problem(0, T=5, B=2)
  with pytest.raises(ValueError) as info:
    fn(params, xs, targets, **kw)
  for w in words:
    assert w in str(info.value)
