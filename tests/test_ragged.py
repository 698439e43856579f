"""lengths, loss_weights and resets: both gradient paths, and their documented meaning."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from helpers import assert_trees_close, make_problem, random_h0
from test_stream import capture

T, B = 8, 3
LENGTHS = jnp.array([8, 3, 5])
WEIGHTS = jnp.asarray(np.random.default_rng(0).uniform(0, 2, size=(T, B)))
RESETS = jnp.zeros((T, B), bool).at[3, 0].set(True).at[6, 0].set(True).at[2, 2].set(True)

OPTION_SETS = [dict(lengths=LENGTHS), dict(loss_weights=WEIGHTS), dict(resets=RESETS),
               dict(lengths=LENGTHS, loss_weights=WEIGHTS, resets=RESETS)]
TRUNC = [dict(), dict(tau_max=3), dict(tau_max=4, tau_b=2)]


def _cases():
  out = []
  for i, (opts, trunc) in enumerate(itertools.product(OPTION_SETS, TRUNC)):
    hidden, loss = [((4,), "mse"), ((3, 2), "xent")][i % 2]
    many_to_one = (i % 3 == 0) and "loss_weights" not in opts
    out.append((opts, trunc, hidden, loss, many_to_one))
  out.append((OPTION_SETS[3], TRUNC[2], (3, 2), "mse", False))
  out.append((OPTION_SETS[3], TRUNC[0], (4,), "xent", False))
  return out


def _id(c):
  opts, trunc, hidden, loss, m2o = c
  return f"{'+'.join(opts)}-{trunc or 'full'}-{len(hidden)}L-{loss}-{'m2o' if m2o else 'm2m'}"


@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_manual_equals_autodiff_with_options(case):
  opts, trunc, hidden, loss, many_to_one = case
  params, xs, targets = make_problem(len(hidden), T=T, B=B, hidden=hidden, loss=loss,
                                     many_to_one=many_to_one)
  kw = dict(loss=loss, many_to_one=many_to_one, h0=random_h0(0, B, hidden), return_dh0=True,
            **opts, **trunc)
  value, grads, dh0 = jaxrnn.bptt(params, xs, targets, **kw)
  ref_value, ref_grads, ref_dh0 = jaxrnn.autodiff_bptt(params, xs, targets, **kw)
  np.testing.assert_allclose(value, ref_value, rtol=1e-10)
  assert_trees_close(grads, ref_grads, 1e-10, err="grads")
  assert_trees_close(dh0, ref_dh0, 1e-10, err="dh0")


@pytest.mark.parametrize("loss,many_to_one", [("mse", False), ("xent", True)])
def test_padded_batch_equals_sequences_alone(loss, many_to_one):
  hidden = (3, 2)
  params, xs, targets = make_problem(4, T=T, B=B, hidden=hidden, loss=loss)
  h0 = random_h0(4, B, hidden)
  if many_to_one:  # each sequence is scored at its own last valid step
    last = targets[LENGTHS - 1, jnp.arange(B)]
  kw = dict(loss=loss, many_to_one=many_to_one)
  value, grads, dh0 = jaxrnn.bptt(params, xs, last if many_to_one else targets, h0=h0,
                                  lengths=LENGTHS, return_dh0=True, **kw)
  values, parts = [], []
  for b in range(B):
    n = int(LENGTHS[b])
    y = last[b:b + 1] if many_to_one else targets[:n, b:b + 1]
    v, g, d = jaxrnn.bptt(params, xs[:n, b:b + 1], y, h0=tuple(h[b:b + 1] for h in h0),
                          return_dh0=True, **kw)
    values.append(v)
    parts.append(g)
    for l in range(len(hidden)):
      np.testing.assert_allclose(dh0[l][b:b + 1], d[l] / B, rtol=1e-10, atol=1e-14)
  # the batch loss averages the per-sequence losses over B
  np.testing.assert_allclose(value, sum(values) / B, rtol=1e-10)
  assert_trees_close(grads, jax.tree.map(lambda *g: sum(g) / B, *parts), 1e-10)
  # h_last is each sequence's state at its own length
  h_last, hs, _ = jaxrnn.forward(params, xs, h0, lengths=LENGTHS)
  for l in range(len(hidden)):
    np.testing.assert_allclose(h_last[l], hs[l][LENGTHS - 1, jnp.arange(B)], rtol=1e-12)


@pytest.mark.parametrize("fill", [np.nan, 1e30, -7.0])
@pytest.mark.parametrize("fn", [jaxrnn.bptt, jaxrnn.autodiff_bptt])
def test_padding_values_change_nothing(fill, fn):
  params, xs, targets = make_problem(5, T=T, B=B, hidden=(3, 2))
  pad = jnp.arange(T)[:, None] >= LENGTHS[None, :]
  xs_bad = jnp.where(pad[:, :, None], fill, xs)
  targets_bad = jnp.where(pad[:, :, None], fill, targets)
  for kw in (dict(), dict(tau_max=3, tau_b=2)):
    clean = fn(params, xs, targets, lengths=LENGTHS, return_dh0=True, **kw)
    dirty = fn(params, xs_bad, targets_bad, lengths=LENGTHS, return_dh0=True, **kw)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(dirty))
    jax.tree.map(np.testing.assert_array_equal, dirty, clean)


def test_loss_weights_meaning():
  params, xs, targets = make_problem(6, T=T, B=B, hidden=(4,))
  ys = jaxrnn.forward(params, xs)[2]
  want = jnp.sum(WEIGHTS * 0.5 * jnp.sum((ys - targets) ** 2, axis=-1)) / B
  np.testing.assert_allclose(jaxrnn.loss(params, xs, targets, loss_weights=WEIGHTS), want,
                             rtol=1e-12)
  # many_to_one is weight 1 on the last valid step
  one_hot = (jnp.arange(T)[:, None] == (LENGTHS - 1)[None, :]).astype(xs.dtype)
  full = jnp.broadcast_to(targets[LENGTHS - 1, jnp.arange(B)][None], targets.shape)
  a = jaxrnn.bptt(params, xs, targets[LENGTHS - 1, jnp.arange(B)], many_to_one=True,
                  lengths=LENGTHS)
  b = jaxrnn.bptt(params, xs, full, loss_weights=one_hot, lengths=LENGTHS)
  np.testing.assert_allclose(a[0], b[0], rtol=1e-12)
  assert_trees_close(a[1], b[1], 1e-12)


def test_resets_equal_documents_run_separately():
  """Two documents in one stream, with a reset at the second's start."""
  hidden = (3, 2)
  params, xs, targets = make_problem(7, T=T, B=1, hidden=hidden, loss="xent")
  h0 = random_h0(7, 1, hidden)
  resets = jnp.zeros((T, 1), bool).at[5, 0].set(True)
  value, grads, dh0 = jaxrnn.bptt(params, xs, targets, loss="xent", h0=h0, resets=resets,
                                  return_dh0=True)
  a = jaxrnn.bptt(params, xs[:5], targets[:5], loss="xent", h0=h0, return_dh0=True)
  b = jaxrnn.bptt(params, xs[5:], targets[5:], loss="xent", h0=h0, return_dh0=True)
  np.testing.assert_allclose(value, a[0] + b[0], rtol=1e-10)
  assert_trees_close(grads, jax.tree.map(jnp.add, a[1], b[1]), 1e-10)
  assert_trees_close(dh0, jax.tree.map(jnp.add, a[2], b[2]), 1e-10)
  # the forward state after a reset is that of the second document alone
  hs = jaxrnn.forward(params, xs, h0, resets=resets)[1]
  np.testing.assert_allclose(hs[1][5:], jaxrnn.forward(params, xs[5:], h0)[1][1], rtol=1e-12)


