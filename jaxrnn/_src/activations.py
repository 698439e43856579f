"""Activation functions by name, with derivatives written in terms of the output.

The manual backward pass keeps only post-activations ``h = f(z)``, so every
activation here gives ``f'(z)`` as a function of ``h``:

=========  ==================  =====================
name       h = f(z)            f'(z) from h
=========  ==================  =====================
tanh       tanh(z)             1 - h^2
sigmoid    1 / (1 + e^{-z})    h (1 - h)
relu       max(z, 0)           1[h > 0]
identity   z                   1
=========  ==================  =====================
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp


class Activation(NamedTuple):
  """A pointwise nonlinearity and its derivative expressed through its output."""
  fn: Callable[[jax.Array], jax.Array]
  # f'(z) as a function of h = f(z); None means f' == 1 (skip the multiply).
  grad_from_output: Optional[Callable[[jax.Array], jax.Array]]
  # max_z f'(z): the gain gamma in the spectral-radius argument rho * gamma.
  max_slope: float


ACTIVATIONS = {
    "tanh": Activation(jnp.tanh, lambda h: 1 - h * h, 1.0),
    # jax.nn.sigmoid is the numerically stable logistic (no overflow of e^{-z}).
    "sigmoid": Activation(jax.nn.sigmoid, lambda h: h * (1 - h), 0.25),
    # At z = 0 both sides use f'(0) = 0, as jax.nn.relu's custom derivative does.
    "relu": Activation(jax.nn.relu, lambda h: (h > 0).astype(h.dtype), 1.0),
    "identity": Activation(lambda z: z, None, 1.0),
}


def get_activation(name: str) -> Activation:
  """Returns the :class:`Activation` called ``name`` or raises a ValueError."""
  if not isinstance(name, str) or name not in ACTIVATIONS:
    raise ValueError(
        f"activation must be one of {sorted(ACTIVATIONS)}; got {name!r}.")
  return ACTIVATIONS[name]
