"""Train step and fit loop: method equivalence, clipping, non-finite safety, determinism."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrnn
from helpers import assert_trees_close, call_donating, make_problem, objective_recorder


def _fit(method, params, xs, targets, steps=15, manual_kw=None, **kw):
  opt = optax.adam(0.05)
  step = jaxrnn.make_train_step(opt, method=method, **kw, **(manual_kw or {}))
  return jaxrnn.fit(step, params, opt.init(params), lambda i: dict(xs=xs * (1 + 0.01 * i),
                                                                   targets=targets),
                    steps, log_every=1, progress=False)


@pytest.mark.parametrize("kw", [dict(), dict(tau_max=3, tau_b=2, clip_norm=0.5),
                                dict(loss="xent")])
def test_manual_and_autodiff_trajectories_agree(kw):
  params, xs, targets = make_problem(0, T=7, B=3, hidden=(4, 3), loss=kw.get("loss", "mse"))
  a = _fit("manual", params, xs, targets, **kw)
  b = _fit("autodiff", params, xs, targets, **kw)
  assert_trees_close(a.params, b.params, 1e-9)
  np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-10)
  assert a.history["loss"][-1] < a.history["loss"][0]


def test_checkpointed_and_unrolled_training_follows_the_autodiff_trajectory():
  params, xs, targets = make_problem(3, T=9, B=2, hidden=(4, 3))
  a = _fit("manual", params, xs, targets, tau_max=5, manual_kw=dict(checkpoint_every=2, unroll=4))
  b = _fit("autodiff", params, xs, targets, tau_max=5)
  assert_trees_close(a.params, b.params, 1e-9)
  np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-10)
  # the options reach bptt: fused=True with lengths is refused at trace time
  step = jaxrnn.make_train_step(optax.sgd(0.1), fused=True)
  with pytest.raises(ValueError, match="fused=True: this loop can't be fused"):
    step(params, optax.sgd(0.1).init(params), xs, targets, lengths=jnp.array([3, 9]))


def test_clip_norm_bounds_the_update():
  params, xs, targets = make_problem(1, T=5, B=2, scale=3.0)
  step = jaxrnn.make_train_step(optax.sgd(1.0), clip_norm=1e-3)
  new, _, m = step(params, optax.sgd(1.0).init(params), xs, targets)
  assert float(m.grad_norm) > 1e-3
  moved = optax.tree_utils.tree_norm(jax.tree.map(jnp.subtract, new, params))
  np.testing.assert_allclose(moved, 1e-3, rtol=1e-8)
  # any real number type: NumPy scalars clip the same
  new32, _, _ = jaxrnn.make_train_step(optax.sgd(1.0), clip_norm=np.float32(1e-3))(
      params, optax.sgd(1.0).init(params), xs, targets)
  assert_trees_close(new32, new, 1e-6)


def _follow(step, reference, state, xs, targets, steps):
  """Runs the train step and ``reference(params, opt_state)`` from the same ``state``;
  asserts that they stay together (rtol 1e-10); returns the step's final state."""
  ours = ref = state
  with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
    for _ in range(steps):
      ours = step(*ours, xs, targets)[:2]
      ref = reference(*ref)
  assert_trees_close(ours, ref, 1e-10, atol=1e-13)
  return ours


def _plateau():
  """Adam, then a scale that halves whenever the loss has not improved by 1e3 (never):
  it only works if the step passes the loss to optax."""
  return optax.chain(optax.adam(0.05), optax.contrib.reduce_on_plateau(
      factor=0.5, patience=1, rtol=0.0, atol=1e3))


@pytest.mark.parametrize("make", [optax.lbfgs, lambda: optax.polyak_sgd(max_learning_rate=0.5),
                                  _plateau], ids=["lbfgs", "polyak_sgd", "reduce_on_plateau"])
