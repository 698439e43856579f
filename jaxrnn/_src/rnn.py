"""Forward pass of a stacked Elman RNN and the training loss.

Notation (row vectors, time-major ``[T, B, ...]`` arrays)::

    z^l_t = h^{l-1}_t W_xh^l + h^l_{t-1} W_hh^l + b_h^l      (h^0_t = x_t)
    h^l_t = f(z^l_t)
    o_t   = h^L_t W_hy + b_y            (o_t = h^L_t without a readout)

The stack is evaluated layer by layer: each layer's input projection
``h^{l-1} W_xh + b_h`` is one matrix product over all T steps, and the
``lax.scan`` over time carries only ``h`` and does one ``[B, H] @ [H, H]``
product per step.

Masks (all optional): a step where ``valid`` is False keeps the previous
state (``h_t = h_{t-1}``), a step where ``reset`` is True reads the initial
state instead of ``h_{t-1}``.
"""

import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike
import numpy as np

from jaxrnn._src import checks, kernels
from jaxrnn._src.activations import get_activation
from jaxrnn._src.params import LayerParams, RNNParams, States


def elman_step(layer: LayerParams, h: jax.Array, x: jax.Array, *,
               activation: str = "tanh") -> Tuple[jax.Array, jax.Array]:
  """One step of one Elman layer, shaped for ``lax.scan``.

  .. math:: h_t = f(x_t W_{xh} + h_{t-1} W_{hh} + b_h)

  Args:
    layer: LayerParams with W_xh [D, H], W_hh [H, H], b_h [H].
    h: [B, H] previous state h_{t-1}.
    x: [B, D] input x_t.
    activation: name of f.
    (``h`` and ``x`` must be floating; they are cast to the layer's dtype.)

  Returns:
    ``(h_t, h_t)``: the new carry and the step's output, both [B, H].

  Raises:
    ValueError/TypeError at trace time, naming the argument, when the shapes
    do not fit together or ``activation`` is unknown.
  """
  f = get_activation(activation).fn
  if not isinstance(layer, LayerParams):
    raise TypeError(f"layer must be a LayerParams (one of params.layers); "
                    f"got {type(layer).__name__}.")
  h, x = checks.as_arrays(h=h, x=x)   # nested lists too (of tracers, under jit)
  D, H = np.shape(layer.W_xh)
  B = np.shape(h)[0] if np.ndim(h) == 2 else None
  if (np.shape(layer.W_hh), np.shape(layer.b_h)) != ((H, H), (H,)):
    raise ValueError(f"layer must have W_xh [D, H], W_hh [H, H], b_h [H]; got shapes "
                     f"{np.shape(layer.W_xh)}, {np.shape(layer.W_hh)}, {np.shape(layer.b_h)}.")
  if B is None or np.shape(h) != (B, H):
    raise ValueError(f"h must have shape [B, H] with H = {H}; got {np.shape(h)}.")
  if np.shape(x) != (B, D):
    raise ValueError(f"x must have shape [B, D] = {(B, D)}; got {np.shape(x)}.")
  checks.check_floating("h", h)   # then cast to the layer's dtype, as bptt casts xs and h0
  checks.check_floating("x", x)
  dtype = jnp.result_type(layer.W_hh)
  h, x = h.astype(dtype), x.astype(dtype)
  h_new = f(x @ layer.W_xh + h @ layer.W_hh + layer.b_h[None, :])
  return h_new, h_new


def at_step(a, t):
  """``a[t]`` for a loop index ``t >= 0`` (None stays None).

  Loop indices are never negative, so the index normalisation JAX adds by
  default (a select in every loop step) is left out.
  """
  return None if a is None else lax.dynamic_index_in_dim(a, t, keepdims=False,
                                                           allow_negative_indices=False)


def set_step(a, x, t):
  """``a.at[t].set(x)`` for a loop index ``t >= 0``; in place inside a loop."""
  return lax.dynamic_update_index_in_dim(a, x, t, 0, allow_negative_indices=False)


