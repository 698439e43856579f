"""Fused recurrences: one GPU kernel runs a whole forward or reverse loop.

On a GPU, every iteration of an XLA while loop costs kernel launches and the
loop's own bookkeeping, a few µs whatever the work (``rnn.block_loop`` cuts
that by running 16 steps per iteration). Where W_hh is small, a single
Pallas kernel (Triton backend) can instead run all T steps itself: W_hh is
loaded once, the state stays on chip, and each step is one product, one
pointwise update and one row store. Measured on an H100 (T = 10000, N = 8,
H = 32, µs per step, forward / reverse): 1.32 / 1.37 for ``lax.scan`` with 16
steps per iteration, 0.45 / 0.52 fused (docs/performance.md).

The two loops are the plain ones of :mod:`jaxrnn._src.rnn` and
:mod:`jaxrnn._src.bptt`, same layout and same buffers (updated in place
through ``input_output_aliases``)::

    forward, t = 0 .. T-1:        h_t = f(xp_t + b_h + h_{t-1} W_hh)      buf[t]: xp_t -> h_t
    reverse, t = T-1 .. 1:        δh_t = g[t-1] + δz_{t+1} W_hhᵀ
                                  δz_t = δh_t ⊙ f'(z_t)                   buf[t-1]: g -> δz_t

The step's math is the callers' own (``rnn.masked_step`` and the reverse
scan's ``local``), passed in as a function; a kernel adds the loop, the
reads and writes of its buffers, and the product with W_hh it holds.

Only loops without masks (``lengths``, ``resets``) are fused, for float32
and float64 states whose batch N and width H are powers of two (Triton's
blocks), 16 ≤ H ≤ 64 and N·H² ≤ 16·64² (the loop's matrix stays in
registers; at N = 32, H = 128 the fused step was no faster). Where this jax has
no Pallas Triton backend (deprecated in jax 0.11), nothing is fused:
``fused=None`` warns once, ``fused=True`` raises.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
from jax import lax

# Largest N·H² for a fused loop, and the range of H (see the module docstring).
_FUSED_MAX = 16 * 64 * 64
_H_RANGE = (16, 64)
# Smallest N for which the step's product runs on the matrix units (tl.dot
# needs 16 rows); below it, or in float64, it is a multiply-and-sum in registers.
_DOT_MIN_ROWS = 16


def _pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def unfused_reason(n: int, H: int, dtype, masked: bool):
  """Why a loop over [n, H] states can't be fused, or None if it can (static)."""
  if masked:
    return ("the loop has masks (lengths, resets, or the padded steps of a truncation "
            "window)")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
    return f"the states are {jnp.dtype(dtype).name}, not float32 or float64"
  if not (_pow2(n) and _pow2(H)):
    return f"N = {n} and H = {H} must be powers of two"
  if not _H_RANGE[0] <= H <= _H_RANGE[1] or n * H * H > _FUSED_MAX:
    return (f"needs {_H_RANGE[0]} <= H <= {_H_RANGE[1]} and N·H² <= {_FUSED_MAX}; "
            f"got N = {n}, H = {H}")
  return None


def _on_gpu() -> bool:
  return jax.default_backend() == "gpu"


@functools.lru_cache(maxsize=None)
def _triton():
  """Pallas's Triton backend module, or None where this jax has none.

  jax 0.11 deprecates it ("will be removed in a future JAX version"); where it
  is gone, loops stay XLA loops (``fused=None``) or ``fused=True`` says why.
  """
  try:
    from jax.experimental.pallas import triton
  except ImportError:
    return None
  return triton


_NO_TRITON = ("this jax has no Pallas Triton backend (jax.experimental.pallas.triton), "
              "which the GPU kernels are written for")


@functools.lru_cache(maxsize=None)
def _warn_no_triton():
  warnings.warn(f"jaxrnn: {_NO_TRITON}; fused=None runs every loop as an XLA loop "
                "(same values, slower on a GPU). Pass fused=False to silence this.",
                stacklevel=3)


def use_fused(fused, n: int, H: int, dtype, masked: bool = False) -> bool:
  """Whether a loop over [n, H] states runs as one fused kernel (static).

  ``fused``: False never; None where the loop qualifies and JAX runs on a
  GPU with Pallas's Triton backend (without it: a warning, once, and XLA
  loops); True where it qualifies, else a ValueError naming the reason (off
  a GPU the kernel then runs in Pallas's interpreter, for tests).
  """
  if fused is False:
    return False
  reason = unfused_reason(n, H, dtype, masked)
  if reason is None and _on_gpu() and _triton() is None:
    if fused is None:
      _warn_no_triton()
      return False
    reason = _NO_TRITON
  if fused is None:
    return reason is None and _on_gpu()
  if reason is not None:
    raise ValueError(f"fused=True: this loop can't be fused: {reason}. "
                     "Use fused=None to fuse only the loops that qualify.")
  return True


