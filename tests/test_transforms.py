"""bptt composes with JAX transformations: vmap over parameter sets, donated jit, second order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from helpers import assert_trees_close, call_donating, make_problem


def _stack(trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


@pytest.mark.parametrize("kw", [dict(), dict(tau_max=3, tau_b=2), dict(checkpoint_every=2)])
def test_vmap_over_parameter_sets(kw):
  sets = [make_problem(s, T=6, B=2, hidden=(3, 2))[0] for s in range(4)]
  _, xs, targets = make_problem(0, T=6, B=2, hidden=(3, 2))
  values, grads = jax.vmap(lambda p: jaxrnn.bptt(p, xs, targets, **kw))(_stack(sets))
  for i, p in enumerate(sets):
    v, g = jaxrnn.bptt(p, xs, targets, **kw)
    np.testing.assert_allclose(values[i], v, rtol=1e-12)
    assert_trees_close(jax.tree.map(lambda a: a[i], grads), g, 1e-12)


@pytest.mark.parametrize("T,B,H,O,kw", [
    (2, 1, (5,), 2, {}), (3, 1, (5,), 3, {}), (1, 2, (5,), 2, dict(resets=True, lengths=True)),
    (9, 2, (5, 4), 2, dict(resets=True, lengths=True, checkpoint_every=4)),
])
def test_vmap_over_tiny_sequences(T, B, H, O, kw):
  """vmap over inputs, resets and lengths, at the sizes where XLA:CPU aborted the process
  (a batched ΔW_hy product of T·N·H·O <= 40 got a layout its dot emitter rejected; with
  checkpoint_every=4 at T = 9 the last segment has T·N = 2). Equal to a loop of calls."""
  V, kw = 3, dict(kw)
  params, _, targets = make_problem(0, T=T, B=B, hidden=H, O=O)
  rng = np.random.default_rng(1)
  batched = dict(xs=jnp.asarray(rng.normal(size=(V, T, B, 3))))
  if kw.pop("resets", False):
    batched["resets"] = jnp.asarray(rng.random((V, T, B)) < 0.3)
  if kw.pop("lengths", False):
    batched["lengths"] = jnp.asarray(rng.integers(1, T + 1, size=(V, B)))
  got = jax.vmap(lambda a: jaxrnn.bptt(params, a.pop("xs"), targets, **a, **kw))(batched)
  for i in range(V):
    one = {k: v[i] for k, v in batched.items()}
    want = jaxrnn.autodiff_bptt(params, one.pop("xs"), targets, **one)
    assert_trees_close(jax.tree.map(lambda a: a[i], got), want, 1e-12)


def test_jit_with_donated_buffers():
  """The gradients have the parameters' shapes, so a train step can donate the parameters:
  XLA reuses every donated buffer (JAX warns about any it cannot use) and the result is
  unchanged."""
  params, xs, targets = make_problem(1, T=6, B=2, hidden=(3,))
  want = jaxrnn.bptt(params, xs, targets)
  got, donated = call_donating(lambda p, x, y: jaxrnn.bptt(p, x, y), (params, xs, targets), (0,))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert all(a.is_deleted() for a in jax.tree.leaves(donated))


@pytest.mark.parametrize("activation,kw", [("tanh", dict()), ("identity", dict(loss="xent")),
                                           ("sigmoid", dict(lengths=jnp.array([5, 3])))])
def test_hessian_vector_products_through_bptt(activation, kw):
  """Promised: bptt is differentiable in forward mode. Untruncated, jax.jvp of its gradient
  along v is the Hessian-vector product H v: it equals autodiff's forward-over-reverse."""
  params, xs, targets = make_problem(2, T=5, B=2, hidden=(3, 2), activation=activation,
                                     loss=kw.get("loss", "mse"))
  v = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)),
                   params)
  manual = jax.jvp(lambda p: jaxrnn.bptt(p, xs, targets, **kw)[1], (params,), (v,))[1]
  auto = jax.jvp(lambda p: jaxrnn.autodiff_bptt(p, xs, targets, **kw)[1], (params,), (v,))[1]
  assert_trees_close(manual, auto, 1e-9, atol=1e-12)


def test_truncated_gradient_map_derivative():
  """With truncation the gradient is not the gradient of a scalar, but it is a function
  g(p) of the parameters (the window start states are forward values, so they depend on
  p too). jax.jvp through bptt differentiates that function: it matches central
  differences of g. (jax.jvp through autodiff_bptt does not: its stop_gradient zeroes
  the start states' tangents.)"""
  params, xs, targets = make_problem(3, T=7, B=2, hidden=(3,), activation="sigmoid")
  kw = dict(tau_max=3, tau_b=2)
  v = jax.tree.map(lambda p: jnp.sin(1.0 + jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape),
                   params)
  g = lambda p: jaxrnn.bptt(p, xs, targets, **kw)[1]
  jvp = jax.jvp(g, (params,), (v,))[1]
  eps = 1e-5
  shift = lambda s: jax.tree.map(lambda p, d: p + s * eps * d, params, v)
  fd = jax.tree.map(lambda a, b: (a - b) / (2 * eps), g(shift(1)), g(shift(-1)))
  assert_trees_close(jvp, fd, 1e-6, atol=1e-9)