def read_block(a, start, size: int):
  """``a[start : start + size]`` for a loop index ``start >= 0`` (None stays None).

  One step (``size == 1``) is read as :func:`at_step`, so that a loop of one
  step per iteration is the same program as one written with it.
  """
  if a is None:
    return None
  if size == 1:
    return at_step(a, start)[None]
  return lax.dynamic_slice_in_dim(a, start, size, allow_negative_indices=False)


def write_block(a, x, start):
  """``a.at[start : start + len(x)].set(x)`` for ``start >= 0``; in place inside a loop."""
  if x.shape[0] == 1:
    return set_step(a, x[0], start)
  return lax.dynamic_update_slice_in_dim(a, x, start, 0, allow_negative_indices=False)


# Time steps per loop iteration where the caller leaves it open (unroll=None).
# Measured with bptt on the benchmark grid: on a 2-core CPU one step per
# iteration is fastest (2, 4 or 8 made it 1.0-2.2x slower). On an H100 each
# step is a few kernel launches plus the loop's own overhead per iteration;
# blocks of 16 steps (one read and one write of the [16, N, H] block, one
# fused product per step) made it 1.7-3.0x faster (docs/performance.md).
_GPU_UNROLL = 16


def default_unroll(unroll=None) -> int:
  """``unroll``, or where it is None the default of the backend JAX runs on (static)."""
  if unroll is not None:
    return unroll
  return 1 if jax.default_backend() == "cpu" else _GPU_UNROLL


def block_loop(n: int, unroll: int, block, carry, reverse: bool = False):
  """``carry = block(start, size, carry)`` over the steps [0, n), ``unroll`` at a time.

  The ``n % unroll`` steps that make no whole block go first, as one block
  with a static start; then a loop over the ``n // unroll`` whole blocks
  (``size = unroll``). ``block`` handles the steps of its block in order
  (descending if ``reverse``), and the blocks come in order too: forward,
  ``[0, n % unroll)`` first; with ``reverse``, ``[n - n % unroll, n)``
  first and ``[0, unroll)`` last. (A block after the loop, on the loop's
  result, made XLA copy the loop's [T, N, H] buffer.)
  """
  full, rest = divmod(n, unroll)
  if not reverse:
    if rest:
      carry = block(0, rest, carry)
    if full:
      carry = lax.fori_loop(0, full, lambda i, c: block(rest + i * unroll, unroll, c), carry)
    return carry
  if rest:
    carry = block(n - rest, rest, carry)
  if full:
    carry = lax.fori_loop(
        0, full, lambda i, c: block(n - rest - unroll - i * unroll, unroll, c), carry)
  return carry


def masked_step(W_hh, f, h, xp_t, v_t=None, r_t=None, h_reset=None, matmul=None):
  """``h_t`` from ``h_{t-1}`` and the projected input, with the optional masks.

  Args:
    W_hh: [H, H]. f: the activation. h: [N, H] h_{t-1}. xp_t: [N, H] x_t W_xh + b_h.
    v_t, r_t: [N] bool or None (valid step, reset step). h_reset: [N, H].
    matmul: None (``h @ W_hh``) or a function computing it (see :func:`loop_matmul`).
  """
  h_in = h if r_t is None else jnp.where(r_t[:, None], h_reset, h)  # reset -> h0
  z = xp_t + (h_in @ W_hh if matmul is None else matmul(h_in))    # z_t = x_t W_xh + b + h W_hh
  h_new = f(z)                                                    # h_t = f(z_t)
  if v_t is not None:
    h_new = jnp.where(v_t[:, None], h_new, h)                       # padded: frozen
  return h_new


