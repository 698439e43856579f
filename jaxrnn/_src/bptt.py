"""Hand-written backpropagation through time: forward scan, then reverse scans.

No ``jax.grad``, ``vjp``, ``jvp``, ``linear_transpose`` or ``custom_vjp`` is
used here: every derivative is written out.

Delta recursion (row vectors; ``δh`` is the total derivative ∂L/∂h)::

    δh^l_t = ∂ℓ/∂h^l_t  [from the readout, top layer only]
           + δz^{l+1}_t W_xh^{l+1}ᵀ    S-delta: from the layer above, same step
           + δz^l_{t+1} W_hh^lᵀ        T-delta: from the same layer, next step
    δz^l_t = δh^l_t ⊙ f'(z^l_t)
    ΔW_xh^l = Σ_t h^{l-1}_tᵀ δz^l_t     ΔW_hh^l = Σ_t h^l_{t-1}ᵀ δz^l_t
    Δb_h^l  = Σ_t δz^l_t                ∂L/∂h^l_{-1} = δz^l_0 W_hh^lᵀ

The stack is differentiated layer by layer, top first: one reverse loop per
layer carries only the T-delta, and everything that does not recur (weight
gradients, S-deltas) is one matrix product over all steps after the loop.

Memory layout: the loop overwrites its incoming gradient in place, one slot
early (slot t-1 holds ∂ℓ/∂h_t on the way in and δz_t on the way out), so the
result ``Z[s] = δz_{s+1}`` lines up with the stored states ``h_s`` and
``ΔW_hh = Σ_t h_{t-1}ᵀ δz_t = hsᵀ Z`` needs no shifted copy of a [T, B, H]
array. The price is one shifted copy of the layer's input for ΔW_xh
([T, B, D] at layer 1) and of δo for the readout ([T, B, O]). Those copies
and the S-delta to the layer below are made only after the last products
that read the states, δo or Z whose memory they can then take (see
``_after``; from 4 MiB of states per layer), so that the peak is every
layer's states, one [T, B, H] gradient buffer and δo.
"""

import functools
from typing import List, Literal, NamedTuple, Optional, Sequence, Tuple, Union, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jaxrnn._src import checks, kernels, sharding, windows
from jaxrnn._src.activations import get_activation
from jaxrnn._src.params import LayerParams, Readout, RNNParams, States
from jaxrnn._src.rnn import (LoopPlan, at_step, class_check, default_unroll, forward_layers,
                             log_softmax, p_minus_onehot, read_block, readout, set_step,
                             weighted_total, write_block, xent_terms)


# What bptt and autodiff_bptt return: (loss, grads), or (loss, grads, dh0) with return_dh0.
GradResult = Union[Tuple[jax.Array, RNNParams], Tuple[jax.Array, RNNParams, States]]


class _Backward(NamedTuple):
  layers: Tuple[LayerParams, ...]        # weight gradients of every layer
  dh_start: Tuple[jax.Array, ...]        # [N, H_l] ∂L/∂(state before the first step)
  dh_reset: Tuple[Optional[jax.Array], ...]  # [N, H_l] ∂L/∂h0 through resets (or None)
  deltas: Tuple[Optional[jax.Array], ...]    # [T, N, H_l] δh for every step (or None)
  W_hy: Optional[jax.Array] = None       # [H_L, O] Σ_t h^L_tᵀ δo_t, if δo was passed in


