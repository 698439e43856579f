"""Loops of several time steps per iteration (``bptt(..., unroll=k)``): same gradients.

``rnn.block_loop`` runs a loop over blocks of ``unroll`` steps and one block
for the steps left over; the forward and reverse loops read and write a block
of their buffers at once. The rest of the suite runs the backend's default
(1 on CPU, 16 elsewhere), so this file checks other block sizes against
autodiff with every option, on CPU too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from helpers import (OPTION_B, OPTION_CASES, OPTION_T, RTOL, assert_bptt_equals_autodiff,
                     assert_trees_close,
                     make_problem, option_kwargs)
from jaxrnn._src import rnn


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("n,unroll", [(0, 4), (1, 4), (5, 1), (16, 4), (17, 4), (7, 3), (3, 16)])
def test_block_loop_visits_every_step_once_in_order(n, unroll, reverse):
  def block(start, size, carry):
    order, k = carry
    for j in (reversed(range(size)) if reverse else range(size)):
      order, k = order.at[k].set(start + j), k + 1
    return order, k

  order, k = rnn.block_loop(n, unroll, block, (jnp.full((n,), -1), 0), reverse=reverse)
  want = list(reversed(range(n))) if reverse else list(range(n))
  assert int(k) == n
  np.testing.assert_array_equal(order, np.array(want, dtype=int))


T, B, D, O = OPTION_T, OPTION_B, 3, 3


# 3: whole blocks (and a partial one in the reverse loop); 16: one whole block
# and a partial one in each loop, through two layers
@pytest.mark.parametrize("unroll,hidden", [(3, (4,)), (16, (9, 3))])
@pytest.mark.parametrize("opt", list(OPTION_CASES))
def test_unrolled_equals_autodiff(opt, unroll, hidden):
  seed = 5 + len(hidden)
  kw = option_kwargs(opt, hidden, seed)
  params, xs, targets = make_problem(seed, T=T, B=B, D=D, hidden=hidden, O=O,
                                     loss=kw.get("loss", "mse"),
                                     many_to_one=kw.get("many_to_one", False))
  assert_bptt_equals_autodiff(params, xs, targets, f"{opt}, unroll={unroll}", unroll=unroll, **kw)


def test_unrolled_single_sequence_and_float32():
  """B = 1 runs the reverse loop on [T, H] buffers; float32 at its own tolerance."""
  for batch, dtype in ((1, jnp.float64), (3, jnp.float32)):
    params, xs, targets = make_problem(2, T=T, B=batch, D=D, hidden=(5,), O=O, dtype=dtype)
    got = jaxrnn.bptt(params, xs, targets, unroll=5)
    want = jaxrnn.autodiff_bptt(params, xs, targets)
    assert_trees_close(got, want, RTOL[dtype])


@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_width_one_layers_in_blocks_equal_autodiff(activation):
  """Regression: XLA:CPU miscompiled blocks of steps of a width-1 layer.

  Its product becomes a multiplication, and XLA fused a block's chain of steps
  into the block's in-place store, which then read steps it had already
  overwritten (openxla/xla#49176). It showed for ``identity`` and ``relu``
  when a loop made one whole block and a leftover block of two or more
  steps: T = 9 in blocks of 5, 6 or 7 gave losses off by up to 280%. Such
  layers now run one step per iteration where compiled for a CPU
  (``LoopPlan.blocks``). On a GPU this runs them in blocks, which XLA:GPU
  compiles right.
  """
  params, xs, targets = make_problem(1, T=9, B=3, D=2, hidden=(1, 2, 1), O=2,
                                     activation=activation)
  for unroll in (5, 6, 7):
    assert_bptt_equals_autodiff(params, xs, targets, f"unroll={unroll}", unroll=unroll)


def test_width_one_layers_run_one_step_per_iteration_where_compiled_for_a_cpu():
  """``LoopPlan.blocks`` decides by the platform the program is lowered for.

  Exported for a CPU, bptt with ``unroll=7`` is the program of ``unroll=1``
  for a width-1 layer (one store per loop); exported for a GPU (on any
  host), it keeps its blocks: a partial block of 2 steps and a loop of whole
  ones, two stores per loop. A width-2 layer keeps its blocks on both.
  """
  from jax import export

  def stores(platform, unroll, hidden):
    params, xs, targets = make_problem(1, T=9, B=1, D=2, hidden=hidden, O=2)
    fn = jax.jit(lambda p, x, y: jaxrnn.bptt(p, x, y, unroll=unroll))
    module = export.export(fn, platforms=[platform])(params, xs, targets).mlir_module()
    return module.count("stablehlo.dynamic_update_slice")

  assert stores("cpu", 7, (1,)) == stores("cpu", 1, (1,)) == 2
  assert stores("cuda", 7, (1,)) == 4
  assert stores("cpu", 7, (2,)) == stores("cuda", 7, (2,)) == 4


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "4"])
def test_unroll_must_be_a_positive_int(bad):
  params, xs, targets = make_problem(0, T=4, B=2, D=D, hidden=(3,), O=O)
  with pytest.raises(ValueError, match="unroll"):
    jaxrnn.bptt(params, xs, targets, unroll=bad)


def test_blocks_keep_the_plain_loop_product():
  """Matrix-vector loop products need one step per iteration (rnn.is_small_product)."""
  W = jnp.zeros((4, 4))
  assert rnn.is_small_product(W, 3, 64)
  assert not rnn.is_small_product(W, 3, 64, unroll=2)


def test_default_unroll_follows_the_backend():
  assert rnn.default_unroll(7) == 7
  assert rnn.default_unroll() == (1 if jax.default_backend() == "cpu" else rnn._GPU_UNROLL)