def test_optimizers_that_read_the_objective_follow_optax_usage(make):
  """optax's optimizers that need the loss (extra arguments value, grad, value_fn) train as
  optax's documented loop does with jax.value_and_grad of jaxrnn.loss (before: a TypeError
  about the missing keyword argument 'value'). The manual method; both methods pass the
  same objective (next tests)."""
  params, xs, targets = make_problem(5, T=6, B=3, hidden=(3,))
  opt = make()
  objective = lambda p: jaxrnn.loss(p, xs, targets)
  step = jaxrnn.make_train_step(opt)

  @jax.jit
  def reference(params, state):
    value, grad = jax.value_and_grad(objective)(params)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=objective)
    return optax.apply_updates(params, updates), state

  ours = _follow(step, reference, (params, opt.init(params)), xs, targets, steps=6)
  assert objective(ours[0]) < objective(params)
  if make is _plateau:  # the scale did come down: the loss reached the optimizer
    assert float(optax.tree_utils.tree_get(ours[1], "scale")) < 0.1


@pytest.mark.parametrize("chained", [False, True])
def test_an_optimizer_that_refuses_extra_arguments_still_trains(chained):
  """An update that takes no **extra_args, which optax's protocol asks for (as
  optax.contrib.sam's): the step calls it without value, grad and value_fn, alone or inside
  a chain."""
  params, xs, targets = make_problem(8, T=5, B=2, hidden=(3,))
  adam = optax.adam(0.1)
  opt = optax.GradientTransformationExtraArgs(
      adam.init, lambda updates, state, params=None: adam.update(updates, state, params))
  if chained:
    opt = optax.chain(optax.clip(1.0), opt)

  @jax.jit
  def reference(params, state):
    updates, state = opt.update(jax.grad(jaxrnn.loss)(params, xs, targets), state, params)
    return optax.apply_updates(params, updates), state

  _follow(jaxrnn.make_train_step(opt), reference, (params, opt.init(params)), xs, targets,
          steps=4)


@pytest.mark.parametrize("method", ["manual", "autodiff"])
def test_the_objective_given_to_the_optimizer_is_the_steps(method):
  """value is the batch loss, grad its gradient before clipping, and value_fn the batch loss
  at other params whose jax.grad is the step's own (truncated) gradient."""
  params, xs, targets = make_problem(6, T=7, B=2, hidden=(3, 2))
  kw = dict(tau_max=3, tau_b=2, resets=jnp.asarray(np.eye(7, 2, -3, bool)),
            loss_weights=jnp.linspace(0.5, 1.5, 14).reshape(7, 2))
  options = dict(method=method, tau_max=3, tau_b=2, clip_norm=1e-3)
  opt, moved = objective_recorder(params)
  _, (value, grad, moved_value, moved_grad), m = jaxrnn.make_train_step(opt, **options)(
      params, opt.init(params), xs, targets, resets=kw["resets"],
      loss_weights=kw["loss_weights"])
  want = jaxrnn.autodiff_bptt(params, xs, targets, **kw)
  np.testing.assert_allclose(value, want[0], rtol=1e-12)
  assert_trees_close(grad, want[1], 1e-10)        # not clipped
  assert float(m.grad_norm) > 1e-2
  want = jaxrnn.autodiff_bptt(moved, xs, targets, **kw)
  np.testing.assert_allclose(moved_value, want[0], rtol=1e-12)
  assert_trees_close(moved_grad, want[1], 1e-10)  # the truncated gradient
  full = jax.grad(jaxrnn.loss)(moved, xs, targets, resets=kw["resets"],
                               loss_weights=kw["loss_weights"])
  assert not np.allclose(moved_grad.layers[0].W_xh, full.layers[0].W_xh)


def _exploding(T=400, dtype=jnp.float32):
  """Identity activation, w_rec = 2, long sequence: 2^400 overflows float32 (and float64)."""
  layer = jaxrnn.LayerParams(jnp.ones((1, 1), dtype), jnp.full((1, 1), 2.0, dtype),
                             jnp.zeros((1,), dtype))
  params = jaxrnn.RNNParams((layer,), None, "identity")
  return params, jnp.ones((T, 1, 1), dtype), jnp.zeros((1, 1), dtype)