def _reverse_scan(W_hh, fprime, hs, g, g0, valid, reset, keep_deltas, dh_end=None,
                  plan=LoopPlan()):
  """Delta recursion through time for one layer, a reverse loop carrying only δ.

  Everything is one step "shifted": slot t-1 of ``g`` holds ∂ℓ/∂h_t, and the
  loop overwrites it in place with δz_t. On return ``Z[s] = δz_{s+1}`` lines
  up with ``h_s``, so the recurrent gradient ``Σ_t h_{t-1}ᵀ δz_t`` is ``hsᵀ Z``,
  one matrix product with no shifted copies of [T, N, H] arrays. Step 0 is
  peeled off the loop.

  Args:
    W_hh: [H, H]. fprime: f'(z) as a function of h (None: f' = 1).
    hs: [T, N, H] states h_t. valid/reset: [T, N] bool or None.
    g: [T, N, H], ``g[t-1] = ∂L/∂h_t`` from outside this layer's recurrence
      (readout or the layer above) for t ≥ 1, and ``g[T-1] = 0``.
    g0: [N, H] the same for step 0.
    dh_end: [N, H] T-delta arriving from the step after the last (None:
      zero), for segment-by-segment backward passes.
    plan: how the loop runs (``rnn.LoopPlan``): one kernel (not with
      ``keep_deltas``), or ``plan.unroll`` steps per iteration (``plan.blocks``),
      each reading its block of g, h and masks at once and writing its δz at once.

  Returns:
    Z [T, N, H] (``Z[t-1] = δz_t``, ``Z[T-1] = 0``; the buffer of ``g``);
    δz_0 [N, H]; δ for the state before step 0 [N, H]; ∂L/∂h0 through resets
    [N, H] (or None); δh [T, N, H] (or None).
  """
  T = hs.shape[0]
  one_kernel = not keep_deltas and plan.fuses(hs, valid, reset)
  # With N = 1, XLA copies a [T, 1, H] loop buffer at every step instead of
  # updating it in place (measured: 20x slower), so the single sequence runs
  # on [T, H] buffers and [H] vectors.
  squeeze = hs.shape[1] == 1 and not one_kernel
  flat = (lambda a: None if a is None else a[:, 0]) if squeeze else (lambda a: a)
  col = (lambda m: m) if squeeze else (lambda m: m[:, None])   # a mask against [.., H]
  hs_, valid_, reset_ = flat(hs), flat(valid), flat(reset)
  times_W_hh_T = plan.matmul(W_hh.T, hs.shape[1], T)
  read_back = plan.small_product(W_hh.T, hs.shape[1], T)

  def local(h_t, v_t, g_t, dh_next):
    dh = g_t + dh_next                             # δh_t = ∂ℓ/∂h_t + T-delta from t+1
    dz = dh if fprime is None else dh * fprime(h_t)  # δz_t = δh_t ⊙ f'(z_t)
    if v_t is not None:
      dz = jnp.where(col(v_t), dz, 0)              # frozen (padded) step: no z
    return dh, dz

  def back(v_t, r_t, dh, dz, dh_reset):
    d_prev = times_W_hh_T(dz)                      # T-delta: δz_t W_hhᵀ to the state read
    if r_t is not None:
      dh_reset = dh_reset + jnp.where(col(r_t), d_prev, 0)  # a reset step read h0 ...
      d_prev = jnp.where(col(r_t), 0, d_prev)      # ... so nothing crosses the reset
    if v_t is not None:
      d_prev = jnp.where(col(v_t), d_prev, dh)     # frozen step: h_t = h_{t-1}
    return d_prev, dh_reset

  def block(s0, size, carry):
    """Steps t = s0 + size, ..., s0 + 1 (slots s = t - 1), last first."""
    dh_next, dh_reset, buf, deltas = carry
    g_b = read_block(buf, s0, size)                # slot t-1: ∂ℓ/∂h_t
    h_b, v_b, r_b = (read_block(a, s0 + 1, size) for a in (hs_, valid_, reset_))
    dzs, dhs = [None] * size, [None] * size
    for j in reversed(range(size)):
      v_t, r_t = (None if a is None else a[j] for a in (v_b, r_b))
      dh, dz = local(h_b[j], v_t, g_b[j], dh_next)
      if size == 1:
        buf = set_step(buf, dz, s0)                # slot t-1: ∂ℓ/∂h_t -> δz_t
        # A matrix-vector product reads δz_t back from the buffer: otherwise
        # XLA fuses δz_t's computation into both the store and the product's
        # operand, the store then reads the slot it overwrites, and XLA copies
        # the whole buffer at every step (200x slower). The library product
        # needs no read (which costs it 2-5%).
        dz = at_step(buf, s0) if read_back else dz
      dzs[j], dhs[j] = dz, dh
      dh_next, dh_reset = back(v_t, r_t, dh, dz, dh_reset)
    if size > 1:
      buf = write_block(buf, jnp.stack(dzs), s0)   # slots -> δz_t, the block at once
    if keep_deltas:
      deltas = write_block(deltas, jnp.stack(dhs), s0 + 1)
    return dh_next, dh_reset, buf, deltas

  zeros = jnp.zeros_like(flat(g)[0])
  init = (zeros if dh_end is None else flat(dh_end[None])[0], None if reset is None else zeros,
          flat(g), jnp.zeros_like(flat(g)) if keep_deltas else None)
  if one_kernel:   # no masks, no δh: only the T-delta and Z come out
    delta = lambda h_t, g_t, dh_next: local(h_t, None, g_t, dh_next)[1]   # δz_t
    Z, dh_next = kernels.reverse_loop(delta, W_hh, hs, g, init[0])
    dh_reset = deltas = None
  else:
    dh_next, dh_reset, Z, deltas = plan.blocks(T - 1, hs.shape[2], block, init, reverse=True)
  v_0, r_0 = (None if a is None else a[0] for a in (valid_, reset_))
  dh, dz0 = local(hs_[0], v_0, flat(g0[None])[0], dh_next)
  d_start, dh_reset = back(v_0, r_0, dh, dz0, dh_reset)
  if keep_deltas:
    deltas = set_step(deltas, dh, 0)
  if squeeze:
    Z, dz0, d_start = Z[:, None], dz0[None], d_start[None]
    dh_reset = None if dh_reset is None else dh_reset[None]
    deltas = None if deltas is None else deltas[:, None]
  return Z, dz0, d_start, dh_reset, deltas


