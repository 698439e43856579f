"""Parameter pytrees of a stacked Elman RNN and their initialisation.

Row-vector convention, layer ``l = 1..L`` at step ``t``::

    z^l_t = h^{l-1}_t W_xh^l + h^l_{t-1} W_hh^l + b_h^l      (h^0_t = x_t)
    h^l_t = f(z^l_t)
    y_t   = h^L_t W_hy + b_y                                 (optional readout)
"""

import functools
import numbers
import warnings
from typing import Iterable, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn._src import checks
from jaxrnn._src.activations import get_activation


# One array per layer, bottom first: states [B, H_l], or [T, B, H_l] over time.
States = Tuple[jax.Array, ...]


class LayerParams(NamedTuple):
  """Weights of one recurrent layer: ``W_xh`` [D_in, H], ``W_hh`` [H, H], ``b_h`` [H].

  ``z_t = h^{below}_t W_xh + h_{t-1} W_hh + b_h``; D_in is D for the first
  layer and the width of the layer below otherwise.
  """
  W_xh: jax.Array  # [D_in, H]  input (layer below) -> hidden; "S-weights"
  W_hh: jax.Array  # [H, H]     hidden -> hidden, one step later; "T-weights"
  b_h: jax.Array   # [H]        hidden bias


class Readout(NamedTuple):
  """Affine map from the top layer's state to the outputs: ``W_hy`` [H_L, O], ``b_y`` [O].

  ``y_t = h^L_t W_hy + b_y``.
  """
  W_hy: jax.Array  # [H_L, O]
  b_y: jax.Array   # [O]


class RNNParams(NamedTuple):
  """All parameters of a stacked RNN: L :class:`LayerParams` (bottom first) and a
  :class:`Readout` or None (then the outputs are the top layer's states).

  ``activation`` is static metadata, not a leaf: ``jax.tree.leaves(params)``
  holds only arrays, gradients keep the same tree structure (activation
  included), and optax updates them like any other pytree.
  """
  layers: Tuple[LayerParams, ...]  # one per layer, bottom first
  readout: Optional[Readout]       # None: outputs are the top hidden states
  activation: str = "tanh"         # static: "tanh" | "sigmoid" | "relu" | "identity"


def _unflatten(activation: str, children) -> RNNParams:
  layers, readout = children
  return RNNParams(layers, readout, activation)


jax.tree_util.register_pytree_with_keys(
    RNNParams,
    lambda p: (((jax.tree_util.GetAttrKey("layers"), p.layers),
                (jax.tree_util.GetAttrKey("readout"), p.readout)), p.activation),
    _unflatten,
    flatten_func=lambda p: ((p.layers, p.readout), p.activation),
)


