"""Reference gradients by automatic differentiation (``jax.value_and_grad``).

Untruncated, this is ``jax.value_and_grad(jaxrnn.loss)``. Truncated, the loss
is rewritten so that autodiff sees exactly the truncated graph: the forward
states are computed once and ``jax.lax.stop_gradient``-ed, each chunk's window
re-runs the RNN from its (constant) start state, and only that chunk's loss
terms are scored inside it. The windows of all chunks are folded into the
batch axis and run in one scan.
"""

import functools
from typing import Literal, Optional, Sequence, Tuple, overload

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxrnn._src import checks, sharding, windows
from jaxrnn._src.bptt import _OPTIONS, GradResult
from jaxrnn._src.params import RNNParams, States
from jaxrnn._src.rnn import forward_layers, readout, step_losses, weighted_total


def _h_reset(h0, inp):
  return h0 if inp.h_reset is None else inp.h_reset


def full_loss(params, h0, inp: checks.Inputs, loss: str):
  """The loss as a function of (params, h0); also returns the forward states (aux)."""
  hs = forward_layers(params, inp.xs, h0, inp.valid, inp.reset, _h_reset(h0, inp))
  out = readout(params, hs[-1])
  value = weighted_total(step_losses(out, inp.targets, loss), inp.weights, inp.xs.shape[1])
  return value, hs


def _truncated_loss(params, h0, inp: checks.Inputs, loss: str):
  T, B = inp.xs.shape[:2]
  assert inp.truncation is not None, "the untruncated loss is full_loss"
  win = windows.make_windows(T, inp.truncation)
  C = win.steps.shape[0]
  # Exact forward states; as window starts they are constants.
  h_reset = _h_reset(h0, inp)
  hs = jax.lax.stop_gradient(
      forward_layers(params, inp.xs, h0, inp.valid, inp.reset, h_reset))
  reaches_h0 = jnp.asarray(win.from_start)[:, None, None]
  starts = tuple(
      jnp.where(reaches_h0, h_0[None],                                     # from step 0: h0
                windows.start_states(h, h_0, win).reshape((C, B, -1))     # else constant
                ).reshape((C * B, -1))
      for h, h_0 in zip(hs, h0))
  xs_w, valid_w, reset_w, h_reset_w = windows.window_inputs(
      inp.xs, inp.valid, inp.reset, h_reset, win)
  hs_w = forward_layers(params, xs_w, starts, valid_w, reset_w, h_reset_w)
  out = readout(params, hs_w[-1])
  targets = windows.gather(inp.targets, win)
  value = weighted_total(step_losses(out, targets, loss),
                         windows.chunk_weights(inp.weights, win), B)
  return value, hs


@overload
def autodiff_bptt(params: RNNParams, xs: ArrayLike, targets: ArrayLike, *, loss: str = ...,
                  many_to_one: bool = ..., h0: Optional[Sequence[ArrayLike]] = ...,
                  tau_max: Optional[int] = ..., tau_b: Optional[int] = ...,
                  lengths: Optional[ArrayLike] = ..., loss_weights: Optional[ArrayLike] = ...,
                  resets: Optional[ArrayLike] = ...,
                  return_dh0: Literal[False] = ...) -> Tuple[jax.Array, RNNParams]: ...
@overload
def autodiff_bptt(params: RNNParams, xs: ArrayLike, targets: ArrayLike, *, loss: str = ...,
                  many_to_one: bool = ..., h0: Optional[Sequence[ArrayLike]] = ...,
                  tau_max: Optional[int] = ..., tau_b: Optional[int] = ...,
                  lengths: Optional[ArrayLike] = ..., loss_weights: Optional[ArrayLike] = ...,
                  resets: Optional[ArrayLike] = ...,
                  return_dh0: Literal[True]) -> Tuple[jax.Array, RNNParams, States]: ...
@overload
def autodiff_bptt(params: RNNParams, xs: ArrayLike, targets: ArrayLike, *, loss: str = ...,
                  many_to_one: bool = ..., h0: Optional[Sequence[ArrayLike]] = ...,
                  tau_max: Optional[int] = ..., tau_b: Optional[int] = ...,
                  lengths: Optional[ArrayLike] = ..., loss_weights: Optional[ArrayLike] = ...,
                  resets: Optional[ArrayLike] = ..., return_dh0: bool) -> GradResult: ...
@checks.params_checked
def autodiff_bptt(params: RNNParams, xs: ArrayLike, targets: ArrayLike, *, loss: str = "mse",
                  many_to_one: bool = False, h0: Optional[Sequence[ArrayLike]] = None,
                  tau_max: Optional[int] = None, tau_b: Optional[int] = None,
                  lengths: Optional[ArrayLike] = None, loss_weights: Optional[ArrayLike] = None,
                  resets: Optional[ArrayLike] = None, return_dh0: bool = False) -> GradResult:
  """Loss and gradients by ``jax.value_and_grad``: the reference for :func:`bptt`.

  ``autodiff_bptt :: (params, [T,B,D], targets) -> (scalar, grads like params)``;
  same arguments and return as :func:`bptt`, without its manual-only options
  (``checkpoint_every``, ``unroll``, ``fused``). Without truncation this is
  ``jax.value_and_grad(jaxrnn.loss, argnums=(0, h0))``; with truncation the
  windows are realised with ``jax.lax.stop_gradient`` on the state at each
  window's start (see :mod:`jaxrnn._src.windows`).
  """
  tau_max, tau_b = checks.static_options(xs, loss, many_to_one, tau_max, tau_b)
  return_dh0 = checks.check_bool("return_dh0", return_dh0)
  return _autodiff_bptt(params, xs, targets, loss=loss, many_to_one=many_to_one, h0=h0,
                        tau_max=tau_max, tau_b=tau_b, lengths=lengths,
                        loss_weights=loss_weights, resets=resets, return_dh0=return_dh0)


@functools.partial(jax.jit, static_argnames=_OPTIONS[:-1])  # no checkpoint_every here
def _autodiff_bptt(params, xs, targets, *, loss, many_to_one, h0, tau_max, tau_b, lengths,
                   loss_weights, resets, return_dh0):
  inp = checks.prepare(params, xs, targets, loss=loss, many_to_one=many_to_one, h0=h0,
                       lengths=lengths, loss_weights=loss_weights, resets=resets,
                       tau_max=tau_max, tau_b=tau_b)

  def compute(params, inp):
    fn = full_loss if inp.truncation is None else _truncated_loss
    (value, _), (grads, dh0) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
        params, inp.h0, inp, loss)
    return value, grads, dh0 if return_dh0 else None

  value, grads, dh0 = sharding.data_parallel(compute, params, inp, per_example_axis=0)
  return (value, grads, dh0) if return_dh0 else (value, grads)
