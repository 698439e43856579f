"""Numerical safety: saturated units, near-one-hot softmax, very long float32 sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from helpers import assert_bptt_equals_autodiff, assert_trees_close, make_problem


def _finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("activation", ["tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_saturated_units(activation, dtype):
  """Pre-activations around ±1e3 in the bounded activations: f' underflows to 0,
  nothing overflows."""
  params, xs, targets = make_problem(0, T=8, B=3, hidden=(4, 3), activation=activation,
                                     dtype=dtype, scale=300.0)
  xs = xs * 3
  z = xs[0] @ params.layers[0].W_xh
  assert float(jnp.max(jnp.abs(z))) > 500
  for loss, y in (("mse", targets), ("xent", jnp.zeros(targets.shape[:2], jnp.int32))):
    got = jaxrnn.bptt(params, xs, y, loss=loss, return_dh0=True)
    want = jaxrnn.autodiff_bptt(params, xs, y, loss=loss, return_dh0=True)
    assert _finite(got)
    assert_trees_close(got, want, 1e-10 if dtype == jnp.float64 else 1e-4,
                       atol=1e-6 if dtype == jnp.float32 else 0.0)


def test_unbounded_activation_overflow_is_reported_not_hidden():
  """relu is not bounded: weights ×300 over 8 steps really overflow float32. Both paths
  say so (non-finite loss), which the train step turns into a skipped update."""
  params, xs, targets = make_problem(0, T=8, B=3, hidden=(4, 3), activation="relu",
                                     dtype=jnp.float32, scale=300.0)
  for fn in (jaxrnn.bptt, jaxrnn.autodiff_bptt):
    assert not np.isfinite(float(fn(params, xs * 3, targets)[0]))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_near_one_hot_softmax(dtype):
  """Logits of ±1e3 (log-softmax, never log(softmax)): finite loss and gradients.

  Both methods are checked against autodiff in float64 on the same (rounded)
  parameters. Where the target is the most likely class, p_y = 1 − 7e-5:
  ``jax.nn.log_softmax`` there gives −log p_y and p_y − 1 only to 4e-4 in
  float32 (log(1 + s) loses s), and two float32 results that shared that
  error agreed only where they rounded alike (on the CPU, not on a GPU).
  ``jaxrnn``'s log-softmax uses log1p, δo_y = −Σ_{j≠y} p_j in bptt and the
  same form in its derivative rule for autodiff, which brings both within
  3e-5 of float64 (2.5e-5 each; autodiff was 1.2e-4 off before that rule).
  """
  params, xs, _ = make_problem(1, T=6, B=2, hidden=(3,), O=5, dtype=dtype)
  params = params._replace(readout=params.readout._replace(W_hy=params.readout.W_hy * 2e3))
  logits = jaxrnn.forward(params, xs)[2]
  assert float(jnp.max(jnp.abs(logits))) > 300
  up = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)
  wrong = jnp.argmin(logits, axis=-1)            # the least likely class: loss ~ 1e3
  right = jnp.argmax(logits, axis=-1)            # the most likely: loss ~ 7e-5
  # float32 tolerances (bptt, autodiff_bptt)
  for y, rtol32 in ((wrong, (1e-5, 1e-5)), (right, (3e-5, 3e-5))):
    want = jaxrnn.autodiff_bptt(up(params), up(xs), y, loss="xent")
    for fn, r32 in zip((jaxrnn.bptt, jaxrnn.autodiff_bptt), rtol32):
      got = fn(params, xs, y, loss="xent")
      assert _finite(got)
      assert_trees_close(up(got), want, 1e-10 if dtype == jnp.float64 else r32)


def test_long_float32_sequence():
  """T = 10000 in float32: finite, and within float32 accumulation error of autodiff."""
  params = jaxrnn.init_params(jax.random.key(0), 4, (16,), 2, dtype=jnp.float32)
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.normal(size=(10_000, 2, 4)), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(10_000, 2, 2)), jnp.float32)
  for kw in (dict(), dict(tau_max=100), dict(checkpoint_every=100)):
    got = jaxrnn.bptt(params, xs, ys, **kw)
    assert _finite(got)
    want = jaxrnn.autodiff_bptt(params, xs, ys, **{k: v for k, v in kw.items()
                                                    if k != "checkpoint_every"})
    assert _finite(want)
    assert_trees_close(got, want, 1e-3, atol=1e-3)


def test_log_softmax_matches_jax_and_is_accurate_near_one():
  """The log1p form equals ``jax.nn.log_softmax`` in float64 (ties and ±1e3 included), and
  in float32 keeps −log p for p = 1 − 1e-6, where log(1 + s) gives 0 or a rounded s."""
  from jaxrnn._src.rnn import log_softmax
  rng = np.random.default_rng(0)
  o = jnp.asarray(rng.normal(size=(4, 3, 7)) * np.array([1, 10, 1e3])[None, :, None])
  o = o.at[0, 0, :2].set(5.0)                      # a tie for the largest logit
  np.testing.assert_allclose(log_softmax(o), jax.nn.log_softmax(o, axis=-1), rtol=1e-12,
                             atol=1e-12)
  g = jax.grad(lambda o: -log_softmax(o)[..., 2].sum())(o)
  np.testing.assert_allclose(g, jax.grad(lambda o: -jax.nn.log_softmax(o)[..., 2].sum())(o),
                             rtol=1e-12, atol=1e-12)
  s = 1e-6
  o32 = jnp.asarray([0.0, np.log(s)], jnp.float32)    # p_0 = 1 / (1 + s)
  np.testing.assert_allclose(-log_softmax(o32)[0], np.log1p(s), rtol=1e-6)


def test_log_softmax_gradient_keeps_a_tiny_tail():
  """∂(−log p_y)/∂o = p − onehot(y) to float64 precision of each entry, however small.

  Where the target is the top class and the others have p ~ 1e-38, the
  target's entry is −Σ_{j≠y} p_j ~ −1e-38; differentiating the log1p
  formula gave 0 there (two terms near 1 cancelled), which turned every
  weight gradient of a saturated many-to-one loss around, sign included.
  """
  from jaxrnn._src.rnn import log_softmax
  o = jnp.asarray([[26.0, 113.3, -4.8], [0.3, -1.2, 2.0]])
  for y in range(3):
    got = jax.grad(lambda o: -log_softmax(o)[:, y].sum())(o)
    a = np.argmax(np.asarray(o), axis=-1)
    shifted = np.asarray(o) - np.take_along_axis(np.asarray(o), a[:, None], axis=-1)
    rest = np.where(shifted == 0, 0, np.exp(shifted)).sum(-1, keepdims=True)   # s
    p = np.exp(shifted - np.log1p(rest))
    want = p.copy()
    want[:, y] = -np.delete(p, y, axis=-1).sum(-1)              # p_y − 1 = −Σ_{j≠y} p_j
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)


def test_saturated_many_to_one_gradients_equal_autodiff_leaf_by_leaf():
  """A many-to-one xent loss of ~1e-38: bptt and autodiff agree on every (tiny) gradient."""
  params, xs, _ = make_problem(4, T=6, B=2, hidden=(3, 2), O=3, activation="identity",
                               loss="xent", many_to_one=True)
  logits = jaxrnn.forward(params, xs)[-1][-1]                   # [B, O] at the last step
  top = jnp.sort(logits, axis=-1)
  k = 90.0 / float(jnp.min(top[:, -1] - top[:, -2]))              # every margin ≥ 90
  params = params._replace(readout=jaxrnn.Readout(params.readout.W_hy * k,
                                                  params.readout.b_y * k))
  y = jnp.argmax(logits, axis=-1)
  value = jaxrnn.bptt(params, xs, y, loss="xent", many_to_one=True)[0]
  assert 0 < float(value) < 1e-38
  assert_bptt_equals_autodiff(params, xs, y, "saturated", loss="xent", many_to_one=True)


@pytest.mark.parametrize("fn", ["bptt", "autodiff_bptt", "loss"])
def test_float16_loss_sums_in_float32(fn):
  """ℓ summed over T·B = 2400 steps is 4× float16's largest value (65504) before the
  ÷B: a float16 sum was inf, though the averaged loss (about 30,000) fits."""
  T, B, O = 600, 4, 4
  p = jaxrnn.init_params(jax.random.key(0), 2, (8,), O, dtype=jnp.float16)
  xs = jax.random.normal(jax.random.key(1), (T, B, 2), jnp.float32)
  ys = 5 * jax.random.normal(jax.random.key(2), (T, B, O), jnp.float32)
  out = getattr(jaxrnn, fn)(p, xs.astype(jnp.float16), ys.astype(jnp.float16))
  value = out if fn == "loss" else out[0]
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p)
  exact = jaxrnn.loss(p32, xs, ys)
  assert value.dtype == jnp.float16 and 6.5e4 < float(exact) * B
  np.testing.assert_allclose(float(value), float(exact), rtol=2e-3)


@pytest.mark.parametrize("bad", [-1, -100, 3, 100])
def test_a_class_index_out_of_range_gives_nan_on_both_sides(bad):
  # Indexing wrapped -1 to the last class: a finite, silently wrong loss (and the
  # manual δo, built from one_hot, disagreed with autodiff there).
  params, xs, _ = make_problem(0, T=5, B=2, D=2, hidden=(4,), O=3)
  targets = jnp.zeros((5, 2), jnp.int32).at[2, 1].set(bad)
  for fn in (jaxrnn.bptt, jaxrnn.autodiff_bptt):
    value, grads = fn(params, xs, targets, loss="xent")
    assert np.isnan(value)
    for leaf in jax.tree.leaves(grads):
      assert np.isnan(leaf).all(), fn.__name__
  assert np.isnan(jaxrnn.loss(params, xs, targets, loss="xent"))
  # A step given no weight is not scored, whatever its target holds.
  weights = jnp.ones((5, 2)).at[2, 1].set(0.0)
  assert_bptt_equals_autodiff(params, xs, targets, "ignored step", loss="xent",
                              loss_weights=weights)
  assert np.isfinite(jaxrnn.bptt(params, xs, targets, loss="xent", loss_weights=weights)[0])
