"""Property test: random sizes and options, manual BPTT == autodiff (float64).

Sizes are drawn from small sets so that compiled functions are reused
across examples (the jit cache is keyed on shapes and static options).
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxrnn
from helpers import assert_trees_close, make_problem, random_h0


@st.composite
def problems(draw):
  T = draw(st.sampled_from([1, 2, 7]))
  B = draw(st.sampled_from([1, 3]))
  hidden = draw(st.sampled_from([(1,), (4,), (3, 2), (2, 5, 1)]))
  loss = draw(st.sampled_from(["mse", "xent"]))
  readout = draw(st.booleans()) or (loss == "xent" and hidden[-1] == 1)
  opts = dict(
      T=T, B=B, hidden=hidden, loss=loss, readout=readout,
      activation=draw(st.sampled_from(sorted(jaxrnn.ACTIVATIONS))),
      many_to_one=draw(st.booleans()),
      h0=draw(st.booleans()),
      tau_max=draw(st.sampled_from([None, 1, 2, 3])),
      seed=draw(st.integers(0, 2**16)))
  opts["tau_b"] = draw(st.sampled_from([None] + list(range(1, (opts["tau_max"] or 3) + 1))))
  return opts


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_manual_equals_autodiff_everywhere(c):
  params, xs, targets = make_problem(
      c["seed"], T=c["T"], B=c["B"], hidden=c["hidden"], O=2, activation=c["activation"],
      loss=c["loss"], many_to_one=c["many_to_one"], readout=c["readout"])
  h0 = random_h0(c["seed"], c["B"], c["hidden"]) if c["h0"] else None
  kw = dict(loss=c["loss"], many_to_one=c["many_to_one"], h0=h0, tau_max=c["tau_max"],
            tau_b=c["tau_b"], return_dh0=True)
  value, grads, dh0 = jaxrnn.bptt(params, xs, targets, **kw)
  ref_value, ref_grads, ref_dh0 = jaxrnn.autodiff_bptt(params, xs, targets, **kw)
  np.testing.assert_allclose(value, ref_value, rtol=1e-10)
  assert_trees_close(grads, ref_grads, 1e-10, err="grads")
  assert_trees_close(dh0, ref_dh0, 1e-10, err="dh0")