def backward_layers(params, xs, hs, h_start, g, g0, valid=None, reset=None, h_reset=None,
                    keep_deltas=False, dh_end=None, d_out=None, fuse=False,
                    plan=LoopPlan()) -> _Backward:
  """Backpropagates ∂L/∂h^L through all layers and steps (top layer first).

  Args:
    params: RNNParams. xs: [T, N, D] inputs. hs: tuple of [T, N, H_l] states
    from the forward pass. h_start: tuple of [N, H_l] states before step 0.
    g, g0: ∂L/∂h^L, shifted as :func:`_reverse_scan` takes it ([T, N, H_L]
    with ``g[t-1]`` for step t, and [N, H_L] for step 0; see
    :func:`readout_backward`). valid/reset: [T, N] bool or None. h_reset: tuple of
    [N, H_l], the states resets restore. dh_end: None or a tuple of [N, H_l]
    T-deltas arriving from after the last step (checkpointed segments).
    d_out: None or δo [T, N, O] (unshifted); if given, the readout's
    ``ΔW_hy = Σ_t h^L_tᵀ δo_t`` is formed beside the top layer's gradients and
    returned as ``W_hy``. fuse: see :func:`_weight_grads`. plan: how the
    reverse loops run (``rnn.LoopPlan``).
  """
  fprime = get_activation(params.activation).grad_from_output
  L = len(params.layers)
  # Filled top layer first; reversed at the end.
  grads: List[LayerParams] = []
  d_start: List[jax.Array] = []
  d_reset: List[Optional[jax.Array]] = []
  deltas: List[Optional[jax.Array]] = []
  W_hy = None
  for l in reversed(range(L)):
    layer = params.layers[l]
    # Z[t-1] = δz_t, dz0 = δz_0
    Z, dz0, d_start_l, d_reset_l, deltas_l = _reverse_scan(
        layer.W_hh, fprime, hs[l], g, g0, valid, reset, keep_deltas,
        None if dh_end is None else dh_end[l], plan)
    d_start.append(d_start_l)
    d_reset.append(d_reset_l)
    deltas.append(deltas_l)
    top = l == L - 1
    W_xh, W_hh, W_hy_top = _weight_grads(
        xs if l == 0 else hs[l - 1], hs[l], h_start[l], Z, dz0, reset,
        None if reset is None else h_reset[l], d_out if top else None, fuse)
    grads.append(LayerParams(W_xh=W_xh, W_hh=W_hh,
                             b_h=Z.sum((0, 1)) + dz0.sum(0)))   # Δb_h = Σ_t δz_t
    if top:
      W_hy = W_hy_top
    if l > 0:   # S-delta to layer l-1, δz_t W_xhᵀ, shifted like Z
      # (once ΔW_xh is formed: Z's last use, so the product can take its memory)
      W_xh = _after(layer.W_xh, grads[-1].W_xh) if _order_for_memory(Z) else layer.W_xh
      g, g0 = jnp.einsum("tnh,dh->tnd", Z, W_xh), dz0 @ layer.W_xh.T
  return _Backward(tuple(grads[::-1]), tuple(d_start[::-1]), tuple(d_reset[::-1]),
                   tuple(deltas[::-1]), W_hy)


# Largest (H + D)·(H + O) for which _weight_grads(fuse=True) forms one product.
# Measured on a 2-core CPU, summed over 800 rows: [32 | 8]ᵀ[32 | 8] takes 73 µs
# against 97 µs for the three products apart; from (128 + 128)² on, the
# unused D×O block costs more than the calls it saves.
_FUSE_MAX = 128 * 128


def _weight_grads(h_below, h, h_start, Z, dz0, reset, h_reset, d_out=None, fuse=False):
  """``ΔW_xh = Σ_t h^{l-1}_tᵀ δz_t``, ``ΔW_hh = Σ_t h_{t-1}ᵀ δz_t`` and ``Σ_t h_tᵀ δo_t``.

  Args:
    h_below: [T, N, D] the layer's input. h: [T, N, H] its states; h_start
      [N, H] the state before step 0. Z, dz0: from :func:`_reverse_scan`
      (``Z[s] = δz_{s+1}``). reset/h_reset: see :func:`_recurrent_grad`.
    d_out: None or [T, N, O] δo (top layer): the third gradient is formed too.
    fuse: form all of them as the blocks of one product
      ``[h_s | h^{l-1}_{s+1}]ᵀ [Z_s | δo_s] = [[ΔW_hh, ΔW_hy], [ΔW_xh, unused]]``
      where it is small (``_FUSE_MAX``) and there are no resets. For the
      checkpointed segments, where every product is a library call with a
      fixed cost inside a sequential loop over segments.

  Returns:
    ``(ΔW_xh [D, H], ΔW_hh [H, H], ΔW_hy [H, O] or None)``.
  """
  H, D = h.shape[-1], h_below.shape[-1]
  O = 0 if d_out is None else d_out.shape[-1]
  if fuse and reset is None and (H + D) * (H + O) <= _FUSE_MAX:
    x_next = _next_steps(h_below, after=Z)         # h^{l-1}_{s+1} lines up with Z[s]
    rhs = Z if d_out is None else jnp.concatenate([Z, d_out], axis=-1)
    m = _sum_outer(jnp.concatenate([h, x_next], axis=-1), rhs)
    W_xh, W_hh = m[H:, :H], m[:H, :H] + h_start.T @ dz0
    W_hy = None if d_out is None else m[:H, H:]
  else:   # ΔW_hh first: h can die before the shifted copy of h_below is made
    W_hh = _recurrent_grad(h, h_start, Z, dz0, reset, h_reset)
    W_hy = None if d_out is None else _readout_grad(h, d_out)
    last = (W_hh,) if W_hy is None else (W_hh, W_hy)    # the products that read h
    x_next = _next_steps(h_below, after=Z, wait=last if _order_for_memory(h) else None)
    W_xh = _sum_outer(x_next, Z)
  return W_xh + h_below[0].T @ dz0, W_hh, W_hy


