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
