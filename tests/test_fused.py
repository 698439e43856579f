"""Loops fused into one kernel (``bptt(..., fused=True)``): same gradients.

``kernels.forward_loop`` and ``kernels.reverse_loop`` are Pallas kernels that
run a whole loop. On a CPU they run in Pallas's interpreter, which executes
the kernel's own code (its indexing, its in-place buffers, its loop), so these
checks hold the kernels to autodiff here as on a GPU, where they are compiled
by Triton. The rest of the suite runs ``fused=None``: XLA loops on a CPU, and
on a GPU the kernel wherever a loop qualifies.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from helpers import (RTOL, assert_bptt_equals_autodiff, assert_trees_close, make_problem,
                     random_h0)
from jaxrnn._src import kernels, rnn
from jaxrnn._src.activations import get_activation

T, D, O = 8, 3, 3


def _has_kernel(fn, *args, **kw):
  return "pallas_call" in str(jax.make_jaxpr(lambda *a: fn(*a, **kw))(*args))


# (activation, B, hidden, options): every activation; N = 1, small N (a
# multiply-and-sum per step) and N = 16; one and two layers; the options
# whose loops have no masks.
CASES = [
    ("tanh", 4, (16,), dict(h0=True, return_dh0=True)),
    ("sigmoid", 1, (32, 16), dict(loss="xent")),
    ("relu", 16, (16,), dict(many_to_one=True)),
    ("identity", 2, (16,), dict(checkpoint_every=4, h0=True, return_dh0=True)),
    ("tanh", 2, (32,), dict(loss_weights=True)),
]


@pytest.mark.parametrize("activation,batch,hidden,opts", CASES)
def test_fused_equals_autodiff(activation, batch, hidden, opts):
  kw = dict(opts)
  params, xs, targets = make_problem(3, T=T, B=batch, D=D, hidden=hidden, O=O,
                                     activation=activation, loss=kw.get("loss", "mse"),
                                     many_to_one=kw.get("many_to_one", False))
  if kw.pop("h0", False):
    kw["h0"] = random_h0(3, batch, hidden)
  if kw.pop("loss_weights", False):
    kw["loss_weights"] = jnp.asarray(np.random.default_rng(4).random((T, batch)))
  assert _has_kernel(jaxrnn.bptt, params, xs, targets, fused=True, **kw)
  assert_bptt_equals_autodiff(params, xs, targets, f"{activation}, B={batch}", fused=True, **kw)


def test_fused_float32_on_the_matrix_units():
  """N ≥ 16 in float32: the step's product is a dot (tensor cores on a GPU)."""
  params, xs, targets = make_problem(6, T=T, B=16, D=D, hidden=(32,), O=O, dtype=jnp.float32)
  got = jaxrnn.bptt(params, xs, targets, fused=True)
  p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  want = jaxrnn.autodiff_bptt(p64, xs.astype(jnp.float64), targets.astype(jnp.float64))
  assert_trees_close(got, want, RTOL[jnp.float32])


@pytest.mark.parametrize("steps", [1, 5])
def test_kernels_match_the_xla_loops(steps):
  """Both kernels against the loops they replace; the reverse loop leaves slot T-1 alone."""
  rng = np.random.default_rng(steps)
  N, H = 2, 16
  arr = lambda *s: jnp.asarray(rng.normal(size=s))
  W, h0, b, xp, g, dh_end = arr(H, H) / 4, arr(N, H), arr(H), arr(steps, N, H), arr(
      steps, N, H), arr(N, H)
  act = get_activation("tanh")
  hs = kernels.forward_loop(functools.partial(rnn.masked_step, None, act.fn), W, xp, h0, b)
  np.testing.assert_allclose(hs, rnn.scan_layer(W, act.fn, xp + b[None, None, :], h0), rtol=1e-12)

  delta = lambda h_t, g_t, dh_next: (g_t + dh_next) * act.grad_from_output(h_t)
  Z, dh_1 = kernels.reverse_loop(delta, W, hs, g, dh_end)
  dh_next, want = dh_end, np.asarray(g).copy()
  for t in range(steps - 1, 0, -1):
    dz = (g[t - 1] + dh_next) * (1 - hs[t] ** 2)
    want[t - 1], dh_next = dz, dz @ W.T
  np.testing.assert_allclose(Z, want, rtol=1e-12)
  np.testing.assert_allclose(dh_1, dh_next, rtol=1e-12)


