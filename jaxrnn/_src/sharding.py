"""Data parallelism: the batch axis B split over devices.

Three ways a user splits a batch, and what each needs from the passes:

* ``jit`` with an *Explicit* mesh axis (``jax.make_mesh``'s default): an
  array's type names its split (``f32[8@b, 5]``). The passes' reshapes that
  merge T and B have no split form, so :func:`data_parallel` runs a pass
  inside ``jax.shard_map`` on each device's rows of the batch, with every
  per-example input split as ``xs`` is (:func:`split_like`).
* inside the user's ``jax.shard_map``, which tracks the manual axes each
  value varies over: an array a pass makes from nothing (a zero state,
  delta or gradient sum) must vary like the data it meets, or a loop's
  carry changes type (:func:`batch_zeros`, :func:`zeros_varying_like`); and
  the hand-made weight gradients are summed over the devices as
  ``jax.grad`` sums them there (:func:`sum_over_devices`).
* ``jit`` with an *Auto* mesh axis: XLA propagates the split; nothing to do.

With no mesh every function here returns its input or plain zeros: the
one-device programs compile to the same HLO as before this module.
"""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def batch_zeros(ref: jax.Array, shape, dtype) -> jax.Array:
  """Zeros of ``shape`` ``[B, ...]``, split and varying like ``ref`` ``[B, ...]`` (its axis 0)."""
  z = jnp.zeros_like(ref[(slice(None),) + (0,) * (ref.ndim - 1)], dtype)     # [B]
  return jnp.broadcast_to(z.reshape((-1,) + (1,) * (len(shape) - 1)), tuple(shape))


def zeros_varying_like(x: jax.Array, ref: jax.Array) -> jax.Array:
  """Zeros like ``x`` (any shape, e.g. a weight) that vary over ``ref``'s manual axes.

  A sum over the batch of per-example terms varies over the axes the batch
  does; its zero start must too. Outside ``shard_map`` this is
  ``jnp.zeros_like(x)``.
  """
  z = jnp.zeros_like(x)
  if varying_axes(ref) - varying_axes(z):
    z = z + jnp.zeros_like(ref.reshape(-1)[0], x.dtype)    # invariant + varying: varying
  return z


def varying_axes(x) -> frozenset:
  """The manual mesh axes ``x`` varies over inside ``jax.shard_map`` (empty outside)."""
  t = jax.typeof(x)
  mat = getattr(t, "manual_axis_type", None)     # jax >= 0.9
  if mat is not None:
    return frozenset(mat.varying)
  return frozenset(getattr(t, "vma", ()))         # older jax


def sum_over_devices(grads, params):
  """``jax.grad``'s convention inside ``jax.shard_map``, for gradients made by hand.

  There a parameter that does not vary over a manual axis (replicated
  weights) meets data that does; ``jax.grad`` transposes that meeting into
  a ``psum``, so the gradient of a per-device loss comes back summed over
  the devices. The hand-written pass forms per-device sums; this sums them
  the same way. Outside ``shard_map``: ``grads`` unchanged.
  """
  def one(g, p):
    extra = varying_axes(g) - varying_axes(p)
    return jax.lax.psum(g, tuple(extra)) if extra else g
  return jax.tree.map(one, grads, params)


def _spec(a) -> tuple:
  sharding = getattr(jax.typeof(a), "sharding", None)
  return tuple(getattr(sharding, "spec", ())) + (None,) * a.ndim


def _explicit_mesh(a):
  """The mesh ``a``'s type names if it has an *Explicit* axis, else None."""
  mesh = getattr(getattr(jax.typeof(a), "sharding", None), "mesh", None)
  if mesh is None or AxisType.Explicit not in tuple(getattr(mesh, "axis_types", ())):
    return None
  return mesh


def split_like(a, ref, axis: int = 1):
  """``a`` with B on ``axis`` split as ``ref``'s B (``ref`` [T, B, ...]), every other axis whole.

  Under an *Explicit* mesh, where the data (``xs``) sets the layout: targets,
  masks, h0 and a stream's kept state then meet it split the same way (a
  concatenation needs that; an all-gather or a slice is what it costs).
  ``xs`` itself, passed as ``a`` with ``ref=a``, keeps only its batch split.
  Where nothing is explicitly split, or ``a`` is None: ``a`` unchanged.
  """
  if a is None:
    return a
  mesh = _explicit_mesh(ref) or _explicit_mesh(a)
  if mesh is None:
    return a
  batch = _spec(ref)[1] if _explicit_mesh(ref) is not None else None
  return jax.sharding.reshard(a, NamedSharding(mesh, P(*([None] * axis + [batch]))))