def init_params(
    key: jax.Array,
    input_size: int,
    hidden_sizes: Union[int, Sequence[int]],
    output_size: Optional[int] = None,
    *,
    activation: str = "tanh",
    dtype=jnp.float32,
) -> RNNParams:
  """Initialises a stacked Elman RNN.

  * ``W_xh``: scaled normal, variance ``1 / D_in`` (LeCun), or ``2 / D_in``
    (He) for ``relu``, so pre-activations start with unit variance.
  * ``W_hh``: a random orthogonal matrix (all singular values 1), the usual
    choice that keeps early gradients from vanishing or exploding
    (Saxe et al. 2014; Le et al. 2015).
  * ``W_hy``: normal with variance ``1 / H_L``; all biases zero.

  Args:
    key: one PRNG key (``jax.random.key`` or ``PRNGKey``); for several
      initialisations, ``jax.vmap`` over split keys.
    input_size: D, the size of each input vector.
    hidden_sizes: (H_1, ..., H_L), one width per layer (an int means one layer).
    output_size: O, the readout size; None for no readout (outputs = h^L).
    activation: ``"tanh"``, ``"sigmoid"``, ``"relu"`` or ``"identity"``.
    dtype: floating dtype of every parameter.

  Returns:
    ``RNNParams(layers, readout, activation)``: ``layers[l]`` holds W_xh
    [D_in, H_l], W_hh [H_l, H_l], b_h [H_l]; ``readout`` W_hy [H_L, O], b_y
    [O], or None. Every leaf has ``dtype``.

  Raises:
    TypeError: ``key`` is not one key, or ``dtype`` is not floating.
    ValueError: a size is not an integer >= 1 (NumPy integers are fine), or
      ``activation`` is unknown.
  """
  get_activation(activation)
  if not _is_one_key(key):
    raise TypeError(f"key must be one PRNG key, jax.random.key(seed) or "
                    f"jax.random.PRNGKey(seed); got {type(key).__name__} of shape "
                    f"{np.shape(key)}.")
  if isinstance(hidden_sizes, numbers.Integral):
    given: Tuple = (hidden_sizes,)
  elif (isinstance(hidden_sizes, (str, bytes)) or not isinstance(hidden_sizes, Iterable)
        or getattr(hidden_sizes, "ndim", None) == 0):   # a float, None, a 0-d array
    raise ValueError(f"hidden_sizes must be a positive int or a sequence of them; "
                     f"got {hidden_sizes!r} ({type(hidden_sizes).__name__}).")
  else:
    given = tuple(hidden_sizes)
  if not given:
    raise ValueError("hidden_sizes must name at least one layer; got ().")
  input_size = checks.check_int("input_size", input_size)
  sizes = tuple(checks.check_int(f"hidden_sizes[{i}]", h) for i, h in enumerate(given))
  output_size = checks.check_int_option("output_size", output_size)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"dtype must be a floating dtype; got {dtype}.")
  dtype = jnp.dtype(dtype)
  if jax.dtypes.canonicalize_dtype(dtype) != dtype:   # float64 without x64
    warnings.warn(f"init_params: dtype {dtype.name} is not available with "
                  f"jax_enable_x64 off; the parameters are "
                  f"{jax.dtypes.canonicalize_dtype(dtype).name}. Set "
                  f"jax.config.update('jax_enable_x64', True) first for {dtype.name}.",
                  UserWarning, stacklevel=2)
    dtype = jax.dtypes.canonicalize_dtype(dtype)
  return _init(key, input_size, sizes, output_size, activation, dtype)


def _is_one_key(key) -> bool:
  if not hasattr(key, "dtype"):
    return False
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):  # jax.random.key
    return np.shape(key) == ()
  return np.shape(key) == (2,) and key.dtype == jnp.uint32   # jax.random.PRNGKey


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _init(key, input_size, hidden_sizes, output_size, activation, dtype):
  # One compiled function: eager initialisation would compile each op (QR
  # for the orthogonal matrices included) separately for every new shape.
  # Sampled in at least float32, then cast: LAPACK's QR has no 16-bit kernels,
  # and float32/float64 parameters come out exactly as sampled.
  final_dtype, dtype = dtype, checks.at_least_float32(dtype)
  keys = jax.random.split(key, 2 * len(hidden_sizes) + 1)
  in_init = (jax.nn.initializers.he_normal() if activation == "relu"
             else jax.nn.initializers.lecun_normal())
  rec_init = jax.nn.initializers.orthogonal()
  layers = []
  d_in = input_size
  for l, h in enumerate(hidden_sizes):
    layers.append(LayerParams(
        W_xh=in_init(keys[2 * l], (d_in, h), dtype),
        W_hh=rec_init(keys[2 * l + 1], (h, h), dtype),
        b_h=jnp.zeros((h,), dtype)))
    d_in = h
  readout = None
  if output_size is not None:
    readout = Readout(
        W_hy=jax.nn.initializers.lecun_normal()(keys[-1], (d_in, output_size), dtype),
        b_y=jnp.zeros((output_size,), dtype))
  params = RNNParams(tuple(layers), readout, activation)
  return jax.tree.map(lambda a: a.astype(final_dtype), params)
