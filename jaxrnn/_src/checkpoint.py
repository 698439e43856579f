"""Memory-efficient hand-written BPTT: store the state every k steps, recompute the rest.

``bptt(..., checkpoint_every=k)`` runs the forward pass segment by segment
(k steps, all layers; where k does not divide T, a last segment of
``T mod k`` steps) and keeps only the state at each segment's start:
``ceil(T / k)`` states per layer instead of T. The backward pass walks the
segments from last to first; for each one it recomputes the segment's states
from its checkpoint, computes the segment's loss terms, and runs the same
delta recursion as :func:`jaxrnn.bptt`, with the T-delta carried across the
segment boundary (Gruslys et al. 2016, "Memory-efficient backpropagation
through time"; Chen et al. 2016). Memory: O((T/k + k) B H L) instead of
O(T B H L); time: one more forward pass.

With truncation, every chunk's window is an independent backward problem:
the start states of all windows are recorded during one checkpointed forward
pass, then a scan over chunks runs the checkpointed backward on each window.
"""


import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrnn._src import checks, sharding, windows
from jaxrnn._src.bptt import (ManualResult, _loss_and_output_grad, backward_layers,
                              readout_backward)
from jaxrnn._src.params import RNNParams
from jaxrnn._src.rnn import LoopPlan, forward_layers, readout


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _steps(arrays, start, size):
  """Steps [start, start + size) of each per-step array [T, ...] (None stays None).

  A dynamic slice: the segments of a checkpointed pass read their steps from
  the caller's arrays, so nothing of size T is copied or padded.
  """
  return tuple(None if a is None else lax.dynamic_slice_in_dim(a, start, size, 0)
               for a in arrays)


def window_backward(params, xs, valid, reset, targets, weights, h_start, h_reset, k, loss,
                    batch, unit_weights=False, plan=LoopPlan()):
  """Checkpointed loss and gradients over one window of W steps.

  The window is ``W // k`` segments of k steps, then the last ``W mod k``
  steps as a segment of their own (its start state is the first pass's
  final carry). No step is masked that the caller did not mask (a masked
  loop can't run as one kernel).

  Args:
    xs [W, N, D]; valid/reset [W, N] bool or None; targets/weights per step;
    h_start, h_reset: tuples of [N, H_l]; k: segment length, 1 <= k <= W;
    batch: the B the loss is averaged over; unit_weights: static, every
    weight is 1; plan: how the loops inside each segment run (``rnn.LoopPlan``).

  Returns:
    ``(loss, layer grads, readout grads, dL/dh_start, dL/dh_reset or None)``.
  """
  W = xs.shape[0]
  S, r = divmod(W, k)                  # S segments of k steps, then one of r
  plan = plan._replace(steps=W)        # products chosen for the window, not the segment
  per_step = (xs, valid, reset, targets, None if unit_weights else weights)

  def forward_body(h, s):
    x, v, rs = _steps(per_step[:3], s * k, k)
    h_end = forward_layers(params, x, h, v, rs, h_reset, inplace=True, final_only=True,
                           plan=plan)
    return h_end, h                    # keep the state at the segment's start

  h_last, starts = lax.scan(forward_body, h_start, jnp.arange(S))

  def segment_backward(carry, h0_seg, start, size):
    dh_next, g_layers, g_readout, d_reset = carry
    x, v, rs, y, w = _steps(per_step, start, size)
    hs = forward_layers(params, x, h0_seg, v, rs, h_reset, inplace=True, plan=plan)  # recompute
    w = jnp.ones(x.shape[:2], x.dtype) if unit_weights else w
    value, d_out = _loss_and_output_grad(readout(params, hs[-1]), y, w, loss, batch,
                                         unit_weights)
    scale = 1.0 / batch if unit_weights else None
    g, g0, d_ro = readout_backward(params, hs[-1], d_out, scale=scale, W_hy_grad=False)
    # ΔW_hy is formed with the layers' weight gradients: one product per segment
    back = backward_layers(params, x, hs, h0_seg, g, g0, v, rs, h_reset, dh_end=dh_next,
                           d_out=None if d_ro is None else d_out, fuse=True, plan=plan)
    if d_ro is not None:
      d_ro = d_ro._replace(W_hy=back.W_hy if scale is None else back.W_hy * scale)
    if reset is not None:
      d_reset = _add(d_reset, back.dh_reset)
    return (back.dh_start, _add(g_layers, back.layers),
            g_readout if d_ro is None else _add(g_readout, d_ro), d_reset), value

  zero = lambda t: jax.tree.map(lambda a: sharding.zeros_varying_like(a, xs), t)
  zero_layers = tuple(zero(l) for l in params.layers)
  zero_readout = None if params.readout is None else zero(params.readout)
  zeros_h = tuple(jnp.zeros_like(h) for h in h_start)
  init = (zeros_h, zero_layers, zero_readout, zeros_h if reset is not None else None)
  total = jnp.zeros((), xs.dtype)
  if r:                                # the last r steps, first on the way back
    init, total = segment_backward(init, h_last, S * k, r)
  carry, values = lax.scan(lambda c, inp: segment_backward(c, inp[1], inp[0] * k, k),
                           init, (jnp.arange(S), starts), reverse=True)
  dh_start, g_layers, g_readout, d_reset = carry
  return total + jnp.sum(values), g_layers, g_readout, dh_start, d_reset