# Largest N·P·Q for which loop_matmul runs a loop step's [N, P] @ [P, Q] as N
# matrix-vector products. XLA:CPU hands an [N, P] @ [P, Q] product with N > 1
# to its matrix library (YNNPACK), whose fixed cost per call is most of a
# small loop step; a batched matrix-vector product against N copies of the
# matrix is emitted by XLA itself and costs about N·P·Q. Per forward-loop step
# on a 2-core CPU (library -> matrix-vector): (N, H) = (2, 32) 0.52 -> 0.23 µs,
# (4, 32) 0.66 -> 0.38, (8, 16) 0.71 -> 0.40, (8, 32) 0.87 -> 0.70; even at
# (16, 32) and (4, 64) (1.36 -> 1.34, 1.10 -> 1.06), slower from (32, 32)
# (2.34 -> 2.53) and (8, 64) (1.77 -> 2.06) on.
_MATVEC_MAX = 8 * 32 * 32


def is_small_product(W, n, T, unroll=1):
  """Whether :func:`loop_matmul` runs ``[n, P] @ W`` as matrix-vector products (static).

  Also needs ``T >= 4 P``: the N copies of W then take at most a quarter of
  the memory of one [T, N, Q] array; and one step per loop iteration
  (``unroll == 1``): with blocks of steps, the reverse loop's store of a
  block of these products' operands made XLA:CPU copy the whole buffer.
  """
  return unroll == 1 and n > 1 and n * W.size <= _MATVEC_MAX and 4 * W.shape[0] <= T


def loop_matmul(W, n, T, unroll=1):
  """``h -> h @ W`` for [n, P] rows inside a loop of T steps, W [P, Q] loop-invariant.

  Small products (:func:`is_small_product`) run as a batched matrix-vector
  product against a copy of W per row, made once outside the loop (n·P·Q
  floats); others as the plain product. Same values.
  """
  if is_small_product(W, n, T, unroll):
    W_rows = jnp.broadcast_to(W, (n,) + W.shape)                 # [n, P, Q]
    return lambda h: jnp.einsum("np,npq->nq", h, W_rows)
  return lambda h: h @ W


class LoopPlan(NamedTuple):
  """How the time loops of the hand-written pass run (static: hashable, a jit key).

  Every choice here changes speed only, never values.

  Attributes:
    unroll: time steps per loop iteration (:func:`block_loop`); see
      :meth:`blocks` for layers of width 1.
    fused: run a loop as one kernel where :func:`kernels.use_fused` says so
      (False: never; None: on a GPU where the loop qualifies; True: always,
      or a ValueError).
    steps: the sequence length :func:`is_small_product` weighs a loop's
      product against (None: the loop's own T; a checkpointed segment passes
      its whole window's).
  """
  unroll: int = 1
  fused: Optional[bool] = False
  steps: Optional[int] = None

  def fuses(self, state, valid=None, reset=None) -> bool:
    """Whether a loop over states like ``state`` [..., N, H], with these masks
    (None: none), runs as one kernel (:func:`kernels.use_fused`)."""
    n, H = state.shape[-2:]
    return kernels.use_fused(self.fused, n, H, state.dtype,
                             valid is not None or reset is not None)

  def small_product(self, W, n: int, T: int) -> bool:
    """:func:`is_small_product` for a loop of T steps."""
    return is_small_product(W, n, self.steps or T, self.unroll)

  def matmul(self, W, n: int, T: int):
    """:func:`loop_matmul` for a loop of T steps."""
    return loop_matmul(W, n, self.steps or T, self.unroll)

  def blocks(self, n: int, H: int, block, carry, reverse: bool = False):
    """:func:`block_loop` over n steps of [N, H] states: ``unroll`` steps per
    iteration, except one for a width-1 layer (H = 1) where XLA:CPU compiles it.

    A width-1 layer's product is a multiplication to XLA:CPU, so a block of
    its steps is one chain of elementwise operations, which XLA fuses into
    the in-place store of the block when the block's start is a constant;
    that fused store then reads steps it has already overwritten
    (openxla/xla#49176; an optimization barrier does not stop it on CPU).
    Seen with ``identity`` and ``relu`` whenever a loop's steps make one
    whole block and a partial block of two or more (T = 9 in blocks of 5,
    6 or 7: losses off by up to 280%). One step per iteration reads and
    writes the same elements only. Wider layers keep their products in the
    matrix library, outside XLA's fusions; none failed in a random search
    of 570 option sets with widths up to 5.

    XLA:GPU compiles the same blocks right (H100: 51 such cases exact with
    this rule switched off, where the CPU got 35 of 53 wrong), and there a
    width-1 layer needs its blocks: one step per iteration made the main
    job's counting network 7.6x slower (0.09 -> 0.68 ms). So the choice is
    the compiler's platform (``lax.platform_dependent``, resolved when the
    program is lowered), not JAX's default backend: a computation placed on
    the CPU of a GPU host gets one step per iteration too.
    """
    run = lambda k: lambda c: block_loop(n, k, block, c, reverse)
    if H != 1 or self.unroll == 1:
      return run(self.unroll)(carry)
    return lax.platform_dependent(carry, cpu=run(1), default=run(self.unroll))


