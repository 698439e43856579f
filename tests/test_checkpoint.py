"""Memory-efficient mode: checkpoint_every=k gives the same gradients (memory: test_memory.py)."""

import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from helpers import assert_trees_close, make_problem, random_h0

T, B = 11, 3
LENGTHS = jnp.array([11, 4, 7])
RESETS = jnp.zeros((T, B), bool).at[3, 0].set(True).at[8, 2].set(True)
WEIGHTS = jnp.asarray(np.random.default_rng(0).uniform(0, 2, size=(T, B)))

CASES = [  # k, hidden, loss, many_to_one, truncation, options
    (3, (3, 2), "mse", False, {}, {}),
    (4, (3,), "xent", True, {}, dict(lengths=LENGTHS)),
    (1, (2, 2), "mse", False, {}, dict(resets=RESETS)),
    (11, (3,), "xent", False, {}, dict(loss_weights=WEIGHTS)),
    (20, (3,), "mse", False, {}, {}),
    (3, (3, 2), "mse", False, dict(tau_max=4, tau_b=2), {}),
    (2, (3,), "xent", False, dict(tau_max=3), dict(lengths=LENGTHS, resets=RESETS)),
    (4, (2, 3), "mse", True, dict(tau_max=5, tau_b=1), dict(lengths=LENGTHS)),
    (5, (3,), "mse", False, dict(tau_max=4, tau_b=4),
     dict(resets=RESETS, loss_weights=WEIGHTS, lengths=LENGTHS)),
    (20, (3,), "xent", False, dict(tau_max=4, tau_b=3), dict(resets=RESETS)),  # k > T
]


@pytest.mark.parametrize("k,hidden,loss,many_to_one,trunc,opts", CASES)
def test_checkpointed_equals_autodiff(k, hidden, loss, many_to_one, trunc, opts):
  params, xs, targets = make_problem(k, T=T, B=B, hidden=hidden, loss=loss,
                                     many_to_one=many_to_one)
  kw = dict(loss=loss, many_to_one=many_to_one, h0=random_h0(0, B, hidden), return_dh0=True,
            **trunc, **opts)
  got = jaxrnn.bptt(params, xs, targets, checkpoint_every=k, **kw)
  want = jaxrnn.autodiff_bptt(params, xs, targets, **kw)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
  assert_trees_close(got[1], want[1], 1e-10, err="grads")
  assert_trees_close(got[2], want[2], 1e-10, err="dh0")


@pytest.mark.parametrize("k", [0, -3, 2.5, "4"])
def test_bad_checkpoint_every(k):
  params, xs, targets = make_problem(0, T=5, B=2)
  with pytest.raises(ValueError, match="checkpoint_every"):
    jaxrnn.bptt(params, xs, targets, checkpoint_every=k)