# Ordering the backward pass for memory (see _after) serialises products that
# XLA would otherwise run side by side, which pays while they are small and
# leave the second core idle. Measured on a 2-core CPU: at T = 100, B = 32,
# H = 128 (1.6 MB of states per layer) the ordering cost 5-8% of the time; at
# 6.5 MB (three layers of H = 256) and above it saved memory and time.
_ORDER_MIN_BYTES = 4 << 20


def _order_for_memory(h):
  """Whether to order for memory, from a layer's [T, N, H] states (static)."""
  return h.size * h.dtype.itemsize >= _ORDER_MIN_BYTES


def _after(x, dep, front=None):
  """``x`` unchanged, computed only once ``dep`` (an array or a tuple) is.

  A scheduling constraint. XLA on CPU expands optimization barriers before it
  schedules, so the order is set by a data dependence: a dynamic slice of
  ``[front, x]`` (``front``: an array of x's shape, x itself by default) whose
  start, max(n, 0 or 1, ...), is clamped to n whatever ``dep`` holds (NaN
  included). If x is a constant, ``front`` must not be, or XLA folds the
  slice. For small ``x`` (it is copied).
  """
  n = x.shape[0]
  k = n
  for d in dep if isinstance(dep, tuple) else (dep,):
    k = jnp.maximum(k, (d.reshape(-1)[0] != 0).astype(jnp.int32))
  return lax.dynamic_slice_in_dim(jnp.concatenate([x if front is None else front, x]), k, n)


def _next_steps(a, after=None, wait=None):
  """``[T, ...] -> [T, ...]``: ``a[s + 1]`` at position s, zero at T-1 (the shifted layout).

  ``after``: an output Z of :func:`_reverse_scan`, whose last slot is exactly
  zero; taking the zero pad from it makes the copy wait for the scan, so that
  XLA does not schedule it first and keep it alive (in memory) all along.
  ``wait``: arrays the copy waits for as well (see :func:`_after`), such as
  the last products that read an array whose memory the copy can then reuse.
  """
  pad = jnp.zeros_like(a[:1])
  if after is not None:
    pad = jnp.broadcast_to(after[-1:, :, :1], pad.shape).astype(a.dtype)
  return jnp.concatenate([a[1:], pad if wait is None else _after(pad, wait, a[:1])], axis=0)


def _sum_outer(a, b):
  """``Σ_t a_tᵀ b_t`` for [T, N, P] and [T, N, Q]: one [P, T·N] @ [T·N, Q] product."""
  return a.reshape(-1, a.shape[-1]).T @ b.reshape(-1, b.shape[-1])


_TINY_READOUT = 4096   # T·N·H·O; 100x the largest size that crashed (see _readout_grad)


def _readout_grad(h, d_out):
  """``ΔW_hy = Σ_t h_tᵀ δo_t`` [H, O], formed as ``(δoᵀ h)ᵀ`` from a transposed copy of δo.

  XLA on CPU hands a product to its fast library only when the left operand
  contracts over its last, contiguous axis; ``hᵀ δo`` over [T·N, ·] rows runs
  in Eigen's slower transposed-operand kernel. δo is narrow (O columns), so a
  transposed [O, T·N] copy is cheap, and the product from it was 1.15-1.7x
  faster than ``hᵀ δo`` at every size of the benchmark grid, copy included.
  (The same for ``ΔW_xh`` from a transposed shifted copy of the layer input
  was 1.0-1.5x slower.) The barriers keep XLA from folding the transposes
  back into the product.

  Tiny products (T·N·H·O below ``_TINY_READOUT``) are formed plainly: there
  the trick gains nothing, and under ``jax.vmap`` XLA:CPU (jaxlib 0.10.2)
  gave the batched product a transposed output layout that its own dot
  emitter then rejected, aborting the process (``Check failed:
  LayoutUtil::IsMonotonicWithDim0Major``; seen for T·N·H·O <= 40).
  """
  if h.size * d_out.shape[-1] < _TINY_READOUT:
    return _sum_outer(h, d_out)
  d_T = lax.optimization_barrier(d_out.reshape(-1, d_out.shape[-1]).T)    # [O, T·N]
  return lax.optimization_barrier(d_T @ h.reshape(-1, h.shape[-1])).T     # [H, O]