def test_checkpointed_first_pass_runs_its_loops_as_kernels():
  """``checkpoint_every``'s first pass (states kept every k steps) fuses too.

  Per layer: the full-storage pass has one forward and one reverse kernel; the
  checkpointed one has a forward kernel in its first pass as well as in the
  recompute. As XLA loops, that first pass was 4x slower on an H100
  (T = 10000, k = 100; docs/performance.md).
  """
  params, xs, targets = make_problem(3, T=T, B=2, D=D, hidden=(16, 16), O=O)
  count = lambda **kw: str(jax.make_jaxpr(
      lambda *a: jaxrnn.bptt(*a, fused=True, **kw))(params, xs, targets)).count("pallas_call")
  assert count() == 2 * 2
  assert count(checkpoint_every=4) == 3 * 2
  # k not dividing T: a last segment of T mod k steps, unmasked, so its loops fuse
  # too (its recompute and reverse loops; its start state is the first pass's end)
  assert count(checkpoint_every=3) == 5 * 2
  for k in (4, 3):
    assert_bptt_equals_autodiff(params, xs, targets, f"checkpointed, k={k}", fused=True,
                                checkpoint_every=k)
  # truncated: windows that would start before step 0 are not padded (no masks) either
  assert_bptt_equals_autodiff(params, xs, targets, "checkpointed, truncated", fused=True,
                              checkpoint_every=2, tau_max=3, tau_b=2)


def test_a_gpu_without_pallas_triton_keeps_xla_loops(monkeypatch):
  """A jax without Pallas's Triton backend (deprecated in jax 0.11), on a GPU:
  ``fused=None`` warns once and keeps the XLA loops, ``fused=True`` says why."""
  params, xs, targets = make_problem(0, T=T, B=4, D=D, hidden=(16,), O=O)
  monkeypatch.setattr(kernels, "_on_gpu", lambda: True)
  assert kernels.use_fused(None, 4, 16, jnp.float32)        # with it: fused
  monkeypatch.setattr(kernels, "_triton", lambda: None)
  kernels._warn_no_triton.cache_clear()
  jax.clear_caches()              # trace anew, and keep no trace made under the patches
  try:
    with pytest.warns(UserWarning, match="no Pallas Triton backend"):
      assert not _has_kernel(jaxrnn.bptt, params, xs, targets)
  finally:
    jax.clear_caches()
    kernels._warn_no_triton.cache_clear()
  with pytest.raises(ValueError, match="no Pallas Triton backend"):
    kernels.use_fused(True, 4, 16, jnp.float32)
  with pytest.raises(ValueError, match="powers of two"):    # the loop's own reason first
    kernels.use_fused(True, 3, 16, jnp.float32)
  assert not kernels.use_fused(False, 4, 16, jnp.float32)


def test_fused_none_keeps_xla_loops_off_the_gpu():
  params, xs, targets = make_problem(0, T=T, B=4, D=D, hidden=(16,), O=O)
  on_gpu = jax.default_backend() == "gpu"
  assert _has_kernel(jaxrnn.bptt, params, xs, targets) == on_gpu
  assert not _has_kernel(jaxrnn.bptt, params, xs, targets, fused=False)


@pytest.mark.parametrize("batch,hidden,kw,match", [
    (4, (16,), dict(lengths=np.array([8, 3, 5, 8])), "masks"),
    (4, (8,), {}, "16 <= H <= 64"),
    (3, (16,), {}, "powers of two"),
    (4, (16, 128), {}, "H = 128"),
    (4, (16,), dict(dtype=jnp.bfloat16), "the states are bfloat16, not float32 or float64"),
])
def test_fused_true_says_why_a_loop_cannot_be_fused(batch, hidden, kw, match):
  kw = dict(kw)
  params, xs, targets = make_problem(0, T=T, B=batch, D=D, hidden=hidden, O=O,
                                     dtype=kw.pop("dtype", jnp.float64))
  with pytest.raises(ValueError, match=f"fused=True.*{match}"):
    jaxrnn.bptt(params, xs, targets, fused=True, **kw)
  jaxrnn.bptt(params, xs, targets, fused=None, **kw)   # the loops that can't, unfused


@pytest.mark.parametrize("bad", [1, "yes", 0.5])
def test_fused_must_be_none_or_a_bool(bad):
  params, xs, targets = make_problem(0, T=4, B=2, D=D, hidden=(3,), O=O)
  with pytest.raises(ValueError, match="fused must be None, True or False"):
    jaxrnn.bptt(params, xs, targets, fused=bad)
