"""Streaming truncated BPTT: train on an endless stream, one chunk of tau_b steps at a time.

Each call of the step sees the next ``tau_b`` steps of the stream. It
backpropagates that chunk's losses through the last ``tau_max`` steps (the
chunk plus the ``P = tau_max - tau_b`` steps before it, kept in the carried
state), updates the parameters with optax, and carries the hidden state on.
Memory is constant: the carry holds P inputs and two states, whatever the
stream's length::

    window of this call:  [ P kept steps | tau_b new steps ]   (losses: new steps only)
    state carried:        h_start = state before the window, h = state after it

The window is re-run from ``h_start`` with the current parameters, so the
gradient of a call is exactly ``jaxrnn.bptt`` on that window (with zero loss
weight on the kept steps). With fixed parameters the calls' gradients sum to
``jaxrnn.bptt(stream, tau_max=tau_max, tau_b=tau_b)`` on the whole stream.
"""

import functools
from typing import Any, Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrnn._src import checks, sharding
from jaxrnn._src.autodiff import full_loss
from jaxrnn._src.bptt import manual_bptt
from jaxrnn._src.params import RNNParams
from jaxrnn._src.rnn import LoopPlan, default_unroll
from jaxrnn._src.train import check_opt_state, check_optimizer, optimizer_update

METHODS = ("manual", "autodiff")


class StreamState(NamedTuple):
  """What the stream carries from one chunk to the next (fixed size)."""
  h: Tuple[jax.Array, ...]        # one [B, H_l] per layer: state after the last step seen
  h_start: Tuple[jax.Array, ...]  # one [B, H_l]: state before the kept steps
  h_init: Tuple[jax.Array, ...]   # one [B, H_l]: the state a reset restores
  xs_kept: jax.Array              # [P, B, D] inputs of the last P = tau_max - tau_b steps
  resets_kept: jax.Array          # [P, B] bool, their resets (the warm-up reset included)
  kept: jax.Array                 # int32 scalar, how many kept steps are real (<= P)
  steps: jax.Array                # int32 scalar, steps of the stream consumed so far


class TBPTTStream(NamedTuple):
  """``init`` and jitted ``step`` of streaming truncated BPTT (optax style)."""
  # (params, batch_size, h0=None) -> (opt_state, stream state)
  init: Callable[..., Tuple[Any, StreamState]]
  # (params, opt_state, state, xs, targets, resets=None, loss_weights=None)
  #   -> (params, opt_state, state, loss)
  step: Callable[..., Tuple[RNNParams, Any, StreamState, jax.Array]]