def test_stream_with_resets_and_weights_matches_bptt():
  tau_b, tau_max, hidden = 2, 5, (3,)
  params, xs, targets = make_problem(8, T=T, B=B, hidden=hidden)
  stream = jaxrnn.make_tbptt_stream(capture(), tau_b=tau_b, tau_max=tau_max)
  opt_state, state = stream.init(params, B)
  total = None
  with jax.numpy_dtype_promotion("standard"):
    for c in range(T // tau_b):
      sl = slice(c * tau_b, (c + 1) * tau_b)
      params, opt_state, state, _ = stream.step(params, opt_state, state, xs[sl], targets[sl],
                                                RESETS[sl], WEIGHTS[sl])
      total = opt_state if total is None else jax.tree.map(jnp.add, total, opt_state)
  _, want = jaxrnn.bptt(params, xs, targets, resets=RESETS, loss_weights=WEIGHTS,
                        tau_b=tau_b, tau_max=tau_max)
  assert_trees_close(total, want, 1e-10)


def test_traced_lengths_do_not_recompile():
  params, xs, targets = make_problem(9, T=T, B=B)
  f = jax.jit(lambda n, w, r: jaxrnn.bptt(params, xs, targets, lengths=n, loss_weights=w,
                                          resets=r))
  a = f(LENGTHS, WEIGHTS, RESETS)
  b = f(jnp.array([2, 8, 1]), 2 * WEIGHTS, ~RESETS)
  assert f._cache_size() == 1
  assert not np.allclose(a[0], b[0])


@pytest.mark.parametrize("bad", [0, -2, T + 1])
@pytest.mark.parametrize("many_to_one", [False, True])
@pytest.mark.parametrize("extra", [{}, dict(tau_max=3, tau_b=2), dict(checkpoint_every=3)])
def test_a_length_off_one_to_T_gives_nan_on_both_sides(bad, many_to_one, extra):
  # A value, not checkable under jit: it dropped its sequence (0, or any length
  # with many_to_one) or cut it at T, silently. validate_inputs raises on it.
  params, xs, targets = make_problem(9, T=T, B=B, many_to_one=many_to_one)
  lengths = LENGTHS.at[1].set(bad)
  manual, auto = (fn(params, xs, targets, lengths=lengths, many_to_one=many_to_one, **kw)
                  for fn, kw in ((jaxrnn.bptt, extra),
                                 (jaxrnn.autodiff_bptt, {k: v for k, v in extra.items()
                                                         if k != "checkpoint_every"})))
  assert np.isnan(manual[0]) and np.isnan(auto[0])
  assert np.isnan(jaxrnn.loss(params, xs, targets, lengths=lengths, many_to_one=many_to_one))
  # The readout sees every step, so its gradient is NaN throughout. The layers'
  # gradients are NaN too where the sequence ran (a length past T); a length <= 0
  # runs no step of them, so they hold the other sequences' finite sum. Both
  # sides agree entry by entry.
  for name, a, b in zip(("W_xh", "W_hh", "b_h", "W_hy", "b_y"),
                        jax.tree.leaves(manual[1]), jax.tree.leaves(auto[1])):
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
    assert np.isnan(a).all() == (name in ("W_hy", "b_y") or bad > T), name
    np.testing.assert_allclose(np.nan_to_num(a), np.nan_to_num(b), rtol=1e-10, err_msg=name)
  with pytest.raises(ValueError, match=r"lengths must lie in \[1, T\]"):
    jaxrnn.validate_inputs(params, xs, targets, lengths=lengths, many_to_one=many_to_one)


@pytest.mark.parametrize("bad", [0, -2, T + 1])
def test_forward_with_a_length_off_one_to_T_gives_nan_for_that_sequence(bad):
  # forward returned h0 (a length <= 0) or the state at T (a length past T), silently.
  params, xs, _ = make_problem(9, T=T, B=B, hidden=(4, 3))
  got = jaxrnn.forward(params, xs, lengths=LENGTHS.at[1].set(bad), resets=RESETS)
  want = jaxrnn.forward(params, xs, lengths=LENGTHS, resets=RESETS)
  for name, g, w, axis in [("h_last[0]", got[0][0], want[0][0], 0),
                           ("h_last[1]", got[0][1], want[0][1], 0),
                           ("hs[0]", got[1][0], want[1][0], 1), ("hs[1]", got[1][1], want[1][1], 1),
                           ("ys", got[2], want[2], 1)]:
    g, w = np.moveaxis(np.asarray(g), axis, 0), np.moveaxis(np.asarray(w), axis, 0)
    assert np.isnan(g[1]).all(), name
    np.testing.assert_array_equal(g[[0, 2]], w[[0, 2]], err_msg=name)


@pytest.mark.parametrize("kw,exc,words", [
    (dict(lengths=jnp.array([3, 4])), ValueError, ["lengths", "(3,)", "(2,)"]),
    (dict(lengths=jnp.array([3.0, 4.0, 1.0])), TypeError, ["lengths", "integer", "float"]),
    (dict(loss_weights=jnp.ones((T, 2))), ValueError, ["loss_weights", f"({T}, 3)", f"({T}, 2)"]),
    (dict(loss_weights=jnp.ones((T, B), jnp.int32)), TypeError, ["loss_weights", "floating"]),
    (dict(resets=jnp.zeros((T + 1, B), bool)), ValueError, ["resets", f"({T}, 3)"]),
    (dict(resets=jnp.zeros((T, B))), TypeError, ["resets", "bool", "float64"]),
    (dict(loss_weights=WEIGHTS, many_to_one=True), ValueError, ["loss_weights", "many_to_one"]),
])
def test_bad_options(kw, exc, words):
  params, xs, targets = make_problem(0, T=T, B=B)
  if kw.get("many_to_one"):
    targets = targets[-1]
  for fn in (jaxrnn.bptt, jaxrnn.autodiff_bptt, jaxrnn.loss):
    with pytest.raises(exc) as info:
      fn(params, xs, targets, **kw)
    for w in words:
      assert w in str(info.value)


@pytest.mark.parametrize("kw,words", [
    (dict(lengths=jnp.array([0, 3, 4])), ["lengths", "[1, 8]", "lengths[0] = 0"]),
    (dict(lengths=jnp.array([3, 9, 4])), ["lengths", "lengths[1] = 9"]),
    (dict(lengths=jnp.array([3, 9, 4]), _targets=lambda y: None), ["lengths", "lengths[1] = 9"]),
    (dict(loss_weights=-WEIGHTS), ["loss_weights", ">= 0"]),
    (dict(_targets=lambda y: y.at[2, 1, 0].set(jnp.nan)), ["targets", "non-finite", "scored"]),
    (dict(h0=(jnp.full((B, 4), jnp.inf),)), ["h0[0]", "non-finite"]),
    (dict(_params=lambda p: p._replace(layers=(p.layers[0]._replace(
        W_hh=p.layers[0].W_hh.at[0, 0].set(jnp.nan)),))), ["params.layers[0].W_hh", "non-finite"]),
    (dict(checkpoint_every=0), ["checkpoint_every", ">= 1"]),
    (dict(unroll=2.5), ["unroll", "int"]),
])
def test_validate_inputs_checks_values(kw, words):
  params, xs, targets = make_problem(0, T=T, B=B)
  jaxrnn.validate_inputs(params, xs, targets, lengths=LENGTHS, checkpoint_every=3, unroll=2,
                         fused=False, return_dh0=True)  # fine, with every option of bptt
  kw = dict(kw)
  params = kw.pop("_params", lambda p: p)(params)
  targets = kw.pop("_targets", lambda y: y)(targets)
  with pytest.raises(ValueError) as info:
    jaxrnn.validate_inputs(params, xs, targets, **kw)
  for w in words:
    assert w in str(info.value)


def test_validate_inputs_under_jit_says_it_needs_concrete_values():
  # It raised NumPy's TracerArrayConversionError from inside.
  params, xs, targets = make_problem(0, T=T, B=B)
  for traced in ("xs", "lengths"):
    def f(a):
      kw = {**dict(xs=xs, lengths=LENGTHS), traced: a}
      jaxrnn.validate_inputs(params, kw.pop("xs"), targets, **kw)
    with pytest.raises(TypeError) as info:
      jax.jit(f)(xs if traced == "xs" else LENGTHS)
    for w in ("validate_inputs", "concrete", f"{traced} is traced", "outside"):
      assert w in str(info.value), (w, str(info.value))


def test_validate_inputs_ignores_padded_targets_and_names_unknown_options():
  params, xs, targets = make_problem(0, T=T, B=B)
  padded = targets.at[T - 1, 1, 0].set(jnp.nan)  # sequence 1 has length 3 < T
  jaxrnn.validate_inputs(params, xs, padded, lengths=LENGTHS)
  with pytest.raises(TypeError, match=r"unknown option\(s\) \['length'\]"):
    jaxrnn.validate_inputs(params, xs, targets, length=LENGTHS)
