"""init_params: shapes, dtypes, documented initialisation, pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrnn


def test_shapes_and_structure():
  p = jaxrnn.init_params(jax.random.key(0), 3, (16, 8), 2, activation="sigmoid")
  assert isinstance(p, jaxrnn.RNNParams) and p.activation == "sigmoid"
  assert [(l.W_xh.shape, l.W_hh.shape, l.b_h.shape) for l in p.layers] == [
      ((3, 16), (16, 16), (16,)), ((16, 8), (8, 8), (8,))]
  assert (p.readout.W_hy.shape, p.readout.b_y.shape) == ((8, 2), (2,))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  # activation is static metadata, not a leaf
  assert len(jax.tree.leaves(p)) == 8
  assert jaxrnn.init_params(jax.random.key(0), 3, 4).readout is None


@pytest.mark.parametrize("activation,var", [("tanh", 1.0), ("relu", 2.0)])
def test_documented_initialisation(activation, var):
  p = jaxrnn.init_params(jax.random.key(1), 400, (300,), 5, activation=activation,
                         dtype=jnp.float64)
  layer = p.layers[0]
  np.testing.assert_allclose(layer.W_hh @ layer.W_hh.T, np.eye(300), atol=1e-10)  # orthogonal
  np.testing.assert_allclose(np.var(layer.W_xh) * 400, var, rtol=0.05)            # 1/D (LeCun), 2/D (He)
  assert not np.any(layer.b_h) and not np.any(p.readout.b_y)


def test_optax_and_tree_ops_keep_structure():
  p = jaxrnn.init_params(jax.random.key(0), 2, (3,), 1, activation="relu")
  opt = optax.adam(1e-2)
  state = opt.init(p)
  with jax.numpy_dtype_promotion("standard"):  # optax itself is not strict-promotion clean
    updates, _ = opt.update(jax.tree.map(jnp.ones_like, p), state, p)
  new = optax.apply_updates(p, updates)
  assert jax.tree.structure(new) == jax.tree.structure(p) and new.activation == "relu"


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_params(dtype):
  """16-bit params are the float32 initialisation rounded (LAPACK's QR has no 16-bit
  kernel), and bptt keeps that dtype end to end, close to the float32 gradient."""
  p = jaxrnn.init_params(jax.random.key(0), 3, (8, 4), 2, dtype=dtype)
  p32 = jaxrnn.init_params(jax.random.key(0), 3, (8, 4), 2, dtype=jnp.float32)
  assert all(x.dtype == dtype for x in jax.tree.leaves(p))
  jax.tree.map(np.testing.assert_array_equal, p, jax.tree.map(lambda a: a.astype(dtype), p32))
  xs = jax.random.normal(jax.random.key(1), (6, 2, 3), jnp.float32)
  ys = jax.random.normal(jax.random.key(2), (6, 2, 2), jnp.float32)
  p32 = jax.tree.map(lambda a: a.astype(jnp.float32), p)   # the same values in float32
  value, grads = jaxrnn.bptt(p, xs.astype(dtype), ys.astype(dtype))
  value32, grads32 = jaxrnn.bptt(p32, xs, ys)
  assert value.dtype == dtype and all(g.dtype == dtype for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(np.float32(value), value32, rtol=2e-2)
  for g, g32 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads32)):
    np.testing.assert_allclose(np.asarray(g, np.float32), g32, atol=3e-2 * np.abs(g32).max())


def test_float64_without_x64_warns_once_and_says_how():
  jax.config.update("jax_enable_x64", False)
  try:
    with pytest.warns(UserWarning) as record:
      p = jaxrnn.init_params(jax.random.key(0), 2, (3,), 1, dtype=jnp.float64)
  finally:
    jax.config.update("jax_enable_x64", True)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(p))
  assert len(record) == 1, [str(w.message) for w in record]   # not one per operation
  assert "init_params: dtype float64" in str(record[0].message)
  assert "jax_enable_x64" in str(record[0].message)
