"""The loops' small products: matrix-vector form, same gradients, buffers updated in place.

``rnn.loop_matmul`` runs a small per-step product ``[N, P] @ [P, Q]`` as N
matrix-vector products (see ``rnn._MATVEC_MAX``); the hand-written pass
uses it in its forward loop and its reverse loop. The other tests mostly
run short sequences (T < 4 H), which keep the plain product, so this file
checks the matrix-vector path across the options.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from helpers import (OPTION_B, OPTION_CASES, OPTION_T, RTOL, assert_bptt_equals_autodiff,
                     assert_trees_close,
                     make_problem, option_kwargs)
from jaxrnn._src import rnn


@pytest.mark.parametrize("n,P,Q,T,small", [
    (3, 4, 4, 16, True),       # T = 4 P: the copies of W are a quarter of one [T, N, Q] array
    (3, 4, 4, 15, False),      # shorter: plain product
    (1, 4, 4, 64, False),      # one row is a matrix-vector product already
    (8, 32, 32, 128, True),    # the largest N·P·Q
    (9, 32, 32, 128, False),
    (4, 64, 32, 256, True),    # not square
])
def test_loop_matmul_paths(n, P, Q, T, small):
  rng = np.random.default_rng(0)
  W = jnp.asarray(rng.normal(size=(P, Q)))
  h = jnp.asarray(rng.normal(size=(n, P)))
  assert rnn.is_small_product(W, n, T) is small
  np.testing.assert_allclose(rnn.loop_matmul(W, n, T)(h), h @ W, rtol=1e-13, atol=1e-13)


T, B, D, O = OPTION_T, OPTION_B, 3, 3


@pytest.mark.parametrize("hidden", [(4,), (5, 3)])
@pytest.mark.parametrize("opt", list(OPTION_CASES))
def test_manual_equals_autodiff_on_the_matrix_vector_path(opt, hidden):
  steps = OPTION_CASES[opt].get("checkpoint_every", T)   # a forward loop's length
  for H in hidden:   # every layer's forward loop takes the path (truncated: not the windows')
    assert rnn.is_small_product(jnp.zeros((H, H)), B, steps)
  seed = 11 + len(hidden)
  kw = option_kwargs(opt, hidden, seed, jnp.float64)
  params, xs, targets = make_problem(seed, T=T, B=B, D=D, hidden=hidden, O=O,
                                     loss=kw.get("loss", "mse"),
                                     many_to_one=kw.get("many_to_one", False))
  # one step per iteration: the path on every backend
  assert_bptt_equals_autodiff(params, xs, targets, opt, unroll=1, **kw)


def test_float32_on_the_matrix_vector_path():
  params, xs, targets = make_problem(3, T=T, B=B, D=D, hidden=(6,), O=O, dtype=jnp.float32)
  assert rnn.is_small_product(params.layers[0].W_hh, B, T)
  got = jaxrnn.bptt(params, xs, targets, unroll=1)
  want = jaxrnn.autodiff_bptt(params, xs, targets)
  assert_trees_close(got, want, RTOL[jnp.float32])


def _while_bodies(hlo):
  """The text of every while loop's body computation in compiled HLO text."""
  names = set(re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo))
  blocks = hlo.split("\n\n")
  return [b for b in blocks if (m := re.match(r"%?([\w.\-]+) ", b.lstrip())) and m.group(1) in names]


# XLA:CPU keeps each loop step's update as a dynamic-update-slice in the loop
# body; XLA:GPU fuses it into kernels, where the text below does not apply.
cpu_hlo = pytest.mark.skipif(jax.default_backend() != "cpu",
                             reason="a claim about XLA:CPU's compiled loop bodies")


@cpu_hlo
@pytest.mark.parametrize("unroll", [1, 4])
@pytest.mark.parametrize("dims", [(64, 4, 8), (64, 4, 32)])   # (T, B, H): small / plain
def test_loops_update_their_buffers_in_place(dims, unroll):
  """No loop step copies a [T, B, H] buffer (such a copy made a step 200x slower)."""
  T_, B_, H = dims
  params = jaxrnn.init_params(jax.random.key(0), 3, (H,), 3, dtype=jnp.float32)
  xs = jnp.ones((T_, B_, 3), jnp.float32)
  assert rnn.is_small_product(params.layers[0].W_hh, B_, T_) is (H == 8)
  hlo = jax.jit(lambda p, x: jaxrnn.bptt(p, x, x, unroll=unroll)).lower(
      params, xs).compile().as_text()
  bodies = _while_bodies(hlo)
  assert len(bodies) == 2, "expected a forward and a reverse loop"
  buffer = re.escape(f"[{T_},{B_},{H}]")
  for body in bodies:
    assert "dynamic-update-slice" in body
    copies = [l for l in body.splitlines() if re.search(buffer + r"\S* copy\(", l)]
    assert not copies, copies
