"""Truncation windows: which steps each chunk's losses backpropagate through.

Steps ``0..T-1`` are split into chunks of ``tau_b`` steps (the last may be
shorter). The losses of chunk ``c``, whose last step is ``e_c``, reach back
through steps ``e_c - tau_max + 1 .. e_c`` only; the state
``h_{e_c - tau_max}`` is a constant. Example, T = 10, tau_b = 3, tau_max = 5::

    step     0 1 2 3 4 5 6 7 8 9
    chunk 0  L L L                 window: 0..2 (reaches h0)
    chunk 1  . w w L L L           window: 1..5, h_0 constant
    chunk 2        . w w L L L     window: 4..8, h_3 constant
    chunk 3            . w w w L   window: 5..9, h_4 constant

(L: scored step of the chunk, inside its window; w: window step whose loss
belongs to another chunk; '.': the constant state the window starts from.)

Every chunk's window has the same length ``W = min(tau_max, T)``: a window
that would start before step 0 is left-padded with "frozen" steps (state h0,
nothing computed), so all chunks stack into one ``[W, C * B, ...]`` batch
and one scan serves them all, with no Python loop over chunks.
"""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxrnn._src.checks import Truncation


class Windows(NamedTuple):
  """Static (numpy) index arrays describing the windows of every chunk."""
  steps: np.ndarray       # [C, W] int: step index at each window position (< 0: padding)
  in_chunk: np.ndarray    # [C, W] bool: the position belongs to the chunk (its loss counts)
  from_start: np.ndarray  # [C] bool: the window reaches step 0, so it starts from h0
  padded: bool            # some position has steps < 0


def make_windows(T: int, trunc: Truncation) -> Windows:
  C = -(-T // trunc.tau_b)
  ends = np.minimum((np.arange(C) + 1) * trunc.tau_b, T) - 1
  W = trunc.window
  steps = ends[:, None] - W + 1 + np.arange(W)[None, :]
  in_chunk = steps >= (np.arange(C) * trunc.tau_b)[:, None]
  from_start = ends - W + 1 <= 0
  return Windows(steps, in_chunk, from_start, bool((steps < 0).any()))


def unpadded(win: Windows):
  """The same windows as slices of real steps: ``(first [C] int, own [C, W] bool)``.

  Window c runs steps ``first[c] .. first[c] + W - 1``. One that would start
  before step 0 runs steps 0 .. W-1 from h0 instead (W <= T): the steps it
  adds after its chunk's end are not its own (``own`` False, loss weight 0),
  so they contribute exact zeros, and nothing is padded or masked. ``own``:
  the step belongs to window c's chunk, so its loss counts.
  """
  C, W = win.steps.shape
  first = np.maximum(win.steps[:, 0], 0)
  ran = first[:, None] + np.arange(W)                            # [C, W] steps run
  chunk_first = win.steps[np.arange(C), win.in_chunk.argmax(axis=1)]
  own = (ran >= chunk_first[:, None]) & (ran <= win.steps[:, -1:])
  return first, own


def _extended(a, pad):
  """``[T, B, ...] -> [T + 1, B, ...]``: index t + 1 holds step t, index 0 holds ``pad``."""
  if pad is None:
    pad = jnp.zeros(a.shape[1:], a.dtype)
  return jnp.concatenate([pad[None], a], axis=0)


def gather(a, win: Windows, pad=None, shift=False):
  """``[T, B, ...] -> [W, C * B, ...]``: the window of every chunk, chunks folded into the batch.

  Positions before step 0 take the value ``pad`` ([B, ...]) or zeros.
  ``shift``: position s holds window position s + 1, and the last one zeros
  (the layout of the hand-written reverse scan's input); padding is zeros.
  """
  assert not (shift and pad is not None), "a shifted gather pads with zeros"
  idx = np.maximum(win.steps + 1, 0).T                   # [W, C]
  if shift:
    idx = np.concatenate([idx[1:], np.zeros_like(idx[:1])])
  out = _extended(a, pad)[idx]                           # [W, C, B, ...]
  return out.reshape((out.shape[0], -1) + a.shape[2:])


def first(a, win: Windows):
  """``[T, B, ...] -> [C * B, ...]``: the first position of every chunk's window (zeros if padded)."""
  out = _extended(a, None)[np.maximum(win.steps[:, 0] + 1, 0)]
  return out.reshape((-1,) + a.shape[2:])


def start_states(hs, h0, win: Windows):
  """``[C * B, H]`` state before each window: ``h_{s_c - 1}`` (or h0 from step 0)."""
  idx = np.maximum(win.steps[:, 0], 0)                   # s_c - 1 + 1, clamped to h0
  return _extended(hs, h0)[idx].reshape((-1,) + hs.shape[2:])


def window_mask(valid, win: Windows, B: int):
  """``[W, C * B]`` bool validity inside windows, or None when all steps are real."""
  if valid is None and not win.padded:
    return None
  real = jnp.asarray((win.steps >= 0).T)[:, :, None]     # [W, C, 1]
  if valid is None:
    mask = jnp.broadcast_to(real, real.shape[:2] + (B,))
  else:
    mask = gather(valid, win).reshape(real.shape[:2] + (B,)) & real
  return mask.reshape(mask.shape[0], -1)


def chunk_weights(weights, win: Windows):
  """``[W, C * B]`` loss weights inside windows: only each chunk's own steps count."""
  w = gather(weights, win)
  own = jnp.asarray(win.in_chunk.T, dtype=weights.dtype)  # [W, C]
  B = weights.shape[1]
  return (w.reshape(own.shape + (B,)) * own[:, :, None]).reshape(w.shape)


def tile(x, C: int):
  """``[B, ...] -> [C * B, ...]``."""
  return jnp.broadcast_to(x[None], (C,) + x.shape).reshape((-1,) + x.shape[1:])


def sum_chunks(x, C: int):
  """``[C * B, ...] -> [B, ...]``."""
  return x.reshape((C, -1) + x.shape[1:]).sum(0)


def window_inputs(xs, valid, reset, h_reset, win: Windows):
  """The inputs of every chunk's window, folded into the batch: what both the
  manual and the autodiff truncated paths run on.

  Returns ``(xs [W, C·B, D], valid [W, C·B] or None, reset [W, C·B] or None,
  h_reset: tuple of [C·B, H_l])``.
  """
  B, C = xs.shape[1], win.steps.shape[0]
  return (gather(xs, win), window_mask(valid, win, B),
          None if reset is None else gather(reset, win),
          tuple(tile(h, C) for h in h_reset))
