"""Property test over the whole option space: manual BPTT == autodiff (float64, rtol 1e-9).

Everything that is static for ``jax.jit`` (sizes, activation, loss, readout,
truncation, which optional arrays are given, checkpointing, time steps per
loop iteration) is drawn from
STRUCTURES, a pairwise covering design over those options: every value of
every option, and every pair of values, appears. Everything dynamic (the
parameter values, inputs, targets, h0, lengths, loss weights, reset patterns)
is drawn freshly for every example. Examples with the same structure reuse
the compiled functions, so hundreds of examples fit in the suite's budget.
"""

import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxrnn
from helpers import assert_trees_close, pairwise

FACTORS = {
    "activation": sorted(jaxrnn.ACTIVATIONS),
    "hidden": [(1,), (4,), (3, 1), (2, 5, 3)],
    "loss": ["mse", "xent"],
    "many_to_one": [False, True],
    "readout": [True, False],
    "h0": [False, True],
    "truncation": [(None, None), (2, None), (3, 1), (4, 2)],
    "lengths": [False, True],
    "loss_weights": [False, True],
    "resets": [False, True],
    "checkpoint_every": [None, 2],
    "unroll": [1, 4],       # time steps per loop iteration: whole and partial blocks
    "T": [1, 6],
    "B": [1, 3],
}
STRUCTURES = pairwise(FACTORS)
EXAMPLES = 240


def _draw_values(s, seed):
  rng = np.random.default_rng(seed)
  T, B, D = s["T"], s["B"], 2
  hidden = s["hidden"]
  scale = rng.choice([0.3, 1.0, 2.0])
  layers, d_in = [], D
  for h in hidden:
    layers.append(jaxrnn.LayerParams(
        jnp.asarray(scale * rng.normal(size=(d_in, h)) / np.sqrt(d_in)),
        jnp.asarray(scale * rng.normal(size=(h, h)) / np.sqrt(h)),
        jnp.asarray(0.3 * rng.normal(size=h))))
    d_in = h
  O = 3 if s["readout"] else hidden[-1]
  readout = (jaxrnn.Readout(jnp.asarray(rng.normal(size=(d_in, O)) / np.sqrt(d_in)),
                            jnp.asarray(0.1 * rng.normal(size=O))) if s["readout"] else None)
  params = jaxrnn.RNNParams(tuple(layers), readout, s["activation"])
  xs = jnp.asarray(rng.normal(size=(T, B, D)))
  lead = (B,) if s["many_to_one"] else (T, B)
  targets = (jnp.asarray(rng.normal(size=lead + (O,))) if s["loss"] == "mse"
             else jnp.asarray(rng.integers(0, O, size=lead), jnp.int32))
  kw = dict(loss=s["loss"], many_to_one=s["many_to_one"], tau_max=s["truncation"][0],
            tau_b=s["truncation"][1], return_dh0=True)
  if s["h0"]:
    kw["h0"] = tuple(jnp.asarray(rng.normal(size=(B, h))) for h in hidden)
  if s["lengths"]:
    kw["lengths"] = jnp.asarray(rng.integers(1, T + 1, size=B), jnp.int32)
  if s["loss_weights"] and not s["many_to_one"]:
    kw["loss_weights"] = jnp.asarray(rng.uniform(0, 2, size=(T, B)) * (rng.random((T, B)) > 0.2))
  if s["resets"]:
    kw["resets"] = jnp.asarray(rng.random((T, B)) < 0.3)
  return params, xs, targets, kw


def test_structures_cover_every_pair():
  import itertools
  from helpers import covered_pairs
  want = {(a, va, b, vb) for a, b in itertools.combinations(FACTORS, 2)
          for va in FACTORS[a] for vb in FACTORS[b]}
  assert want <= covered_pairs(STRUCTURES, FACTORS)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.integers(0, len(STRUCTURES) - 1), st.integers(0, 2**31 - 1))
def test_manual_equals_autodiff_everywhere(index, seed):
  s = STRUCTURES[index]
  params, xs, targets, kw = _draw_values(s, seed)
  value, grads, dh0 = jaxrnn.bptt(params, xs, targets, checkpoint_every=s["checkpoint_every"],
                                  unroll=s["unroll"], **kw)
  ref_value, ref_grads, ref_dh0 = jaxrnn.autodiff_bptt(params, xs, targets, **kw)
  np.testing.assert_allclose(value, ref_value, rtol=1e-9)
  assert_trees_close(grads, ref_grads, 1e-9, atol=1e-12, err=f"grads, structure {s}")
  assert_trees_close(dh0, ref_dh0, 1e-9, atol=1e-12, err=f"dh0, structure {s}")
