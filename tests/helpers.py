"""Shared test helpers: random problems, tree comparison, pairwise designs."""

import itertools
import warnings
from typing import Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxrnn

# Tolerances keyed by dtype, as in JAX's own RNN gradient tests.
RTOL = {jnp.float64: 1e-10, jnp.float32: 1e-4}


def make_problem(seed, *, T=6, B=3, D=3, hidden=(4,), O=2, activation="tanh",
                 loss="mse", many_to_one=False, readout=True, dtype=jnp.float64,
                 scale=1.0):
  """Random params, inputs and targets of the requested sizes.

  Drawn with NumPy (eager jax.random compiles a kernel for every new shape,
  which would dominate the suite). Weights are scaled like init_params';
  biases are non-zero so their gradients are exercised.
  """
  rng = np.random.default_rng(seed)
  arr = lambda *shape, s=1.0: jnp.asarray(s * rng.normal(size=shape), dtype)
  layers, d_in = [], D
  for h in hidden:
    layers.append(jaxrnn.LayerParams(W_xh=arr(d_in, h, s=scale / np.sqrt(d_in)),
                                     W_hh=arr(h, h, s=scale / np.sqrt(h)),
                                     b_h=arr(h, s=0.1)))
    d_in = h
  ro = jaxrnn.Readout(arr(d_in, O, s=scale / np.sqrt(d_in)), arr(O, s=0.1)) if readout else None
  params = jaxrnn.RNNParams(tuple(layers), ro, activation)
  xs = arr(T, B, D)
  out = O if readout else hidden[-1]
  lead = (B,) if many_to_one else (T, B)
  if loss == "mse":
    targets = arr(*lead, out)
  else:
    targets = jnp.asarray(rng.integers(0, out, size=lead), jnp.int32)
  return params, xs, targets


def random_h0(seed, B, hidden, dtype=jnp.float64):
  rng = np.random.default_rng(1000 + seed)
  return tuple(jnp.asarray(0.5 * rng.normal(size=(B, h)), dtype) for h in hidden)


def assert_trees_close(actual, expected, rtol, atol=0.0, err=""):
  """Leafwise assert_allclose with a scale-aware atol (relative to each leaf's max)."""
  la, ta = jax.tree.flatten(actual)
  le, te = jax.tree.flatten(expected)
  assert ta == te, f"{err}: tree structures differ: {ta} vs {te}"
  for path_a, a, e in zip(jax.tree_util.tree_flatten_with_path(actual)[0], la, le):
    e = np.asarray(e)
    scale = float(np.max(np.abs(e))) if e.size else 0.0
    np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=atol + rtol * scale,
                               err_msg=f"{err} at {jax.tree_util.keystr(path_a[0])}")


def assert_bptt_equals_autodiff(params, xs, targets, err="", **kw):
  """``bptt(**kw)`` against ``autodiff_bptt`` of the same loss, float64 tolerance.

  The options that change how bptt computes, not what (``checkpoint_every``,
  ``unroll``, ``fused``), are bptt's alone.
  """
  got = jaxrnn.bptt(params, xs, targets, **kw)
  for how in ("checkpoint_every", "unroll", "fused"):
    kw.pop(how, None)
  want = jaxrnn.autodiff_bptt(params, xs, targets, **kw)
  np.testing.assert_allclose(got[0], want[0], rtol=RTOL[jnp.float64])
  assert_trees_close(got[1:], want[1:], RTOL[jnp.float64], err=err)


def pairwise(factors: Dict[str, Sequence]) -> List[dict]:
  """A greedy covering array: every pair of values of every two factors appears.

  Deterministic; small enough to scan the full product for each pick.
  """
  names = list(factors)
  uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
               for va in factors[a] for vb in factors[b]}
  product = [dict(zip(names, vals)) for vals in itertools.product(*factors.values())]
  design = []

  def gain(row):
    return sum((a, row[a], b, row[b]) in uncovered for a, b in itertools.combinations(names, 2))

  while uncovered:
    best = max(product, key=gain)
    design.append(best)
    for a, b in itertools.combinations(names, 2):
      uncovered.discard((a, best[a], b, best[b]))
  return design


def covered_pairs(design, factors):
  return {(a, row[a], b, row[b]) for row in design
          for a, b in itertools.combinations(list(factors), 2)}


# Every option of bptt once, on T = 24 steps of B = 3 sequences (the loop tests'
# cases): "h0": random initial states, "resets": random resets, "loss_weights":
# random weights, drawn by option_kwargs.
OPTION_T, OPTION_B = 24, 3
OPTION_CASES = {
    "plain": {},
    "h0": dict(h0=True, return_dh0=True),
    "lengths+resets": dict(lengths=np.array([24, 9, 17]), resets=True, h0=True,
                           return_dh0=True),
    "loss_weights+xent": dict(loss_weights=True, loss="xent"),
    "many_to_one": dict(many_to_one=True, lengths=np.array([5, 24, 12])),
    "truncated": dict(tau_max=6, tau_b=4),
    "checkpointed": dict(checkpoint_every=20, lengths=np.array([24, 20, 3])),
}


def option_kwargs(opt, hidden, seed, dtype=jnp.float64):
  """bptt's keyword arguments for the case ``OPTION_CASES[opt]``."""
  kw = dict(OPTION_CASES[opt])
  rng = np.random.default_rng(seed)
  if kw.pop("h0", False):
    kw["h0"] = random_h0(seed, OPTION_B, hidden, dtype)
  if kw.pop("resets", False):
    kw["resets"] = jnp.asarray(rng.random((OPTION_T, OPTION_B)) < 0.15)
  if kw.pop("loss_weights", False):
    kw["loss_weights"] = jnp.asarray(rng.random((OPTION_T, OPTION_B)), dtype)
  if "lengths" in kw:
    kw["lengths"] = jnp.asarray(kw["lengths"])
  return kw


def objective_recorder(params, seed=9):
  """``(optimizer, moved)``: an optax transformation that applies no update and keeps in
  its state the extra arguments it was given, ``(value, grad, value_fn(moved),
  jax.grad(value_fn)(moved))``, with ``moved`` = params plus a random displacement."""
  rng = np.random.default_rng(seed)
  delta = jax.tree.map(lambda p: jnp.asarray(0.1 * rng.normal(size=p.shape)), params)

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return jnp.zeros(()), zeros, jnp.zeros(()), zeros

  def update(updates, state, params=None, *, value, grad, value_fn, **extra_args):
    moved = optax.apply_updates(params, delta)
    return jax.tree.map(jnp.zeros_like, updates), (value, grad,
                                                   *jax.value_and_grad(value_fn)(moved))
  return (optax.GradientTransformationExtraArgs(init, update),
          optax.apply_updates(params, delta))


def call_donating(f, args, donate_argnums):
  """``(result, donated)``: ``jax.jit(f, donate_argnums=...)`` called on ``args``, with
  copies of the donated ones (returned as ``donated``, to check which were deleted).
  JAX warns about a donated buffer that XLA could not reuse; here that is an error."""
  args = list(args)
  donated = [jax.tree.map(jnp.copy, args[i]) for i in donate_argnums]
  for i, copy in zip(donate_argnums, donated):
    args[i] = copy
  with warnings.catch_warnings():
    warnings.filterwarnings("error", "Some donated buffers were not usable")
    return jax.jit(f, donate_argnums=donate_argnums)(*args), donated
