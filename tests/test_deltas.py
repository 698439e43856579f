"""``backward_deltas``: the manual δh^l_t = ∂L/∂h^l_t against jax.grad of a perturbed loop.

The reference adds a perturbation e^l_t to every state h^l_t of a plain Python
loop over time and layers (``h^l_t = f(z^l_t) + e^l_t``) and takes ``jax.grad``
of the loss with respect to the perturbations at zero: that gradient is ∂L/∂h^l_t
by definition. With truncation it is the sum over chunks of the gradient of the
chunk's losses through a loop whose state is cut (``stop_gradient``) after step
``end - tau_max``, which is what backward_deltas documents.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn
from helpers import assert_trees_close, make_problem, random_h0


@functools.partial(jax.jit, static_argnames=("loss", "many_to_one", "start", "end", "cut"))
def _chunk_loss_grad(params, xs, targets, h0, valid, reset, weights, *, loss, many_to_one,
                     start, end, cut):
  """∂(losses of steps start..end)/∂e at e = 0, the state cut after step ``cut``."""
  f = jaxrnn.ACTIVATIONS[params.activation].fn

  def chunk_loss(eps):
    h, total = list(h0), 0.0
    for t in range(end + 1):
      inp = xs[t]
      for l, layer in enumerate(params.layers):
        prev = jnp.where(reset[t][:, None], h0[l], h[l])             # reset before the step
        new = f(inp @ layer.W_xh + prev @ layer.W_hh + layer.b_h[None])
        h[l] = jnp.where(valid[t][:, None], new, h[l]) + eps[l][t]   # frozen past the length
        inp = h[l]
      if t == cut:
        h = [jax.lax.stop_gradient(x) for x in h]
      if t >= start:
        o = inp if params.readout is None else inp @ params.readout.W_hy + params.readout.b_y[None]
        y = targets if many_to_one else targets[t]
        if loss == "mse":
          ell = 0.5 * jnp.sum((o - y) ** 2, axis=-1)
        else:
          ell = -jnp.take_along_axis(jax.nn.log_softmax(o), y[:, None], axis=1)[:, 0]
        total = total + jnp.sum(weights[t] * ell)
    return total / xs.shape[1]

  return jax.grad(chunk_loss)(tuple(jnp.zeros(xs.shape[:2] + h.shape[1:]) for h in h0))


def _reference_deltas(params, xs, targets, *, loss="mse", many_to_one=False, h0=None,
                      tau_max=None, tau_b=None, lengths=None, loss_weights=None, resets=None):
  T, B = xs.shape[:2]
  if h0 is None:
    h0 = tuple(jnp.zeros((B, l.W_hh.shape[0])) for l in params.layers)
  valid = (jnp.ones((T, B), bool) if lengths is None
           else jnp.arange(T, dtype=jnp.int32)[:, None] < lengths[None])
  reset = jnp.zeros((T, B), bool) if resets is None else resets & valid
  if many_to_one:
    last = jnp.full((B,), T - 1, jnp.int32) if lengths is None else lengths - 1
    weights = (jnp.arange(T, dtype=jnp.int32)[:, None] == last[None]).astype(xs.dtype)
  else:
    weights = valid.astype(xs.dtype) * (1.0 if loss_weights is None else loss_weights)
  if tau_max is None or tau_max >= T:
    chunks = [(0, T - 1, -1)]
  else:
    step = tau_b or tau_max
    chunks = [(s, min(s + step, T) - 1, min(s + step, T) - 1 - tau_max)
              for s in range(0, T, step)]
  grads = [_chunk_loss_grad(params, xs, targets, h0, valid, reset, weights, loss=loss,
                            many_to_one=many_to_one, start=s, end=e, cut=c)
           for s, e, c in chunks]
  return jax.tree.map(lambda *g: sum(g), *grads)


CASES = {
    "plain": dict(),
    "h0_three_layers": dict(hidden=(3, 4, 2), h0=True),
    "xent_no_readout": dict(loss="xent", readout=False, activation="sigmoid"),
    "lengths_resets": dict(lengths=(8, 3), resets=((1, 0), (4, 1), (6, 0)), h0=True),
    "loss_weights": dict(loss_weights=True, activation="relu"),
    "many_to_one_lengths": dict(many_to_one=True, lengths=(5, 8), loss="xent"),
    "truncated": dict(tau_max=3, h0=True),
    "truncated_tau_b": dict(tau_b=2, tau_max=5, resets=((3, 1),), h0=True),
    "truncated_many_to_one": dict(tau_b=3, tau_max=3, many_to_one=True, lengths=(7, 8)),
}


@pytest.mark.parametrize("name", CASES)
def test_deltas_equal_the_gradient_wrt_state_perturbations(name):
  opts = dict(CASES[name])
  T, B = 8, 2
  shape = dict(hidden=opts.pop("hidden", (3, 2)), loss=opts.get("loss", "mse"),
               readout=opts.pop("readout", True), activation=opts.pop("activation", "tanh"),
               many_to_one=opts.get("many_to_one", False))
  params, xs, targets = make_problem(len(name), T=T, B=B, D=2, **shape)
  if opts.pop("h0", False):
    opts["h0"] = random_h0(len(name), B, shape["hidden"])
  if "lengths" in opts:
    opts["lengths"] = jnp.asarray(opts["lengths"], jnp.int32)
  if "resets" in opts:
    opts["resets"] = jnp.zeros((T, B), bool).at[tuple(zip(*opts["resets"]))].set(True)
  if opts.pop("loss_weights", False):
    opts["loss_weights"] = jnp.asarray(np.random.default_rng(7).uniform(0, 2, (T, B)))
  got = jaxrnn.backward_deltas(params, xs, targets, **opts)
  want = _reference_deltas(params, xs, targets, **opts)
  assert [d.shape for d in got] == [(T, B, h) for h in shape["hidden"]]
  assert_trees_close(got, want, 1e-10, err=name)
  assert all(float(jnp.max(jnp.abs(d))) > 0 for d in want)  # the comparison is not 0 == 0
  if "lengths" in opts:  # padded steps have no loss and feed no scored step
    padded = jnp.arange(T, dtype=jnp.int32)[:, None] >= opts["lengths"][None]
    assert all(not jnp.any(jnp.where(padded[:, :, None], d, 0)) for d in got)