def _recurrent_grad(hs, h_start, Z, dz0, reset, h_reset):
  """``ΔW_hh = Σ_t h_{t-1}ᵀ δz_t = hsᵀ Z + h_startᵀ δz_0``, with ``Z[t-1] = δz_t``.

  A step that was reset read ``h_reset`` instead of ``h_{t-1}``, which is
  corrected for by masking.
  """
  if reset is None:
    return _sum_outer(hs, Z) + h_start.T @ dz0
  r = _next_steps(reset)[:, :, None]                 # reset of step s + 1: lines up with Z
  r0 = reset[0][:, None]
  dz_reset = jnp.where(r, Z, 0).sum(0) + jnp.where(r0, dz0, 0)   # steps that read h_reset
  return (_sum_outer(hs, jnp.where(r, 0, Z)) + h_start.T @ jnp.where(r0, 0, dz0)
          + h_reset.T @ dz_reset)


def _loss_and_output_grad(out, targets, weights, loss, batch, unit_weights=False):
  """Loss value and ∂L/∂o, written out: (o − y)·w/B (mse), (softmax(o) − onehot(y))·w/B (xent).

  With ``unit_weights`` (static: every w is 1) the result is ``(value, B·∂L/∂o)``:
  the caller applies the scalar 1/B to the small products of δo instead, which
  saves XLA two passes over [T, N, O] arrays.
  """
  if loss == "mse":
    d_out = out - targets
    # ½‖o − y‖² as the residual contracted with itself (a reduction, like the
    # square, but XLA before jaxlib 0.10.2 kept the square as one more array)
    terms = 0.5 * jnp.einsum("...o,...o->...", d_out, d_out, precision=lax.Precision.HIGHEST)
  else:
    O = out.shape[-1]
    check = class_check(targets, O, out.dtype)    # 1, or NaN for a class index off [0, O)
    log_probs = log_softmax(out)
    terms = xent_terms(log_probs, targets, check)
    # A row whose index is off range is all "onehot", so that all of it takes the
    # NaN of `check` (one more compare, not one more pass over [T, N, O]).
    onehot = jax.nn.one_hot(targets, O, dtype=bool) | jnp.isnan(check)[..., None]
    d_out = p_minus_onehot(jnp.exp(log_probs), onehot, scale=check)
  value = weighted_total(terms, weights, batch)
  return value, d_out if unit_weights else d_out * (weights / batch)[:, :, None]


def readout_backward(params, h_top, d_out, shifted=True, scale=None, W_hy_grad=True):
  """∂L/∂h^L and the readout gradients from ``δo = ∂L/∂o`` [T, N, O].

  Returns ``(g, g0, readout grads)``. ``shifted``: the layout
  :func:`_reverse_scan` takes, ``g[t-1] = ∂L/∂h^L_t`` [T, N, H_L] with
  ``g[T-1] = 0`` and ``g0 = ∂L/∂h^L_0`` [N, H_L]; shifting δo costs one
  [T, N, O] copy instead of one of a [T, N, H] array. Otherwise ``g[t]`` is
  step t's and ``g0`` is None. ``scale``: a Python float; ``d_out`` is then
  δo / scale, and the scale is applied to W_hy and the readout gradients.
  ``W_hy_grad=False``: the caller forms ΔW_hy (``backward_layers(d_out=...)``)
  and the returned readout gradient has ``W_hy=None``.
  """
  d0 = d_out[0] if shifted else None
  if params.readout is None:
    d_in = _next_steps(d_out) if shifted else d_out
    if scale is not None:
      d_in, d0 = d_in * scale, None if d0 is None else d0 * scale
    return d_in, d0, None
  W_hy = params.readout.W_hy if scale is None else params.readout.W_hy * scale
  d_readout = Readout(W_hy=_readout_grad(h_top, d_out) if W_hy_grad else None,  # ΔW_hy = Σ_t h^Lᵀ δo
                      b_y=d_out.sum((0, 1)))                             # Δb_y = Σ_t δo
  # shifted: δo is copied once ΔW_hy is formed, so that δo can die at once
  d_in = d_out if not shifted else _next_steps(
      d_out, wait=d_readout.W_hy if _order_for_memory(h_top) else None)
  if scale is not None:
    d_readout = jax.tree.map(lambda a: a * scale, d_readout)
  return (jnp.einsum("tbo,ho->tbh", d_in, W_hy),                          # δo W_hyᵀ
          None if d0 is None else d0 @ W_hy.T, d_readout)


class ManualResult(NamedTuple):
  loss: jax.Array
  grads: RNNParams
  dh0: Tuple[jax.Array, ...]              # one [B, H_l] per layer
  deltas: Tuple[Optional[jax.Array], ...]  # one [T, B, H_l] per layer, if asked for
  hs: Optional[Tuple[jax.Array, ...]]     # one [T, B, H_l] per layer: the forward states
  #                                         (None: not kept, in checkpointed mode)


