"""Data parallelism over devices: the batch split across a mesh gives the one-device results.

The suite runs JAX with 4 CPU devices (conftest.py), so these run on any
machine. Three ways users split a batch, each checked against the same call
on one device in float64:

* ``jit`` with an *Explicit* mesh (``jax.make_mesh``'s default): array types
  carry their sharding; the passes run inside ``shard_map`` over the batch's
  mesh axes (``jaxrnn._src.sharding.data_parallel``);
* ``jit`` with an *Auto* mesh (the compiler propagates the sharding);
* inside the user's own ``jax.shard_map``, where ``jax.grad`` sums the
  gradient of replicated weights over the devices, and ``bptt`` must too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jaxrnn
from helpers import assert_trees_close, make_problem, random_h0

CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(len(CPUS) < 4, reason="needs 4 CPU devices (conftest.py)")

T, B, HIDDEN = 7, 8, (4, 6)


def _mesh(shape, names, axis_type=AxisType.Explicit):
  return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape), devices=CPUS[:4])


def _put(mesh, a, *spec):
  return jax.device_put(a, NamedSharding(mesh, P(*spec)))


def _spec(a):
  """How ``a`` is split: a mesh axis name (or None: whole) per axis."""
  spec = tuple(getattr(a.sharding, "spec", ()))
  return spec + (None,) * (a.ndim - len(spec))


def _problem(loss="mse", many_to_one=False):
  params, xs, targets = make_problem(0, T=T, B=B, D=4, hidden=HIDDEN, O=3, loss=loss,
                                     many_to_one=many_to_one)
  lengths = jnp.array([7, 3, 5, 7, 1, 2, 6, 7])
  resets = jnp.zeros((T, B), bool).at[3, ::3].set(True)
  return params, xs, targets, dict(lengths=lengths, resets=resets, h0=random_h0(0, B, HIDDEN))


def _place(mesh, params, kw):
  """W_hh split over "y" (model-split weights), h0 over "y", the rest unsplit."""
  params = jax.tree.map(lambda a: _put(mesh, a, "y") if a.ndim == 2 and a.shape[0] % 2 == 0
                        else a, params)
  kw = dict(kw)
  if "h0" in kw:
    kw["h0"] = tuple(_put(mesh, h, "y") for h in kw["h0"])
  return params, kw


CASES = {
    "bptt": (jaxrnn.bptt, dict(loss="mse"), ("lengths", "resets", "h0"), dict(return_dh0=True)),
    "bptt-truncated-checkpointed": (jaxrnn.bptt, dict(loss="mse"), ("lengths",),
                                    dict(tau_max=3, tau_b=2, checkpoint_every=2)),
    "autodiff-truncated": (jaxrnn.autodiff_bptt, dict(loss="mse"), ("lengths", "resets", "h0"),
                           dict(tau_max=3, tau_b=2, return_dh0=True)),
    "deltas-xent-many-to-one": (jaxrnn.backward_deltas, dict(loss="xent", many_to_one=True),
                                ("lengths",), {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_explicit_mesh_matches_one_device(case):
  """Promised: under an Explicit 2x2 mesh, with the batch of xs split over "x" and weights,
  h0 and targets split otherwise or not at all, every result equals the one-device call;
  gradients come back split as their parameters are, per-example results as the batch."""
  fn, problem, arrays, options = CASES[case]
  params, xs, targets, kw = _problem(**problem)
  kw = dict({k: kw[k] for k in arrays}, **problem, **options)
  expected = fn(params, xs, targets, **kw)
  mesh = _mesh((2, 2), ("x", "y"))
  p_split, kw_split = _place(mesh, params, kw)
  with jax.set_mesh(mesh):
    got = jax.jit(lambda p, x, y, kw: fn(p, x, y, **kw, **options, **problem))(
        p_split, _put(mesh, xs, None, "x"), targets,
        {k: v for k, v in kw_split.items() if k in arrays})
  assert_trees_close(got, expected, 1e-12, err=case)
  if fn is jaxrnn.backward_deltas:
    assert all(_spec(d)[1] == "x" for d in got)
    return
  assert jax.tree.map(_spec, got[1]) == jax.tree.map(_spec, p_split)
  if options.get("return_dh0"):
    assert all(_spec(d) == ("x", None) for d in got[2])


@pytest.mark.parametrize("kw", [dict(), dict(tau_max=3, tau_b=2, lengths=True),
                                dict(checkpoint_every=3, resets=True)])
def test_shard_map_sums_gradients_like_jax_grad(kw):
  """Promised: inside jax.shard_map (batch split over 4 devices, weights replicated) bptt
  returns what jax.value_and_grad does there: the device's loss, and the weight gradient
  summed over the devices. So pmean(loss) and grads / 4 are the one-device results."""
  params, xs, targets, extra = _problem()
  kw = {k: (extra[k] if v is True else v) for k, v in kw.items()}
  mesh = _mesh((4,), ("b",))
  arrays = {k: v for k, v in kw.items() if k in ("lengths", "resets")}
  static = {k: v for k, v in kw.items() if k not in arrays}
  auto_kw = {k: v for k, v in static.items() if k != "checkpoint_every"}

  def local(p, x, y, arrays):
    manual = jaxrnn.bptt(p, x, y, **arrays, **static)
    auto = jaxrnn.autodiff_bptt(p, x, y, **arrays, **auto_kw)
    per_device = lambda r: (r[0][None], r[1])       # each device's loss, one row each
    return per_device(manual), per_device(auto), jax.lax.pmean(manual[0], "b")

  specs = {k: P("b") if k == "lengths" else P(None, "b") for k in arrays}
  run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(None, "b"), P(None, "b"), specs),
                              out_specs=((P("b"), P()), (P("b"), P()), P())))
  split = lambda tree, spec: jax.tree.map(lambda a: _put(mesh, a, *spec), tree)
  manual, auto, mean_loss = run(
      params, split(xs, (None, "b")), split(targets, (None, "b")),
      {k: split(v, tuple(specs[k])) for k, v in arrays.items()})
  assert_trees_close(manual, auto, 1e-12)
  value, grads = jaxrnn.bptt(params, xs, targets, **kw)
  np.testing.assert_allclose(mean_loss, value, rtol=1e-12)
  assert_trees_close(jax.tree.map(lambda g: g / 4, manual[1]), grads, 1e-12)


def test_auto_mesh_matches_one_device():
  """Promised: jit with an Auto mesh (the compiler propagates the batch split) agrees too."""
  params, xs, targets, kw = _problem()
  mesh = _mesh((4,), ("b",), AxisType.Auto)
  expected = jaxrnn.bptt(params, xs, targets, tau_max=3, **kw)
  got = jax.jit(lambda p, x, y, kw: jaxrnn.bptt(p, x, y, tau_max=3, **kw))(
      params, _put(mesh, xs, None, "b"), _put(mesh, targets, None, "b"), kw)
  assert_trees_close(got, expected, 1e-12)


@pytest.mark.parametrize("method", ["manual", "autodiff"])
def test_training_on_explicit_mesh_matches_one_device(method):
  """Promised: a TBPTT stream (its state made unsplit by init) and make_train_step take
  batch-split chunks and give the one-device parameters, losses and state; the state
  comes back split along the batch."""
  params, xs, targets, _ = _problem()
  mesh = _mesh((4,), ("b",))
  stream = jaxrnn.make_tbptt_stream(optax.sgd(0.1), tau_b=2, tau_max=3, method=method)

  def run(split):
    p, (opt_state, state) = params, stream.init(params, B)
    losses = []
    for c in range(3):
      x, y = xs[2 * c:2 * c + 2], targets[2 * c:2 * c + 2]
      if split:
        x, y = _put(mesh, x, None, "b"), _put(mesh, y, None, "b")
      p, opt_state, state, value = stream.step(p, opt_state, state, x, y)
      losses.append(value)
    return p, state, losses

  expected = run(False)
  with jax.set_mesh(mesh):
    got = run(True)
  assert_trees_close(got, expected, 1e-12)
  assert all(_spec(h) == ("b", None) for h in got[1].h)

  step = jaxrnn.make_train_step(optax.adam(1e-2), method=method, tau_max=3)
  opt_state = optax.adam(1e-2).init(params)
  expected = step(params, opt_state, xs, targets)
  with jax.set_mesh(mesh):
    got = step(params, opt_state, _put(mesh, xs, None, "b"), targets)
  assert_trees_close(got[:2], expected[:2], 1e-12)
  np.testing.assert_allclose(got[2].loss, expected[2].loss, rtol=1e-12)
