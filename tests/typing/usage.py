"""What a user's type checker sees of jaxrnn's public API.

``tests/test_typing.py`` type-checks this file with mypy (every ``assert_type``
must hold) and also runs it, so the types it states are the ones returned.
"""

from typing import Tuple, assert_type

import jax
import jax.numpy as jnp
import optax

import jaxrnn
from jaxrnn import RNNParams, StepMetrics, StreamState

States = Tuple[jax.Array, ...]

params = jaxrnn.init_params(jax.random.key(0), 3, (4, 5), 2)
assert_type(params, RNNParams)
xs, ys = jnp.ones((6, 2, 3)), jnp.zeros((6, 2, 2))

assert_type(jaxrnn.bptt(params, xs, ys), Tuple[jax.Array, RNNParams])
assert_type(jaxrnn.bptt(params, xs, ys, return_dh0=True), Tuple[jax.Array, RNNParams, States])
value, grads = jaxrnn.autodiff_bptt(params, xs, ys, tau_max=3, tau_b=2)
assert_type(value, jax.Array)
assert_type(grads.layers[1].W_hh, jax.Array)
*_, dh0 = jaxrnn.autodiff_bptt(params, xs, ys, return_dh0=True)
assert_type(dh0, States)
flag: bool = bool(len(xs))   # known only at run time: either tuple
assert_type(jaxrnn.bptt(params, xs, ys, return_dh0=flag),
            Tuple[jax.Array, RNNParams] | Tuple[jax.Array, RNNParams, States])
assert_type(jaxrnn.backward_deltas(params, xs, ys, lengths=jnp.array([6, 3])), States)

h_last, hs, outputs = jaxrnn.forward(params, xs, h0=(jnp.zeros((2, 4)), jnp.zeros((2, 5))))
assert_type(h_last, States)
assert_type(outputs, jax.Array)
assert_type(jaxrnn.loss(params, xs, ys, loss_weights=jnp.ones((6, 2))), jax.Array)
assert_type(jaxrnn.elman_step(params.layers[0], jnp.zeros((2, 4)), xs[0]),
            Tuple[jax.Array, jax.Array])

optimizer = optax.adam(1e-2)
step = jaxrnn.make_train_step(optimizer, tau_max=3)
new_params, opt_state, metrics = step(params, optimizer.init(params), xs, ys)
assert_type(new_params, RNNParams)
assert_type(metrics, StepMetrics)

stream = jaxrnn.make_tbptt_stream(optimizer, tau_b=3, tau_max=4)
opt_state, state = stream.init(params, 2)
assert_type(state, StreamState)
new_params, opt_state, state, value = stream.step(params, opt_state, state, xs[:3], ys[:3])
assert_type(value, jax.Array)

jaxrnn.validate_inputs(params, xs, ys, loss="mse")   # returns None, or raises