@pytest.mark.parametrize("method", ["manual", "autodiff"])
def test_the_step_can_donate_params_and_opt_state(method):
  """As its docstring says: wrapped in a jit that donates params and opt_state, XLA reuses
  every one of their buffers and the step is the same, bit for bit."""
  params, xs, targets = make_problem(2, T=5, B=2, hidden=(3, 2))
  opt = optax.adam(0.1)
  step = jaxrnn.make_train_step(opt, method=method, tau_max=3)
  args = (params, opt.init(params), xs, targets)
  with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
    got, donated = call_donating(step, args, (0, 1))
  jax.tree.map(np.testing.assert_array_equal, got, step(*args))
  assert all(a.is_deleted() for a in jax.tree.leaves(donated))


@pytest.mark.parametrize("method", ["manual", "autodiff"])
def test_non_finite_update_is_skipped(method):
  params, xs, y = _exploding()
  opt = optax.adam(0.1)
  step = jaxrnn.make_train_step(opt, method=method, many_to_one=True)
  state = opt.init(params)
  new, new_state, m = step(params, state, xs, y)
  assert bool(m.skipped) and not np.isfinite(float(m.loss))
  jax.tree.map(np.testing.assert_array_equal, (new, new_state), (params, state))
  # a short, finite sequence is not skipped
  _, _, ok = step(params, state, xs[:5], y)
  assert not bool(ok.skipped)


def test_fit_counts_skips_and_stops_with_a_clear_error():
  params, xs, y = _exploding()
  opt = optax.sgd(0.0)  # parameters stay put, so which batches overflow is fixed
  step = jaxrnn.make_train_step(opt, many_to_one=True)
  # alternate: a finite batch (5 steps), then an overflowing one (400 steps, padded by lengths)
  batches = lambda i: dict(xs=xs, targets=y, lengths=jnp.array([5 if i % 2 else 400]))
  res = jaxrnn.fit(step, params, opt.init(params), batches, 6, progress=False,
                   max_consecutive_skips=2)
  assert res.skipped == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(res.params))
  with pytest.raises(jaxrnn.NonFiniteError, match="3 consecutive steps had a non-finite"):
    jaxrnn.fit(step, params, opt.init(params), lambda i: dict(xs=xs, targets=y), 10,
               progress=False, max_consecutive_skips=3)


def test_fit_is_deterministic():
  params, xs, targets = make_problem(2, T=6, B=2)
  a = _fit("manual", params, xs, targets)
  b = _fit("manual", params, xs, targets)
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  assert a.history == b.history


@pytest.mark.parametrize("kw,words", [
    (dict(method="numeric"), ["method", "'numeric'"]),
    (dict(loss="hinge"), ["loss", "'hinge'"]),
    (dict(clip_norm=-1.0), ["clip_norm", "-1.0"]),
    (dict(tau_max=2, tau_b=4), ["tau_max must be >= tau_b"]),
    (dict(checkpoint_every=0), ["checkpoint_every", ">= 1", "0"]),
    (dict(unroll=2.0), ["unroll", "int", "2.0"]),
    (dict(fused="yes"), ["fused", "'yes'"]),
    (dict(method="autodiff", checkpoint_every=4, unroll=2),
     ["checkpoint_every, unroll apply only to method='manual'", "checkpoint_every=4", "unroll=2"]),
])
def test_bad_train_options(kw, words):
  with pytest.raises(ValueError) as info:
    jaxrnn.make_train_step(optax.sgd(0.1), **kw)
  for w in words:
    assert w in str(info.value)


def test_many_to_one_is_checked_when_the_step_is_made():
  # not at the first call, inside the first batch's trace
  with pytest.raises(TypeError, match="many_to_one must be a bool; got 'yes'"):
    jaxrnn.make_train_step(optax.sgd(0.1), many_to_one="yes")


@pytest.mark.parametrize("make", [jaxrnn.make_train_step,
                                  lambda opt: jaxrnn.make_tbptt_stream(opt, tau_b=2)])
def test_the_optimizer_must_be_an_optax_transformation(make):
  with pytest.raises(TypeError, match=r"got function adam: .* Call it, as in optax.adam\(1e-3\)"):
    make(optax.adam)
  with pytest.raises(TypeError, match="must be an optax GradientTransformation .*got NoneType"):
    make(None)