def window_grads(params, state: StreamState, xs, targets, *, tau_b, tau_max, loss,
                 method="manual", resets=None, loss_weights=None):
  """Loss and gradient of one chunk over its window; the new StreamState.

  Args:
    params: RNNParams. state: StreamState. xs: [tau_b, B, D] the chunk's
    inputs. targets: [tau_b, B, O] (mse) or [tau_b, B] (xent).
    resets: optional [tau_b, B] bool, see :func:`jaxrnn.forward`; a reset
    restores the stream's initial state.
    loss_weights: optional [tau_b, B] float weight of each step's loss term.

  Returns:
    ``(loss, grads, new_state)``; loss is the chunk's loss (sum over its steps,
    averaged over the batch).
  """
  P = tau_max - tau_b
  B = xs.shape[1]
  if resets is None:
    resets = jnp.zeros(xs.shape[:2], bool)
  # Explicit meshes: every piece of the window split along B as the chunk is
  # (sharding.split_like; no-ops otherwise)
  xs = sharding.split_like(xs, xs)
  split = lambda a: sharding.split_like(a, xs)
  xs_w = jnp.concatenate([split(state.xs_kept), xs.astype(state.xs_kept.dtype)], axis=0)
  # Kept positions that are not yet real (start of the stream) are dropped by
  # a reset at the first real position: the window then starts from h_init.
  # The reset stays with the kept steps, so that the window that first holds
  # exactly P real kept steps (kept + tau_b = P) still resets at position 0:
  # its h_start is a state of the not-yet-real steps.
  pos = jnp.arange(tau_max, dtype=jnp.int32)
  warmup = (pos == P - state.kept) & (state.kept < P)
  resets_w = jnp.concatenate([split(state.resets_kept), split(resets)], axis=0) | warmup[:, None]
  pad = jnp.zeros((P,) + targets.shape[1:], targets.dtype)
  targets_w = jnp.concatenate([split(pad), split(targets)], axis=0)
  dtype = xs_w.dtype
  own = jnp.ones((tau_b, B), dtype) if loss_weights is None else loss_weights.astype(dtype)
  weights = jnp.concatenate([split(jnp.zeros((P, B), dtype)), split(own)], axis=0)
  inp = checks.prepare(params, xs_w, targets_w, loss=loss, h0=state.h_start,
                       loss_weights=weights, resets=resets_w)
  h_init = tuple(sharding.split_like(h, xs, axis=0) for h in state.h_init)
  inp = inp._replace(h_reset=h_init)

  def compute(params, inp):
    if method == "manual":
      res = manual_bptt(params, inp, loss, plan=LoopPlan(unroll=default_unroll(), fused=None))
      value, grads, hs = res.loss, res.grads, res.hs
    else:
      (value, hs), grads = jax.value_and_grad(full_loss, has_aux=True)(
          params, inp.h0, inp, loss)
    # the next window starts tau_b steps later
    return value, grads, (tuple(h[-1] for h in hs), tuple(h[tau_b - 1] for h in hs))

  value, grads, (h_last, h_start) = sharding.data_parallel(
      compute, params, inp, per_example_axis=0, per_example_grads=False)
  new_state = StreamState(
      h=h_last,
      h_start=h_start,
      h_init=h_init,                      # as given (split as the chunk is)
      xs_kept=xs_w[tau_b:],
      resets_kept=resets_w[tau_b:],
      kept=jnp.minimum(state.kept + tau_b, P).astype(jnp.int32),
      steps=state.steps + tau_b)
  return value, grads, new_state