def scan_layer(W_hh, f, xproj, h_start, valid=None, reset=None, h_reset=None):
  """Runs one layer over time from precomputed input projections.

  Args:
    W_hh: [H, H] recurrent weights.
    f: the activation function.
    xproj: [T, N, H] input projections ``h^{l-1}_t W_xh + b_h``.
    h_start: [N, H] state before the first step.
    valid: optional [T, N] bool; False freezes the state.
    reset: optional [T, N] bool; True makes the step read ``h_reset``.
    h_reset: [N, H] the state a reset restores.

  Returns:
    hs: [T, N, H], the state after every step.
  """
  def step(h, inp):
    h_new = masked_step(W_hh, f, h, *inp, h_reset)
    return h_new, h_new

  _, hs = lax.scan(step, h_start, (xproj, valid, reset))
  return hs


def scan_layer_inplace(W_hh, f, xproj, h_start, valid=None, reset=None, h_reset=None,
                       b_h=None, plan=LoopPlan()):
  """:func:`scan_layer` that overwrites its input: step t replaces ``xproj[t]`` by ``h_t``.

  Same values as :func:`scan_layer`, but the projections and the states share
  one [T, N, H] buffer (a while loop updates its carried buffer in place), which
  halves the forward pass's memory. For the hand-written pass only: autodiff
  through a loop that carries a [T, N, H] buffer would store it at every step.
  ``b_h`` [H], if given, is added inside the step (``xproj`` then holds
  ``h^{l-1}_t W_xh`` only), which saves a pass over the [T, N, H] buffer.
  ``plan``: how the loop runs (:class:`LoopPlan`): one kernel, or a loop of
  ``plan.unroll`` steps per iteration (:meth:`LoopPlan.blocks`), each reading
  its block of projections at once and writing its block of states at once.
  """
  if plan.fuses(xproj, valid, reset):
    return kernels.forward_loop(functools.partial(masked_step, None, f), W_hh, xproj,
                                h_start, b_h)
  matmul = plan.matmul(W_hh, h_start.shape[0], xproj.shape[0])

  def block(t0, size, carry):
    h, buf = carry
    xp, v, r = read_block(buf, t0, size), read_block(valid, t0, size), read_block(reset, t0, size)
    out = []
    for j in range(size):
      xp_t = xp[j] if b_h is None else xp[j] + b_h[None, :]
      h = masked_step(W_hh, f, h, xp_t, None if v is None else v[j],
                      None if r is None else r[j], h_reset, matmul)
      out.append(h)
    return h, write_block(buf, jnp.stack(out), t0)     # xproj[t] <- h_t

  return plan.blocks(xproj.shape[0], xproj.shape[2], block, (h_start, xproj))[1]


def project(inp, layer: LayerParams, bias: bool = True):
  """``[T, N, D] -> [T, N, H]``: input projection for all steps at once (``+ b_h`` if ``bias``)."""
  xp = jnp.einsum("tnd,dh->tnh", inp, layer.W_xh)
  return xp + layer.b_h[None, None, :] if bias else xp