def manual_bptt(params, inp: checks.Inputs, loss: str, keep_deltas: bool = False,
                plan: LoopPlan = LoopPlan()):
  """Loss, gradients, ∂L/∂h0 and (optionally) δh of every layer and step.

  ``plan``: how every time loop runs (``rnn.LoopPlan``).
  """
  T, B = inp.xs.shape[:2]
  h_reset = inp.h0 if inp.h_reset is None else inp.h_reset
  resets_reach_h0 = inp.h_reset is None
  hs = forward_layers(params, inp.xs, inp.h0, inp.valid, inp.reset, h_reset, inplace=True,
                      plan=plan)
  out = readout(params, hs[-1])
  unit = inp.unit_weights
  value, d_out = _loss_and_output_grad(out, inp.targets, inp.weights, loss, B, unit)
  truncation = inp.truncation
  truncated = truncation is not None
  g, g0, d_readout = readout_backward(params, hs[-1], d_out, shifted=not truncated,
                                      scale=1.0 / B if unit else None)

  if not truncated:
    back = backward_layers(params, inp.xs, hs, inp.h0, g, g0, inp.valid, inp.reset, h_reset,
                           keep_deltas, plan=plan)
    dh0 = tuple(s if r is None or not resets_reach_h0 else s + r
                for s, r in zip(back.dh_start, back.dh_reset))
    deltas = back.deltas
  else:
    # Each chunk's losses go back through its own window only; the chunks'
    # windows are stacked along the batch axis and share one reverse scan.
    assert truncation is not None   # for type checkers: truncated
    win = windows.make_windows(T, truncation)
    C = win.steps.shape[0]
    own = windows.chunk_weights(jnp.ones((T, B), g.dtype), win)[:, :, None]  # [W, C·B, 1]
    own_g = windows.gather(g, win, shift=True) * _next_steps(own)   # shifted, per window
    own_g0 = windows.first(g, win) * own[0]
    xs_w, valid_w, reset_w, h_reset_w = windows.window_inputs(
        inp.xs, inp.valid, inp.reset, h_reset, win)
    back = backward_layers(
        params, xs_w,
        tuple(windows.gather(h, win, pad=h_0) for h, h_0 in zip(hs, inp.h0)),
        tuple(windows.start_states(h, h_0, win) for h, h_0 in zip(hs, inp.h0)),
        own_g, own_g0, valid_w, reset_w, h_reset_w, keep_deltas, plan=plan)
    reaches_h0 = jnp.asarray(win.from_start)[:, None, None]  # [C, 1, 1]
    dh0_l = []
    for s, r in zip(back.dh_start, back.dh_reset):
      s = s.reshape((C, B) + s.shape[1:])
      d = jnp.where(reaches_h0, s, 0).sum(0)   # a cut window's start state is a constant
      dh0_l.append(d if r is None or not resets_reach_h0 else d + windows.sum_chunks(r, C))
    dh0 = tuple(dh0_l)
    deltas = tuple(None if d is None else _scatter_windows(d, win, T) for d in back.deltas)
  grads = RNNParams(back.layers, d_readout, params.activation)
  return ManualResult(value, grads, dh0, deltas, hs)


def _scatter_windows(d, win, T):
  """``[W, C * B, H] -> [T, B, H]``: sums window positions back onto their steps."""
  W, C = win.steps.shape[1], win.steps.shape[0]
  d = d.reshape((W, C, -1) + d.shape[2:]).swapaxes(0, 1)   # [C, W, B, H]
  acc = jnp.zeros((T + 1,) + d.shape[2:], d.dtype)
  return acc.at[np.maximum(win.steps + 1, 0)].add(d)[1:]




_OPTIONS = ("loss", "many_to_one", "tau_max", "tau_b", "return_dh0", "checkpoint_every")


@functools.partial(jax.jit, static_argnames=_OPTIONS + ("keep_deltas", "plan"))
def _bptt(params, xs, targets, *, loss, many_to_one, h0, tau_max, tau_b, lengths,
          loss_weights, resets, return_dh0, keep_deltas, checkpoint_every, plan):
  inp = checks.prepare(params, xs, targets, loss=loss, many_to_one=many_to_one, h0=h0,
                       lengths=lengths, loss_weights=loss_weights, resets=resets,
                       tau_max=tau_max, tau_b=tau_b)
  symbolic = checks.symbolic_axes(inp.xs.shape, "TBD")
  if symbolic:
    raise TypeError(f"the hand-written pass needs concrete T and B: it lays out its loops "
                    f"(unroll, fused kernels, memory order) from them at trace time; xs has "
                    f"shape {tuple(inp.xs.shape)}, with symbolic {', '.join(symbolic)}. For "
                    f"shape-polymorphic export use jaxrnn.autodiff_bptt (with truncation, T "
                    f"must be concrete there too).")

  def compute(params, inp):
    if checkpoint_every is None:
      res = manual_bptt(params, inp, loss, keep_deltas, plan)
    else:
      from jaxrnn._src.checkpoint import checkpointed_bptt  # imports this module
      res = checkpointed_bptt(params, inp, loss, checkpoint_every, plan)
    per_example = res.deltas if keep_deltas else res.dh0 if return_dh0 else None
    return res.loss, res.grads, per_example

  value, grads, per_example = sharding.data_parallel(compute, params, inp,
                                                     per_example_axis=1 if keep_deltas else 0)
  if keep_deltas:
    return per_example
  return (value, grads, per_example) if return_dh0 else (value, grads)