def make_tbptt_stream(optimizer: optax.GradientTransformation, *, tau_b: int,
                      tau_max: Optional[int] = None, loss: str = "mse",
                      method: str = "manual") -> TBPTTStream:
  """Streaming truncated BPTT with an optax optimizer: BPTT(tau_max; tau_b).

  Every call of ``step`` consumes the next ``tau_b`` steps of the stream,
  backpropagates their losses through the last ``tau_max`` steps and applies
  one optax update (Williams & Peng 1990; ``tau_b = tau_max`` is classic
  truncated BPTT as in character-level language models). The step is jitted
  once and its memory does not grow with the stream's length. It donates
  nothing, so the arrays passed in stay valid; to let XLA reuse their buffers
  for the results, wrap it: ``jax.jit(stream.step, donate_argnums=(0, 1, 2))``.

  Args:
    optimizer: any ``optax.GradientTransformation``; one that reads the
      objective gets the chunk's loss and gradient and its window's loss as
      a function of params, as for :func:`jaxrnn.make_train_step`.
    tau_b: steps per chunk (one update per chunk).
    tau_max: steps the gradient reaches back (>= tau_b); None: tau_b.
    loss: ``"mse"`` or ``"xent"``.
    method: ``"manual"`` (``jaxrnn.bptt``'s reverse scans) or ``"autodiff"``.

  Returns:
    ``TBPTTStream(init, step)``:

    * ``init(params, batch_size, h0=None) -> (opt_state, state)``;
    * ``step(params, opt_state, state, xs, targets, resets=None, loss_weights=None)
      -> (params, opt_state, state, loss)`` with xs [tau_b, B, D], targets
      [tau_b, B, O] (mse) / [tau_b, B] (xent), resets [tau_b, B] bool (where
      True the state is reset to the stream's initial state: document
      boundaries), loss_weights [tau_b, B] float. A stream has no end, so
      ``lengths`` does not apply; mark padding with zero loss weights.
      Each chunk is checked at trace time as :func:`jaxrnn.bptt` checks its
      inputs, and the state against the params and the chunk's batch size
      (ValueError/TypeError naming the argument and the shapes).

  Example:
    >>> stream = jaxrnn.make_tbptt_stream(optax.adam(1e-3), tau_b=25, loss="xent")
    >>> opt_state, state = stream.init(params, batch_size=8)
    >>> for xs, ys in chunks:                      # xs [25, 8, D], ys [25, 8]
    ...   params, opt_state, state, loss = stream.step(params, opt_state, state, xs, ys)
  """
  tau_b = checks.check_int("tau_b", tau_b)
  tau_max = tau_b if tau_max is None else checks.check_int("tau_max", tau_max, or_none=True)
  checks.check_truncation(tau_max, tau_b, tau_max + 1)
  checks.check_static_options(loss, many_to_one=False)
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
  check_optimizer(optimizer)
  P = tau_max - tau_b

  def init(params, batch_size: int, h0=None):
    checks.check_params(params)
    batch_size = checks.check_int("batch_size", batch_size)
    dtype = checks.param_dtype(params)
    D = checks.input_size(params)
    if h0 is None:
      h0 = tuple(jnp.zeros((batch_size, h), dtype) for h in checks.hidden_sizes(params))
    else:  # shapes checked by prepare on a dummy input
      h0 = checks.prepare(params, jnp.zeros((1, batch_size, D), dtype), h0=h0).h0
    state = StreamState(h=h0, h_start=h0, h_init=h0,
                        xs_kept=jnp.zeros((P, batch_size, D), dtype),
                        resets_kept=jnp.zeros((P, batch_size), bool),
                        kept=jnp.zeros((), jnp.int32), steps=jnp.zeros((), jnp.int32))
    return optimizer.init(params), state

  def check_chunk(params, state, xs, targets, resets, loss_weights):
    """Trace-time checks of one chunk against the params and the stream's state."""
    xs, targets, resets, loss_weights = checks.as_arrays(
        xs=xs, targets=targets, resets=resets, loss_weights=loss_weights)
    if xs is None or xs.ndim != 3 or xs.shape[0] != tau_b:
      raise ValueError(f"xs must have shape [tau_b, B, D] with tau_b = {tau_b}; "
                       f"got {None if xs is None else xs.shape}.")
    # the chunk alone, as bptt would see it: names the argument on any mismatch
    checks.prepare(params, xs, targets, loss=loss, loss_weights=loss_weights, resets=resets)
    if not isinstance(state, StreamState):
      raise TypeError(f"state must be the StreamState of this stream's init; "
                      f"got {type(state).__name__}.")
    _, B, D = xs.shape
    hs = tuple((B, h) for h in checks.hidden_sizes(params))
    want = StreamState(h=hs, h_start=hs, h_init=hs, xs_kept=(P, B, D), resets_kept=(P, B),
                       kept=(), steps=())
    got = jax.tree.map(np.shape, state)
    wrong = [f"state.{name} has shape {g}, expected {w}"
             for name, g, w in zip(StreamState._fields, got, want) if g != w]
    if wrong:
      raise ValueError(f"state does not fit this stream (tau_max - tau_b = {P}), params and "
                       f"chunk (B = {B}): {'; '.join(wrong)}. Make it with this stream's "
                       f"init(params, batch_size).")
    return xs, targets, resets, loss_weights

  @checks.jit_checked
  def step(params, opt_state, state, xs, targets, resets=None, loss_weights=None):
    xs, targets, resets, loss_weights = check_chunk(params, state, xs, targets, resets,
                                                    loss_weights)
    check_opt_state(optimizer, params, opt_state)
    window = functools.partial(window_grads, state=state, xs=xs, targets=targets,
                               tau_b=tau_b, tau_max=tau_max, loss=loss, method=method,
                               resets=resets, loss_weights=loss_weights)
    value, grads, state = window(params)
    with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
      updates, opt_state = optimizer_update(optimizer, grads, opt_state, params, value=value,
                                            grad=grads,
                                            loss_and_grads=lambda p: window(p)[:2])
      params = optax.apply_updates(params, updates)
    return params, opt_state, state, value

  return TBPTTStream(init, step)
