"""Malformed calls: every one raises ValueError/TypeError naming the argument, never anything else.

A hypothesis strategy builds a valid call to a public function, then breaks
one argument (wrong rank, mismatched size, wrong dtype, unknown name, out of
range option), and asserts the error type and that the message names the
broken argument.
"""

import jax.numpy as jnp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxrnn
from helpers import make_problem

T, B, D, HID, O = 5, 3, 2, (4, 3), 2
PARAMS, XS, Y = make_problem(0, T=T, B=B, D=D, hidden=HID, O=O)
CLASSES = jnp.zeros((T, B), jnp.int32)

FUNCTIONS = {
    "bptt": jaxrnn.bptt, "autodiff_bptt": jaxrnn.autodiff_bptt, "loss": jaxrnn.loss,
    "backward_deltas": jaxrnn.backward_deltas,
}

# (argument, replacement value) pairs; the argument's name must be in the message.
ARRAYS = st.sampled_from([
    ("xs", jnp.ones((T, B))), ("xs", jnp.ones((T, B, D, 1))), ("xs", jnp.ones(())),
    ("xs", jnp.ones((T, B, D + 1))), ("xs", jnp.ones((T, B, D), jnp.int32)),
    ("xs", jnp.ones((T, B, D), bool)), ("xs", jnp.ones((0, B, D))), ("xs", jnp.ones((T, 0, D))),
    ("xs", jnp.ones((T, B, D), jnp.complex64)),
    ("targets", jnp.ones((T, B))), ("targets", jnp.ones((T, B, O + 1))),
    ("targets", jnp.ones((T + 1, B, O))), ("targets", jnp.ones((T, B, O), jnp.int32)),
    ("h0", (jnp.zeros((B, 4)),)), ("h0", (jnp.zeros((B, 4)), jnp.zeros((B, 4)))),
    ("h0", (jnp.zeros((B + 1, 4)), jnp.zeros((B, 3)))), ("h0", jnp.zeros((B, 4))),
    ("h0", (jnp.zeros((B, 4), jnp.int32), jnp.zeros((B, 3)))),
    ("lengths", jnp.ones((B + 1,), jnp.int32)), ("lengths", jnp.ones((B,))),
    ("lengths", jnp.ones((B, 1), jnp.int32)),
    ("loss_weights", jnp.ones((T, B + 1))), ("loss_weights", jnp.ones((T,))),
    ("loss_weights", jnp.ones((T, B), jnp.int32)),
    ("resets", jnp.zeros((T, B))), ("resets", jnp.zeros((T + 2, B), bool)),
])
OPTIONS = st.sampled_from([
    ("loss", "hinge"), ("loss", ""), ("loss", ["mse"]), ("loss", None),
    ("many_to_one", "yes"), ("many_to_one", [True]),
    ("tau_max", 0), ("tau_max", -1), ("tau_max", 2.0), ("tau_max", "3"), ("tau_max", True),
    ("tau_b", 0), ("tau_b", 1.5), ("tau_b", [2]),
])
PARAMS_BAD = st.sampled_from([
    ("activation", PARAMS._replace(activation="gelu")),
    ("W_hh", PARAMS._replace(layers=(PARAMS.layers[0]._replace(W_hh=jnp.ones((4, 5))),
                                     PARAMS.layers[1]))),
    ("b_h", PARAMS._replace(layers=(PARAMS.layers[0]._replace(b_h=jnp.ones((5,))),
                                    PARAMS.layers[1]))),
    ("W_xh", PARAMS._replace(layers=(PARAMS.layers[0],
                                     PARAMS.layers[1]._replace(W_xh=jnp.ones((5, 3)))))),
    ("W_hy", PARAMS._replace(readout=PARAMS.readout._replace(W_hy=jnp.ones((4, O))))),
    ("params", {"layers": PARAMS.layers}),
    ("params", PARAMS._replace(layers=())),
])

COUNT = {"calls": 0}


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.sampled_from(sorted(FUNCTIONS)), st.one_of(ARRAYS, OPTIONS, PARAMS_BAD))
def _malformed_call_raises_a_clear_error(fn_name, bad):
  name, value = bad
  if fn_name == "loss" and name in ("tau_max", "tau_b"):
    return  # loss has no truncation options
  kwargs = dict(params=PARAMS, xs=XS, targets=Y)
  if name in ("xs", "targets", "h0", "lengths", "loss_weights", "resets", "loss",
              "many_to_one", "tau_max", "tau_b"):
    kwargs[name] = value
  else:
    kwargs["params"] = value
  params, xs, targets = kwargs.pop("params"), kwargs.pop("xs"), kwargs.pop("targets")
  COUNT["calls"] += 1
  with pytest.raises((ValueError, TypeError)) as info:
    FUNCTIONS[fn_name](params, xs, targets, **kwargs)
  message = str(info.value)
  assert name in message, (fn_name, name, message)
  assert "XLA" not in message and "Traceback" not in message


def test_forward_malformed_inputs():
  for name, value in [("xs", jnp.ones((T, B))), ("h0", (jnp.zeros((B, 4)),)),
                      ("lengths", jnp.ones((B,))), ("resets", jnp.zeros((T, B)))]:
    kw = {} if name == "xs" else {name: value}
    with pytest.raises((ValueError, TypeError), match=name):
      jaxrnn.forward(PARAMS, value if name == "xs" else XS, **kw)


def test_malformed_calls_raise_clear_errors():
  """The property above, then a check that it tried each broken argument with each
  function (the space is finite; hypothesis stops once it has seen it all). One test,
  so that the count is this run's, whichever process runs it."""
  COUNT["calls"] = 0
  _malformed_call_raises_a_clear_error()
  assert COUNT["calls"] >= 150, COUNT