def scan_layer_final(W_hh, f, xproj, h_start, valid=None, reset=None, h_reset=None,
                     b_h=None, plan=LoopPlan()):
  """The state after the last step only, ``[N, H]``: :func:`scan_layer_inplace` without its stores.

  For a checkpointed pass that keeps only every k-th state: the loop reads
  ``xproj`` and writes nothing per step. Where ``plan`` runs the loop as one
  kernel, it is :func:`scan_layer_inplace`'s kernel instead, whose stores go
  into ``xproj``'s own buffer: on the H100 an XLA loop pays a few µs per step
  that a kernel does not (10000 steps in segments of 100, B = 8, H = 32:
  23.8 ms as XLA loops, 6.0 ms as kernels).
  """
  if plan.fuses(xproj, valid, reset):
    return scan_layer_inplace(W_hh, f, xproj, h_start, valid, reset, h_reset, b_h, plan)[-1]
  matmul = plan.matmul(W_hh, h_start.shape[0], xproj.shape[0])

  def step(h, inp):
    xp_t, v_t, r_t = inp
    xp_t = xp_t if b_h is None else xp_t + b_h[None, :]
    return masked_step(W_hh, f, h, xp_t, v_t, r_t, h_reset, matmul), None

  return lax.scan(step, h_start, (xproj, valid, reset), unroll=plan.unroll)[0]


def forward_layers(params, xs, h_start, valid=None, reset=None, h_reset=None, inplace=False,
                   final_only=False, plan=LoopPlan()):
  """All layers, bottom up. Returns a tuple of [T, N, H_l] hidden states.

  ``inplace=True`` uses :func:`scan_layer_inplace` (for the hand-written pass),
  whose loops run as ``plan`` says. ``final_only=True`` (with ``inplace``) returns
  only each layer's state after the last step, [N, H_l], and stores no
  states of the top layer.
  """
  f = get_activation(params.activation).fn
  hs, inp = [], xs
  L = len(params.layers)
  for l, layer in enumerate(params.layers):
    h_r = None if h_reset is None else h_reset[l]
    if inplace and final_only and l == L - 1:
      hs.append(scan_layer_final(layer.W_hh, f, project(inp, layer, bias=False), h_start[l],
                                 valid, reset, h_r, layer.b_h, plan))
      break
    if inplace:   # the bias is added inside the loop
      inp = scan_layer_inplace(layer.W_hh, f, project(inp, layer, bias=False), h_start[l],
                               valid, reset, h_r, layer.b_h, plan)
    else:
      inp = scan_layer(layer.W_hh, f, project(inp, layer), h_start[l], valid, reset, h_r)
    hs.append(inp[-1] if final_only else inp)
  return tuple(hs)


def readout(params, h_top):
  """``[T, N, H_L] -> [T, N, O]`` outputs (identity without a readout)."""
  if params.readout is None:
    return h_top
  return jnp.einsum("tnh,ho->tno", h_top, params.readout.W_hy) + params.readout.b_y[None, None, :]


def _top_class(out):
  """``[..., O] -> [..., O]`` bool: one-hot of the largest logit a (the first, on ties)."""
  return jax.nn.one_hot(jnp.argmax(out, axis=-1), out.shape[-1], dtype=bool)


def p_minus_onehot(p, onehot, scale=None):
  """``[..., O] -> [..., O]``: ``p − onehot(c)`` for probabilities p, exact in every entry.

  The entry at c is formed as ``−Σ_{j≠c} p_j``, a sum of small terms, not as
  ``p_c − 1``, which loses it where p_c → 1. ``onehot``: [..., O] bool.
  The softmax-cross-entropy gradient (c the target) and log softmax's
  derivative rule (c the largest logit) both need it. ``scale``: optional
  [...] factor of the entry at c (a row whose onehot is all true becomes it).
  """
  at_c = -jnp.sum(jnp.where(onehot, 0, p), axis=-1, keepdims=True)
  return jnp.where(onehot, at_c if scale is None else at_c * scale[..., None], p)