def data_parallel(compute, params, inp, per_example_axis: int,
                  per_example_grads: bool = True):
  """``compute(params, inp)``, run on each device's rows of the batch under an *Explicit* mesh.

  Where any input's type names an Explicit mesh, every input is resharded
  onto it: the params replicated, the per-example arrays split along B as
  ``inp.xs`` is. If ``xs`` is split along B, ``compute`` runs inside
  ``jax.shard_map`` over those mesh axes, and its results are combined.
  ``compute`` returns ``(loss, grads, per_example)``: the loss a batch
  mean, ``grads`` per device or already summed over the devices (as
  ``jax.grad`` makes them; this sums the others, :func:`sum_over_devices`),
  ``per_example`` a pytree of arrays with B on axis ``per_example_axis``.
  With n devices and equal shares of the batch, the whole batch's loss is
  the mean of the devices' losses and every gradient 1/n of the devices'
  sum (one all-reduce of the weight gradients); per-example gradients
  (``per_example_grads``: ∂L/∂h0, deltas) are 1/n of the device's, per-
  example states (``per_example_grads=False``) are kept as they are. The
  gradients come back split as their parameters are. With no Explicit mesh
  (none, an *Auto* one, inside ``shard_map``): ``compute(params, inp)``,
  its gradients summed over ``shard_map``'s devices.

  Args:
    compute: ``(params, inp) -> (loss, grads, per_example)``.
    params: RNNParams.
    inp: :class:`jaxrnn._src.checks.Inputs`.
    per_example_axis: B's axis in every leaf of ``per_example``.
    per_example_grads: whether ``per_example`` holds gradients (scaled by 1/n).
  """
  def summed(params, inp):            # hand-made weight gradients summed as jax.grad's are
    value, grads, per_example = compute(params, inp)
    return value, sum_over_devices(grads, params), per_example

  # xs first: where several meshes are named, xs's is the one used
  arrays = [a for a in jax.tree.leaves((inp.xs, params, inp)) if isinstance(a, jax.Array)]
  meshes = [m for m in map(_explicit_mesh, arrays) if m is not None]
  if not meshes:
    return summed(params, inp)
  mesh = meshes[0]
  axes = _spec(inp.xs)[1] if _explicit_mesh(inp.xs) is not None else None
  names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)

  def batch_on(axis):                 # B on ``axis`` split over ``axes``, the rest whole
    return P(*([None] * axis + [axes]))

  def reshard(tree, spec):
    return jax.tree.map(lambda a: jax.sharding.reshard(a, NamedSharding(mesh, spec)), tree)

  static = dict(truncation=inp.truncation, unit_weights=inp.unit_weights)
  state = dict(h0=inp.h0, h_reset=inp.h_reset)           # [B, H]: B on axis 0
  series = inp._replace(truncation=None, unit_weights=None, h0=None, h_reset=None)  # [T, B, ...]
  state, series = reshard(state, batch_on(0)), reshard(series, batch_on(1))

  def as_params(grads):               # each gradient split as its parameter is
    return jax.tree.map(lambda g, p: jax.sharding.reshard(
        g, NamedSharding(mesh, P(*_spec(p)[:p.ndim]) if _explicit_mesh(p) else P())),
        grads, params)

  if not names:                       # not split along the batch: now all replicated
    value, grads, per_example = summed(reshard(params, P()), series._replace(**state, **static))
    return value, as_params(grads), per_example

  n = 1
  for name in names:
    n *= mesh.shape[name]

  def local(params, state, series):
    value, grads, per_example = summed(params, series._replace(**state, **static))
    scale = lambda t: jax.tree.map(lambda a: a / n, t)
    return (jax.lax.pmean(value, names), scale(grads),
            scale(per_example) if per_example_grads else per_example)

  value, grads, per_example = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), batch_on(0), batch_on(1)),
      out_specs=(P(), P(), batch_on(per_example_axis)),
      axis_names=set(names))(reshard(params, P()), state, series)
  return value, as_params(grads), per_example