def test_steps_name_params_that_are_not_an_rnnparams_and_stay_jit_functions():
  # jit refused a dict of the fields (it holds the activation name) about abstract arrays.
  params, xs, targets = make_problem(0, T=3, B=2, D=2, hidden=(4,), O=2)
  sgd = optax.sgd(0.1)
  step = jaxrnn.make_train_step(sgd)
  stream = jaxrnn.make_tbptt_stream(sgd, tau_b=3)
  state = stream.init(params, 2)[1]
  calls = [(step, (sgd.init(params), xs, targets)),
           (stream.step, (sgd.init(params), state, xs, targets)),
           (lambda p, x: jaxrnn.forward(p, x), (xs,))]
  for fn, rest in calls:
    with pytest.raises(TypeError, match=r"params must be an RNNParams .*got dict"):
      fn(params._asdict(), *rest)
  for fn, rest in calls[:2]:     # what a jit function offers is still there
    assert fn.lower(params, *rest).compile().memory_analysis() is not None
    fn(params, *rest)
    assert fn._cache_size() == 1
  assert jaxrnn.forward.lower(params, xs) is not None and "lengths" in jaxrnn.forward.__doc__


def test_an_opt_state_of_another_optimizer_or_model_is_named():
  # optax itself fails inside its update, naming neither argument: an AttributeError
  # on a state field, or a broadcasting error between the two models' shapes.
  params, xs, targets = make_problem(0, T=3, B=2, D=2, hidden=(4,), O=2)
  other = make_problem(0, T=3, B=2, D=2, hidden=(5,), O=2)[0]
  adam = optax.adam(0.1)
  step = jaxrnn.make_train_step(adam)
  stream = jaxrnn.make_tbptt_stream(adam, tau_b=3)
  state = stream.init(params, 2)[1]
  for call in (lambda o: step(params, o, xs, targets),
               lambda o: stream.step(params, o, state, xs, targets)):
    with pytest.raises(ValueError, match=r"opt_state does not have the structure of "
                       r"optimizer.init\(params\): got .*EmptyState.*expected .*ScaleByAdam"):
      call(optax.sgd(0.1).init(params))
    with pytest.raises(ValueError, match=re.escape(
        "opt_state[0].mu.layers[0].W_xh has shape (2, 5); optimizer.init(params) gives (2, 4)")):
      call(adam.init(other))
    call(adam.init(params))


@pytest.mark.parametrize("kw,exc,words", [
    (dict(num_steps=-1), ValueError, ["num_steps", ">= 0", "-1"]),
    (dict(num_steps=2.5), ValueError, ["num_steps", "int", "2.5"]),
    (dict(log_every=0), ValueError, ["log_every", ">= 1", "0"]),
    (dict(checkpoint_every=0), ValueError, ["checkpoint_every", ">= 1", "0"]),
    (dict(max_consecutive_skips=True), ValueError, ["max_consecutive_skips", "True"]),
    (dict(batches=[{}]), TypeError, ["batches", "callable", "list"]),
    # a batch that the step cannot take: named as batches(0), not as Python's step() error
    (dict(batches=lambda i: None), TypeError, ["batches(0) must return a dict", "NoneType"]),
    (dict(batches=lambda i: dict(xs=1.0)), TypeError,
     ["batches(0) returned keys ['xs']: missing ['targets']", "optionally ['h0', 'lengths', "
      "'loss_weights', 'resets']"]),
    (dict(batches=lambda i: dict(xs=1.0, targets=1.0, loss_weight=1.0)), TypeError,
     ["batches(0) returned keys", "unknown ['loss_weight']"]),
])
def test_bad_fit_options(kw, exc, words, tmp_path):
  params, xs, y = make_problem(0, T=3, B=1)
  opt = optax.sgd(0.1)
  args = dict(step=jaxrnn.make_train_step(opt), params=params, opt_state=opt.init(params),
              batches=lambda i: dict(xs=xs, targets=y), num_steps=2, progress=False,
              checkpoint_dir=tmp_path)
  args.update(kw)
  with pytest.raises(exc) as info:
    jaxrnn.fit(**args)
  for w in words:
    assert w in str(info.value)
  assert not list(tmp_path.iterdir())  # raised before any step or checkpoint
