"""Calls a type checker must refuse. ``tests/test_typing.py`` expects mypy to
report an error on exactly the lines marked ``# error`` (and this file is never run)."""

import jax
import jax.numpy as jnp

import jaxrnn

params = jaxrnn.init_params(jax.random.key(0), 3, 4, 2)
xs, ys = jnp.ones((6, 2, 3)), jnp.zeros((6, 2, 2))

jaxrnn.bptt(params._asdict(), xs, ys)                     # error: not an RNNParams
jaxrnn.bptt(params, xs, ys, tau_max="3")                  # error: a str for an int
jaxrnn.bptt(params, xs, ys, learning_rate=0.1)            # error: no such option
jaxrnn.autodiff_bptt(params, xs, ys, checkpoint_every=5)  # error: a manual-only option
value, grads = jaxrnn.bptt(params, xs, ys, return_dh0=True)  # error: three values
value, grads, dh0 = jaxrnn.bptt(params, xs, ys)           # error: two values
jaxrnn.forward(params, xs, lengths="6")                   # error: a str for an array
params.layers[0].W_yh                                     # error: no such field
jaxrnn.init_params(jax.random.key(0), 3, 4, output_size=2.5)  # error: a float size