@jax.custom_jvp
def log_softmax(out):
  """``[..., O] -> [..., O]``: log softmax(o), accurate also where one class takes p → 1.

  ``log p_j = (o_j − o_a) − log1p(s)``, ``s = Σ_{i≠a} exp(o_i − o_a)``, with a
  the largest logit. ``jax.nn.log_softmax`` forms ``log(1 + s)`` instead,
  which loses the small s in float32: at p_a = 1 − 7e-5 its −log p_a and
  p_a − 1 were 4e-4 off in relative terms.

  Its derivative is a rule of its own, ``d log p = do − Σ_j p_j do_j``
  written as ``(do − do_a) − Σ_j q_j do_j`` with ``q = p − onehot(a)``
  (:func:`p_minus_onehot`) and the first term set to 0 at a outright.
  Differentiating the formula above instead forms ``1 − p_a`` as a
  difference of two terms near 1, so ∂(−log p_a)/∂o_a came out 0 where it is
  −s/(1 + s): with s = 1.2e-38 in float64 every gradient of a many-to-one
  loss was wrong in sign (found by a random search against
  :func:`jaxrnn.bptt` and checked against 80-digit arithmetic).
  """
  top = _top_class(out)
  shifted = out - jnp.sum(jnp.where(top, out, 0), axis=-1, keepdims=True)   # o − o_a
  rest = jnp.sum(jnp.where(top, 0, jnp.exp(shifted)), axis=-1, keepdims=True)
  return shifted - jnp.log1p(rest)


@log_softmax.defjvp
def _log_softmax_jvp(primals, tangents):
  (out,), (d_out,) = primals, tangents
  logp = log_softmax(out)
  p = jnp.exp(logp)
  top = _top_class(out)
  q = p_minus_onehot(p, top)
  d_top = jnp.sum(jnp.where(top, d_out, 0), axis=-1, keepdims=True)               # do_a
  # zero at a rather than do_a − do_a: then no gradient sums two terms near 1
  return logp, jnp.where(top, 0, d_out - d_top) - jnp.sum(q * d_out, axis=-1, keepdims=True)


def class_check(targets, num_classes: int, dtype):
  """``[...] -> [...]``: 1 where a class index lies in ``[0, O)``, NaN where it does not.

  Both sides scale a step's cross-entropy term by it (and the manual side its
  δo row, in :mod:`jaxrnn._src.bptt`), so such an index makes the loss and
  every gradient NaN, the same on both sides. Indexing alone would wrap −1 to
  class O − 1: a finite, silently wrong loss (−1 is a common "ignore" label;
  leave a step out with ``loss_weights`` 0 instead).
  """
  inside = (targets >= 0) & (targets < num_classes)
  return jnp.where(inside, 1, jnp.nan).astype(dtype)


def xent_terms(log_probs, targets, check):
  """``[..., O], [...], [...] -> [...]``: −log p[y] · check, each step's cross-entropy term."""
  index = jnp.clip(targets, 0, log_probs.shape[-1] - 1)   # off-range rows: check is NaN
  return -jnp.take_along_axis(log_probs, index[..., None], axis=-1)[..., 0] * check


def step_losses(out, targets, loss: str):
  """Per-step loss terms ``[T, N]``: ½‖o − y‖² (mse) or −log softmax(o)[y] (xent)."""
  if loss == "mse":
    return 0.5 * jnp.sum(jnp.square(out - targets), axis=-1)
  return xent_terms(log_softmax(out), targets, class_check(targets, out.shape[-1], out.dtype))


def weighted_total(terms, weights, batch: int):
  """Σ_t Σ_b w_tb ℓ_tb / B, summed in at least float32.

  A 16-bit sum over T·B terms would round every addition and overflow float16
  (max 65504) long before the averaged loss does.
  """
  acc = checks.at_least_float32(terms.dtype)
  return (jnp.sum(weights * terms, dtype=acc) / batch).astype(terms.dtype)