def checkpointed_bptt(params, inp: checks.Inputs, loss: str, k: int,
                      plan: LoopPlan = LoopPlan()) -> ManualResult:
  """Same result as :func:`jaxrnn._src.bptt.manual_bptt`, in O((T/k + k) B H) memory."""
  T, B = inp.xs.shape[:2]
  h_reset = inp.h0 if inp.h_reset is None else inp.h_reset
  reach_h0 = inp.h_reset is None
  if inp.truncation is None:
    value, g_layers, g_readout, dh_start, d_reset = window_backward(
        params, inp.xs, inp.valid, inp.reset, inp.targets, inp.weights, inp.h0, h_reset,
        min(k, T), loss, B, inp.unit_weights, plan)
    dh0 = dh_start if d_reset is None or not reach_h0 else _add(dh_start, d_reset)
    return ManualResult(value, RNNParams(g_layers, g_readout, params.activation), dh0,
                        (None,) * len(params.layers), None)
  return _truncated(params, inp, loss, k, h_reset, reach_h0, plan)


def _window_starts(params, inp, win, k, h_reset, plan):
  """States before each chunk's window, from one checkpointed forward pass.

  Returns a tuple of [C, N, H_l]: ``h_{s_c - 1}`` (h0 where the window
  reaches step 0).
  """
  T = inp.xs.shape[0]
  k = min(k, T)
  S, r = divmod(T, k)                                # S segments of k steps, then r more
  need = np.maximum(win.steps[:, 0] - 1, -1)        # step whose state starts window c
  seg_of, pos = need // k, need % k                  # -1 -> h0, handled below
  per_seg = [np.flatnonzero(seg_of == s) for s in range(S + (r > 0))]
  m = max(1, max(len(c) for c in per_seg))
  gather = np.zeros((len(per_seg), m), np.int32)    # positions inside each segment
  for s, cs in enumerate(per_seg):
    gather[s, :len(cs)] = pos[cs]

  def run(h, start, size, idx):
    """Steps [start, start + size) from state h: the last state and those at ``idx``."""
    x, v, rs = _steps((inp.xs, inp.valid, inp.reset), start, size)
    hs = forward_layers(params, x, h, v, rs, h_reset, inplace=True,
                        plan=plan._replace(steps=T))
    return tuple(s[-1] for s in hs), tuple(s[idx] for s in hs)   # [m, N, H] per layer

  h, picked = lax.scan(lambda h, inp_s: run(h, inp_s[0] * k, k, inp_s[1]), inp.h0,
                       (jnp.arange(S), jnp.asarray(gather[:S])))
  if r:                                              # the last r steps, unpadded
    _, last = run(h, S * k, r, jnp.asarray(gather[S]))
    picked = tuple(jnp.concatenate([p, q[None]]) for p, q in zip(picked, last))
  flat_index = np.zeros(len(need), np.int32)
  for s, cs in enumerate(per_seg):
    flat_index[cs] = s * m + np.arange(len(cs))
  starts = []
  for p, h0 in zip(picked, inp.h0):
    p = p.reshape((-1,) + p.shape[2:])[flat_index]                 # [C, N, H]
    starts.append(jnp.where(jnp.asarray(need < 0)[:, None, None], h0[None], p))
  return tuple(starts)


def _truncated(params, inp, loss, k, h_reset, reach_h0, plan):
  T, B = inp.xs.shape[:2]
  win = windows.make_windows(T, inp.truncation)
  W = win.steps.shape[1]
  starts = _window_starts(params, inp, win, k, h_reset, plan)
  # Every window is one slice of W steps of the inputs, unpadded (windows.unpadded)
  first, own = windows.unpadded(win)
  first, own = jnp.asarray(first), jnp.asarray(own, inp.weights.dtype)
  from_start = jnp.asarray(win.from_start)

  def body(carry, c):
    total, g_layers, g_readout, dh0 = carry
    xs, valid, reset, targets, weights = _steps(
        (inp.xs, inp.valid, inp.reset, inp.targets, inp.weights), first[c], W)
    value, gl, gr, d_start, d_reset = window_backward(
        params, xs, valid, reset, targets, weights * own[c][:, None],
        tuple(s[c] for s in starts), h_reset, min(k, W), loss, B, plan=plan)
    d = tuple(jnp.where(from_start[c], s, 0) for s in d_start)  # cut windows: constant start
    if d_reset is not None and reach_h0:
      d = _add(d, d_reset)
    return (total + value, _add(g_layers, gl), None if gr is None else _add(g_readout, gr),
            _add(dh0, d)), None

  zero = lambda t: jax.tree.map(lambda a: sharding.zeros_varying_like(a, inp.xs), t)
  init = (zero(jnp.zeros((), inp.xs.dtype)), zero(params.layers), zero(params.readout),
          zero(inp.h0))
  (value, g_layers, g_readout, dh0), _ = lax.scan(body, init, jnp.arange(win.steps.shape[0]))
  return ManualResult(value, RNNParams(g_layers, g_readout, params.activation), dh0,
                      (None,) * len(params.layers), None)
