"""Core: manual BPTT equals jax.grad, finite differences and a closed form."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxrnn
from helpers import RTOL, assert_trees_close, covered_pairs, make_problem, pairwise, random_h0

FACTORS = {
    "activation": ["tanh", "sigmoid", "relu", "identity"],
    "hidden": [(4,), (5, 3), (3, 6, 2)],
    "loss": ["mse", "xent"],
    "many_to_one": [False, True],
    "readout": [True, False],
    "B": [1, 3],
    "T": [1, 5],
    "h0": [False, True],
}
DESIGN = pairwise(FACTORS)


def test_design_covers_every_pair():
  want = {(a, va, b, vb) for a, b in itertools.combinations(FACTORS, 2)
          for va in FACTORS[a] for vb in FACTORS[b]}
  assert want <= covered_pairs(DESIGN, FACTORS)
  assert len(DESIGN) < 30  # a pairwise design, not the product (768)


def _case_id(c):
  return "-".join(f"{k}={v}" for k, v in c.items())


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
@pytest.mark.parametrize("case", DESIGN, ids=_case_id)
def test_manual_equals_autodiff(case, dtype):
  c = dict(case)
  seed = hash(_case_id(c)) % 1000
  params, xs, targets = make_problem(
      seed, T=c["T"], B=c["B"], hidden=c["hidden"], O=3, activation=c["activation"],
      loss=c["loss"], many_to_one=c["many_to_one"], readout=c["readout"], dtype=dtype)
  h0 = random_h0(seed, c["B"], c["hidden"], dtype) if c["h0"] else None
  kw = dict(loss=c["loss"], many_to_one=c["many_to_one"], h0=h0, return_dh0=True)
  value, grads, dh0 = jaxrnn.bptt(params, xs, targets, **kw)
  ref_value, ref_grads, ref_dh0 = jaxrnn.autodiff_bptt(params, xs, targets, **kw)
  rtol = RTOL[dtype]
  np.testing.assert_allclose(value, ref_value, rtol=rtol)
  np.testing.assert_allclose(value, jaxrnn.loss(params, xs, targets, loss=c["loss"],
                                                many_to_one=c["many_to_one"], h0=h0), rtol=rtol)
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  assert all(g.dtype == dtype for g in jax.tree.leaves(grads))
  assert_trees_close(grads, ref_grads, rtol, err="grads")
  assert_trees_close(dh0, ref_dh0, rtol, err="dh0")


def _directional_fd(f, x, v, eps=1e-6):
  """Central difference of f along v (float64)."""
  plus = jax.tree.map(lambda a, b: a + eps * b, x, v)
  minus = jax.tree.map(lambda a, b: a - eps * b, x, v)
  return (f(plus) - f(minus)) / (2 * eps)


@pytest.mark.parametrize("activation,loss,hidden", [
    ("tanh", "mse", (3, 2)), ("sigmoid", "xent", (4,)), ("identity", "mse", (2, 3)),
    ("relu", "xent", (3,))])
def test_finite_differences(activation, loss, hidden):
  params, xs, targets = make_problem(7, T=4, B=2, hidden=hidden, activation=activation,
                                     loss=loss)
  h0 = random_h0(7, 2, hidden)
  f = lambda p, h: jaxrnn.loss(p, xs, targets, loss=loss, h0=h)
  # autodiff side: JAX's own finite-difference checker
  check_grads(f, (params, h0), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)
  # manual side: directional derivatives along random directions
  _, grads, dh0 = jaxrnn.bptt(params, xs, targets, loss=loss, h0=h0, return_dh0=True)
  for k in range(3):
    leaves, tdef = jax.tree.flatten((params, h0))
    keys = jax.random.split(jax.random.key(100 + k), len(leaves))
    v = tdef.unflatten([jax.random.normal(kk, l.shape, l.dtype) for kk, l in zip(keys, leaves)])
    fd = _directional_fd(lambda ph: f(*ph), (params, h0), v)
    an = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves((grads, dh0)), jax.tree.leaves(v)))
    np.testing.assert_allclose(an, fd, rtol=1e-7, atol=1e-9)


def test_scalar_linear_rnn_closed_form():
  """s_k = s_{k-1} w_rec + x_k w_x + b, s_0 = 0, L = ½ (s_n − y)²; derivatives by hand.

  ∂L/∂w_x   = (s_n − y) Σ_k x_k     w_rec^{n−k}
  ∂L/∂w_rec = (s_n − y) Σ_k s_{k−1} w_rec^{n−k}
  ∂L/∂b     = (s_n − y) Σ_k         w_rec^{n−k}
  """
  w_x, w_rec, b, y = 0.7, 1.3, 0.1, 2.0
  x = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])
  n = len(x)
  s = [0.0]
  for k in range(n):
    s.append(s[-1] * w_rec + x[k] * w_x + b)
  err = s[n] - y
  powers = w_rec ** (n - 1 - np.arange(n))
  want = {"W_xh": err * np.sum(x * powers), "W_hh": err * np.sum(np.array(s[:-1]) * powers),
          "b_h": err * np.sum(powers)}

  layer = jaxrnn.LayerParams(jnp.array([[w_x]]), jnp.array([[w_rec]]), jnp.array([b]))
  params = jaxrnn.RNNParams((layer,), None, "identity")
  value, grads = jaxrnn.bptt(params, jnp.asarray(x)[:, None, None], jnp.array([[y]]),
                             loss="mse", many_to_one=True)
  np.testing.assert_allclose(value, 0.5 * err ** 2, rtol=1e-12)
  for name, g in want.items():
    np.testing.assert_allclose(getattr(grads.layers[0], name).squeeze(), g, rtol=1e-12)


def test_forward_shapes_and_scan_semantics():
  params, xs, _ = make_problem(0, T=5, B=2, hidden=(4, 3), O=2)
  h_last, hs, ys = jaxrnn.forward(params, xs)
  assert [h.shape for h in h_last] == [(2, 4), (2, 3)]
  assert [h.shape for h in hs] == [(5, 2, 4), (5, 2, 3)]
  assert ys.shape == (5, 2, 2)
  # the same recurrence written as a plain Python loop of elman_step
  h = [jnp.zeros((2, 4)), jnp.zeros((2, 3))]
  for t in range(5):
    inp = xs[t]
    for l, layer in enumerate(params.layers):
      h[l], inp = jaxrnn.elman_step(layer, h[l], inp, activation="tanh")
    np.testing.assert_allclose(hs[1][t], inp, rtol=1e-12)
    np.testing.assert_allclose(ys[t], inp @ params.readout.W_hy + params.readout.b_y[None],
                               rtol=1e-12)
  # without a readout, ys is the top layer's states
  no_readout = params._replace(readout=None)
  np.testing.assert_array_equal(jaxrnn.forward(no_readout, xs)[2], hs[1])


def test_loss_definitions():
  params, xs, targets = make_problem(1, T=4, B=3, O=2)
  ys = jaxrnn.forward(params, xs)[2]
  np.testing.assert_allclose(jaxrnn.loss(params, xs, targets),
                             0.5 * jnp.sum((ys - targets) ** 2) / 3, rtol=1e-12)
  np.testing.assert_allclose(jaxrnn.loss(params, xs, targets[-1], many_to_one=True),
                             0.5 * jnp.sum((ys[-1] - targets[-1]) ** 2) / 3, rtol=1e-12)
  cls = jnp.array([[0, 1, 1], [1, 0, 0], [0, 0, 1], [1, 1, 0]])
  logp = jax.nn.log_softmax(ys, axis=-1)
  want = -jnp.sum(jnp.take_along_axis(logp, cls[..., None], axis=-1)) / 3
  np.testing.assert_allclose(jaxrnn.loss(params, xs, cls, loss="xent"), want, rtol=1e-12)


def test_jit_compiles_once():
  params, xs, targets = make_problem(2, T=5, B=2)
  traces = []

  def f(p, x, y):
    traces.append(None)
    return jaxrnn.bptt(p, x, y)

  jf = jax.jit(f)
  a = jf(params, xs, targets)
  b = jf(params, xs + 1.0, targets * 2.0)
  assert len(traces) == 1 and jf._cache_size() == 1
  assert not np.allclose(a[0], b[0])
  # equivalent truncation options share one compiled function
  from jaxrnn._src.bptt import _bptt
  before = _bptt._cache_size()
  jaxrnn.bptt(params, xs, targets, tau_max=5, tau_b=2)
  jaxrnn.bptt(params, xs, targets, tau_max=None, tau_b=3)
  jaxrnn.bptt(params, xs, targets, tau_max=9)
  assert _bptt._cache_size() - before <= 1


def test_vmap_over_extra_leading_axis():
  params, xs, targets = make_problem(3, T=4, B=2, hidden=(3, 2))
  xs_k = jnp.stack([xs, 2 * xs, -xs])
  ys_k = jnp.stack([targets, targets, 0 * targets])
  value, grads = jax.vmap(lambda x, y: jaxrnn.bptt(params, x, y))(xs_k, ys_k)
  for k in range(3):
    v, g = jaxrnn.bptt(params, xs_k[k], ys_k[k])
    np.testing.assert_allclose(value[k], v, rtol=1e-12)
    assert_trees_close(jax.tree.map(lambda a: a[k], grads), g, 1e-12)