@overload
def bptt(params: RNNParams, xs: ArrayLike, targets: ArrayLike, *, loss: str = ...,
         many_to_one: bool = ..., h0: Optional[Sequence[ArrayLike]] = ...,
         tau_max: Optional[int] = ..., tau_b: Optional[int] = ...,
         lengths: Optional[ArrayLike] = ..., loss_weights: Optional[ArrayLike] = ...,
         resets: Optional[ArrayLike] = ..., return_dh0: Literal[False] = ...,
         checkpoint_every: Optional[int] = ..., unroll: Optional[int] = ...,
         fused: Optional[bool] = ...) -> Tuple[jax.Array, RNNParams]: ...
@overload
def bptt(params: RNNParams, xs: ArrayLike, targets: ArrayLike, *, loss: str = ...,
         many_to_one: bool = ..., h0: Optional[Sequence[ArrayLike]] = ...,
         tau_max: Optional[int] = ..., tau_b: Optional[int] = ...,
         lengths: Optional[ArrayLike] = ..., loss_weights: Optional[ArrayLike] = ...,
         resets: Optional[ArrayLike] = ..., return_dh0: Literal[True],
         checkpoint_every: Optional[int] = ..., unroll: Optional[int] = ...,
         fused: Optional[bool] = ...) -> Tuple[jax.Array, RNNParams, States]: ...
@overload
def bptt(params: RNNParams, xs: ArrayLike, targets: ArrayLike, *, loss: str = ...,
         many_to_one: bool = ..., h0: Optional[Sequence[ArrayLike]] = ...,
         tau_max: Optional[int] = ..., tau_b: Optional[int] = ...,
         lengths: Optional[ArrayLike] = ..., loss_weights: Optional[ArrayLike] = ...,
         resets: Optional[ArrayLike] = ..., return_dh0: bool,
         checkpoint_every: Optional[int] = ..., unroll: Optional[int] = ...,
         fused: Optional[bool] = ...) -> GradResult: ...