def _precision():
  """The loop products' precision: full float32 where JAX is told so, else the default (TF32)."""
  return (lax.Precision.HIGHEST
          if jax.config.jax_default_matmul_precision in ("float32", "highest")
          else lax.Precision.DEFAULT)


def _times(h, W, precision):
  """``h @ W`` for a step's [N, P] rows, inside a kernel."""
  if h.shape[0] >= _DOT_MIN_ROWS and h.dtype == jnp.float32:
    return jnp.dot(h, W, precision=precision, preferred_element_type=h.dtype)
  return jnp.sum(h[:, :, None] * W[None, :, :], axis=1)


def _call(kernel, out_shape, aliases, *args):
  from jax.experimental import pallas as pl   # imported on first use only
  if not _on_gpu():
    params = dict(interpret=True)
  else:
    params = dict(compiler_params=_triton().CompilerParams(num_warps=4, num_stages=1))
  return pl.pallas_call(kernel, out_shape=out_shape, input_output_aliases=aliases,
                        **params)(*args)


def _forward_kernel(buf_ref, h0_ref, W_ref, b_ref, hs_ref, *, cell, precision):
  W, b = W_ref[...], b_ref[...]
  times_W = lambda h: _times(h, W, precision)

  def step(t, h):
    h = cell(h, buf_ref[t] + b, matmul=times_W)       # h_t from h_{t-1} and xp_t + b_h
    hs_ref[t] = h                                     # buf[t]: xp_t -> h_t
    return h

  lax.fori_loop(0, buf_ref.shape[0], step, h0_ref[...])


def forward_loop(cell, W_hh, xproj, h_start, b_h=None):
  """:func:`rnn.scan_layer_inplace` without masks, as one kernel.

  Args:
    cell: ``cell(h_{t-1}, xp_t + b_h, matmul=...) -> h_t`` [N, H], with
      ``matmul(h) = h @ W_hh`` given by the kernel (``rnn.masked_step``).
    W_hh: [H, H]. xproj: [T, N, H] input projections, overwritten by the
      states. h_start: [N, H]. b_h: [H] or None.

  Returns:
    hs: [T, N, H], in the buffer of ``xproj``.
  """
  b = jnp.zeros_like(h_start[:1]) if b_h is None else b_h[None, :].astype(xproj.dtype)
  kernel = functools.partial(_forward_kernel, cell=cell, precision=_precision())
  return _call(kernel, jax.ShapeDtypeStruct(xproj.shape, xproj.dtype), {0: 0},
               xproj, h_start, W_hh, b)


def _reverse_kernel(hs_ref, buf_ref, W_T_ref, dh_end_ref, Z_ref, dh_next_ref, *, delta,
                    precision):
  W_T, T = W_T_ref[...], hs_ref.shape[0]

  def step(i, dh_next):
    s = T - 2 - i                                     # slot s = t - 1 of step t = T-1-i
    g_t = buf_ref[s]                                  # ∂ℓ/∂h_t
    dz = delta(hs_ref[s + 1], g_t, dh_next)           # δz_t from h_t, ∂ℓ/∂h_t and the T-delta
    Z_ref[s] = dz                                     # slot t-1: ∂ℓ/∂h_t -> δz_t
    return _times(dz, W_T, precision)                 # T-delta δz_t W_hhᵀ to step t-1

  dh_next_ref[...] = lax.fori_loop(0, T - 1, step, dh_end_ref[...])


def reverse_loop(delta, W_hh, hs, g, dh_end):
  """The reverse loop of ``bptt._reverse_scan`` (steps T-1 .. 1) without masks, as one kernel.

  Args:
    delta: ``delta(h_t, ∂ℓ/∂h_t, δz_{t+1} W_hhᵀ) -> δz_t`` [N, H] (the
      reverse scan's ``local``).
    W_hh: [H, H]. hs: [T, N, H] states. g: [T, N, H], ``g[t-1] = ∂ℓ/∂h_t``,
      overwritten. dh_end: [N, H] T-delta from after the last step.

  Returns:
    ``(Z, dh_1)``: Z [T, N, H] in the buffer of ``g`` (``Z[t-1] = δz_t`` for
    t ≥ 1, ``Z[T-1] = g[T-1]``), and the T-delta ``δz_1 W_hhᵀ`` for step 0
    (``dh_end`` if T = 1).
  """
  kernel = functools.partial(_reverse_kernel, delta=delta, precision=_precision())
  out = (jax.ShapeDtypeStruct(g.shape, g.dtype), jax.ShapeDtypeStruct(dh_end.shape, g.dtype))
  return _call(kernel, out, {1: 0}, hs, g, W_hh.T, dh_end)