@checks.jit_checked
def forward(params: RNNParams, xs: ArrayLike, h0: Optional[Sequence[ArrayLike]] = None, *,
            lengths: Optional[ArrayLike] = None,
            resets: Optional[ArrayLike] = None) -> Tuple[States, States, jax.Array]:
  """Runs the RNN over a batch of sequences (``lax.scan`` over time).

  .. math::
     z^l_t = h^{l-1}_t W_{xh}^l + h^l_{t-1} W_{hh}^l + b_h^l,\\quad
     h^l_t = f(z^l_t),\\quad y_t = h^L_t W_{hy} + b_y

  Args:
    params: RNNParams.
    xs: [T, B, D] inputs, time-major.
    h0: None (zeros) or a tuple of L arrays [B, H_l]: the initial state.
    lengths: optional [B] int in [1, T]: sequences are right-padded to T; past
      its length a sequence's state is frozen and its inputs are ignored. A
      length outside [1, T] (a value, which ``jax.jit`` cannot check; see
      :func:`jaxrnn.validate_inputs`) makes its sequence's states and outputs
      NaN, instead of returning h0 or cutting the sequence at T.
    resets: optional [T, B] bool: where True the state is reset to ``h0``
      before the step is computed.

  Returns:
    ``(h_last, hs, ys)``: h_last a tuple of L arrays [B, H_l] (the state after
    step T-1, i.e. at each sequence's length); hs a tuple of L arrays
    [T, B, H_l]; ys [T, B, O] (readout at every step), or hs[-1] without
    a readout.
  """
  inp = checks.prepare(params, xs, None, h0=h0, lengths=lengths, resets=resets)
  hs = forward_layers(params, inp.xs, inp.h0, inp.valid, inp.reset, inp.h0)
  return tuple(h[-1] for h in hs), hs, readout(params, hs[-1])


@checks.params_checked
def loss(params: RNNParams, xs: ArrayLike, targets: ArrayLike, *, loss: str = "mse",
         many_to_one: bool = False, h0: Optional[Sequence[ArrayLike]] = None,
         lengths: Optional[ArrayLike] = None, loss_weights: Optional[ArrayLike] = None,
         resets: Optional[ArrayLike] = None) -> jax.Array:
  """Training loss of the RNN on a batch (a scalar).

  .. math::
     \\mathcal{L} = \\frac{1}{B} \\sum_b \\sum_t w_{tb}\\, \\ell(o_{tb}, y_{tb}),\\quad
     \\ell_{\\rm mse} = \\tfrac12 \\lVert o - y \\rVert^2,\\quad
     \\ell_{\\rm xent} = -\\log \\mathrm{softmax}(o)_y

  The weights ``w`` are 1 on every step (many-to-many), 1 on each sequence's
  last valid step only (``many_to_one``), or ``loss_weights``; steps past a
  sequence's length always weigh 0.

  Args:
    params: RNNParams.
    xs: [T, B, D] inputs.
    targets: [T, B, O] float (mse) or [T, B] int classes (xent); with
      ``many_to_one`` [B, O] / [B].
    loss: ``"mse"`` or ``"xent"``.
    many_to_one: score only the last (valid) step of each sequence.
    h0: None or a tuple of L arrays [B, H_l].
    lengths: optional [B] int, see :func:`forward`.
    loss_weights: optional [T, B] float, a weight on each step's loss term.
    resets: optional [T, B] bool, see :func:`forward`.

  Returns:
    The scalar loss.
  """
  checks.check_static_options(loss, many_to_one)
  return _loss(params, xs, targets, loss=loss, many_to_one=many_to_one, h0=h0,
               lengths=lengths, loss_weights=loss_weights, resets=resets)


@functools.partial(jax.jit, static_argnames=("loss", "many_to_one"))
def _loss(params, xs, targets, *, loss, many_to_one, h0, lengths, loss_weights, resets):
  inp = checks.prepare(params, xs, targets, loss=loss, many_to_one=many_to_one, h0=h0,
                       lengths=lengths, loss_weights=loss_weights, resets=resets)
  hs = forward_layers(params, inp.xs, inp.h0, inp.valid, inp.reset, inp.h0)
  out = readout(params, hs[-1])
  return weighted_total(step_losses(out, inp.targets, loss), inp.weights, inp.xs.shape[1])