@checks.params_checked
def bptt(params: RNNParams, xs: ArrayLike, targets: ArrayLike, *, loss: str = "mse",
         many_to_one: bool = False, h0: Optional[Sequence[ArrayLike]] = None,
         tau_max: Optional[int] = None, tau_b: Optional[int] = None,
         lengths: Optional[ArrayLike] = None, loss_weights: Optional[ArrayLike] = None,
         resets: Optional[ArrayLike] = None, return_dh0: bool = False,
         checkpoint_every: Optional[int] = None, unroll: Optional[int] = None,
         fused: Optional[bool] = None) -> GradResult:
  """Loss and gradients by hand-written backpropagation through time.

  ``bptt :: (params, [T,B,D], targets) -> (scalar, grads like params)``.
  A forward loop keeps the post-activations h^l_t; a reverse loop
  per layer runs the delta recursion

  .. math::
     \\delta h^l_t = \\frac{\\partial \\ell}{\\partial h^l_t}
        + \\delta z^{l+1}_t {W^{l+1}_{xh}}^\\top + \\delta z^l_{t+1} {W^l_{hh}}^\\top,
     \\qquad \\delta z^l_t = \\delta h^l_t \\odot f'(z^l_t)

  and the weight gradients are sums over time,
  :math:`\\Delta W_{xh}^l = \\sum_t {h^{l-1}_t}^\\top \\delta z^l_t`,
  :math:`\\Delta W_{hh}^l = \\sum_t {h^l_{t-1}}^\\top \\delta z^l_t`,
  :math:`\\Delta b_h^l = \\sum_t \\delta z^l_t`. Its meaning is that of
  ``jax.value_and_grad(jaxrnn.loss)``; :func:`autodiff_bptt` computes exactly
  that, and the test suite checks the two agree to 1e-10 in float64.

  Truncation (``tau_max``, ``tau_b``): steps are split into chunks of
  ``tau_b``; the losses of a chunk ending at step e backpropagate through
  steps e-tau_max+1..e only (``h_{e-tau_max}`` is a constant). The forward
  pass and the loss value are never truncated. ``tau_max=None``: no
  truncation; ``tau_b=None``: ``tau_b = tau_max`` (classic truncated BPTT).
  Williams & Peng (1990), "An efficient gradient-based algorithm for on-line
  training of recurrent network trajectories".

  A batch split over devices gives the one-device result: under an Explicit
  mesh the pass runs on each device's rows (``sharding.data_parallel``);
  inside ``jax.shard_map`` the weight gradients are summed over the devices,
  as ``jax.grad`` sums them there (README, "Several devices").

  Args:
    params: RNNParams.
    xs: [T, B, D] inputs.
    targets: [T, B, O] (mse) / [T, B] int (xent); [B, O] / [B] if many_to_one.
    loss: ``"mse"`` or ``"xent"`` (static).
    many_to_one: score only each sequence's last valid step (static).
    h0: None (zeros) or a tuple of L arrays [B, H_l].
    tau_max: truncation length, or None (static).
    tau_b: backpropagate every tau_b steps, or None (static).
    lengths: optional [B] int in [1, T], right-padded sequences.
    loss_weights: optional [T, B] float weight of each step's loss term.
    resets: optional [T, B] bool, reset the state to h0 before the step.
    return_dh0: also return ∂L/∂h0 (static).
    checkpoint_every: None, or k: keep the hidden state only every k steps
      and recompute the rest during the backward pass (static). Same
      result; memory O((T/k + k)·B·H·L) instead of O(T·B·H·L) for one more
      forward pass. k ≈ sqrt(T) minimises memory.
    unroll: None, or the number of time steps per iteration of the forward
      and reverse loops (static). Same result; each iteration reads its
      block of inputs at once and writes its block of states or deltas at
      once. None: 1 on CPU, where that is fastest, and 16 on other
      backends, where every loop iteration has a fixed launch cost (on an
      H100, 1.7-3.0x faster than 1; see README, "On a GPU"). Layers of
      width 1 compiled for a CPU run one step per iteration
      (``rnn.LoopPlan.blocks``: blocks of them trip an XLA:CPU bug).
    fused: None, True or False (static): run a loop as one GPU kernel
      (Pallas, Triton backend) that keeps W_hh on chip and does all T steps
      itself. None: on a GPU, each loop that qualifies (no ``lengths`` or
      ``resets``; float32/float64; batch and width powers of two,
      16 <= H <= 64, B·H² <= 16·64²; on an H100 2.5-4x faster per step
      than 16 steps per iteration); other loops and other backends keep
      the XLA loops (also, with a warning, on a GPU whose jax has no Pallas
      Triton backend). True: every loop, or a ValueError saying why one
      can't (off a GPU the kernel runs in Pallas's interpreter: for tests,
      slow). False: never.

  Returns:
    ``(loss, grads)``, with ``grads`` structured like ``params``; or
    ``(loss, grads, dh0)`` with dh0 a tuple of L arrays [B, H_l] when
    ``return_dh0``.

  Example:
    >>> params = jaxrnn.init_params(jax.random.key(0), 3, (16, 8), 2)
    >>> xs = jnp.ones((20, 4, 3)); ys = jnp.zeros((20, 4, 2))
    >>> value, grads = jaxrnn.bptt(params, xs, ys, loss="mse")
  """
  tau_max, tau_b = checks.static_options(xs, loss, many_to_one, tau_max, tau_b)
  return_dh0 = checks.check_bool("return_dh0", return_dh0)
  checkpoint_every = checks.check_int_option("checkpoint_every", checkpoint_every)
  plan = LoopPlan(unroll=default_unroll(checks.check_int_option("unroll", unroll)),
                  fused=checks.check_optional_bool("fused", fused))
  return _bptt(params, xs, targets, loss=loss, many_to_one=many_to_one, h0=h0,
               tau_max=tau_max, tau_b=tau_b, lengths=lengths, loss_weights=loss_weights,
               resets=resets, return_dh0=return_dh0, keep_deltas=False,
               checkpoint_every=checkpoint_every, plan=plan)


@checks.params_checked
def backward_deltas(params: RNNParams, xs: ArrayLike, targets: ArrayLike, *, loss: str = "mse",
                    many_to_one: bool = False, h0: Optional[Sequence[ArrayLike]] = None,
                    tau_max: Optional[int] = None, tau_b: Optional[int] = None,
                    lengths: Optional[ArrayLike] = None, loss_weights: Optional[ArrayLike] = None,
                    resets: Optional[ArrayLike] = None) -> States:
  """The backward deltas δh^l_t = ∂L/∂h^l_t of every layer and step (manual pass).

  ``backward_deltas :: (params, [T,B,D], targets) -> ([T,B,H_1], ..., [T,B,H_L])``.
  The arguments of :func:`bptt` through ``resets``; ``return_dh0``,
  ``checkpoint_every``, ``unroll`` and ``fused`` are not taken (every delta
  is returned, so there is nothing for checkpointing to save). With
  truncation, the delta of a step is the sum over the chunks whose window
  contains it.

  Returns:
    A tuple of L arrays [T, B, H_l].
  """
  tau_max, tau_b = checks.static_options(xs, loss, many_to_one, tau_max, tau_b)
  return _bptt(params, xs, targets, loss=loss, many_to_one=many_to_one, h0=h0,
               tau_max=tau_max, tau_b=tau_b, lengths=lengths, loss_weights=loss_weights,
               resets=resets, return_dh0=False, keep_deltas=True, checkpoint_every=None,
               plan=LoopPlan(unroll=default_unroll()))
