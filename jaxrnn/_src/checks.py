"""Input validation shared by every public function.

Everything that can be checked from shapes, dtypes and static options is
checked here, at trace time, before any array work: a bad call raises a
``ValueError`` or ``TypeError`` whose message names the argument, what was
expected and what was given. Checks on *values* (for example that every
``lengths[b]`` lies in ``[1, T]``) cannot run on traced arrays; they live in
:func:`validate_inputs`, which callers run eagerly on concrete data.
"""

import functools
import inspect
import numbers
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Optional, ParamSpec, Tuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxrnn._src import sharding
from jaxrnn._src.activations import get_activation

if TYPE_CHECKING:   # params imports this module
  from jaxrnn._src.params import RNNParams

LOSSES = ("mse", "xent")
P = ParamSpec("P")
R = TypeVar("R")


def _shape(x) -> Tuple[int, ...]:
  return tuple(np.shape(x))


def _dtype(x):
  return jnp.result_type(x) if not hasattr(x, "dtype") else x.dtype


def at_least_float32(dtype) -> jnp.dtype:
  """``dtype``, or float32 for a 16-bit float: where sums accumulate and QR runs."""
  dtype = jnp.dtype(dtype)
  return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def as_array(name: str, x):
  """``x`` as an array: NumPy/JAX arrays as they are, nested lists and scalars converted.

  Under ``jax.jit`` a list argument arrives as a list of tracers, which NumPy
  cannot even measure; ``jnp.asarray`` stacks them.
  """
  if x is None or hasattr(x, "shape"):
    return x
  try:
    return jnp.asarray(x)
  except (TypeError, ValueError) as e:
    raise TypeError(f"{name} must be an array (or a nested list of numbers of one "
                    f"shape); got {type(x).__name__}: {e}") from None


def check_floating(name: str, x) -> None:
  """A TypeError naming ``name`` unless ``x`` has a floating dtype."""
  if not jnp.issubdtype(_dtype(x), jnp.floating):
    raise TypeError(f"{name} must have a floating dtype; got {_dtype(x)}.")


def as_arrays(**named) -> tuple:
  """:func:`as_array` of each keyword argument, returned in the order given."""
  return tuple(as_array(name, x) for name, x in named.items())


def check_params_type(params) -> None:
  """A TypeError unless ``params`` is an :class:`RNNParams`.

  The public functions call this before their ``jax.jit``: a dict or tuple of
  the fields (``params._asdict()``, ``tuple(params)``) holds the activation
  name, a string, which jit would refuse with an error about abstract arrays.
  """
  from jaxrnn._src.params import RNNParams  # no cycle
  if not isinstance(params, RNNParams):
    hint = (" (a dict or tuple of its fields converts back with RNNParams(**d) or "
            "RNNParams(*t))" if isinstance(params, (dict, tuple)) else "")
    raise TypeError(f"params must be an RNNParams (see jaxrnn.init_params); "
                    f"got {type(params).__name__}{hint}.")


def params_checked(fn: Callable[P, R], *, jit: bool = False) -> Callable[P, R]:
  """``fn(params, ...)``, checking ``params``'s type first: every public entry point.

  Keeps ``fn``'s signature, annotations and docstring. ``jit``: the check is
  followed by ``jax.jit(fn)`` (see :func:`jit_checked`), and the wrapper offers
  that function's ``lower``, ``trace``, ``eval_shape``, ``clear_cache`` and
  cache size.
  """
  inner: Callable[..., Any] = fn
  if jit:
    inner = jax.jit(fn)

  @functools.wraps(fn)
  def call(*args: P.args, **kwargs: P.kwargs) -> R:
    if args or "params" in kwargs:   # else fn's own TypeError names what is missing
      check_params_type(args[0] if args else kwargs["params"])
    return inner(*args, **kwargs)
  for name in ("lower", "trace", "eval_shape", "clear_cache", "_cache_size"):
    if hasattr(inner, name):
      setattr(call, name, getattr(inner, name))
  return call


def jit_checked(fn: Callable[P, R]) -> Callable[P, R]:
  """``jax.jit(fn)`` behind :func:`params_checked`, typed as ``fn`` (``jax.jit``'s
  own annotation keeps neither the parameters nor the return type)."""
  return params_checked(fn, jit=True)


def check_params(params) -> None:
  """Checks that ``params`` is a consistent :class:`RNNParams`."""
  from jaxrnn._src.params import LayerParams, Readout  # no cycle
  check_params_type(params)
  get_activation(params.activation)
  if not isinstance(params.layers, tuple) or not params.layers:
    got = (f"{type(params.layers).__name__} of length {len(params.layers)}"
           if isinstance(params.layers, (tuple, list)) else type(params.layers).__name__)
    raise ValueError(f"params.layers must be a non-empty tuple of LayerParams; got {got}.")
  d_in = None
  for l, layer in enumerate(params.layers):
    if not isinstance(layer, LayerParams):
      raise TypeError(f"params.layers[{l}] must be a LayerParams; "
                      f"got {type(layer).__name__}.")
    for name, x in zip(LayerParams._fields, layer):
      if not hasattr(x, "shape"):
        raise TypeError(f"params.layers[{l}].{name} must be an array; "
                        f"got {type(x).__name__}.")
    sx, sh, sb = _shape(layer.W_xh), _shape(layer.W_hh), _shape(layer.b_h)
    if len(sx) != 2:
      raise ValueError(f"params.layers[{l}].W_xh must have shape [D_in, H]; got {sx}.")
    h = sx[1]
    if sh != (h, h):
      raise ValueError(f"params.layers[{l}].W_hh must have shape [H, H] = {(h, h)}; "
                       f"got {sh}.")
    if sb != (h,):
      raise ValueError(f"params.layers[{l}].b_h must have shape [H] = {(h,)}; got {sb}.")
    if d_in is not None and sx[0] != d_in:
      raise ValueError(f"params.layers[{l}].W_xh must have {d_in} rows (the width of "
                       f"layer {l - 1}); got shape {sx}.")
    d_in = h
  if params.readout is not None:
    if not isinstance(params.readout, Readout):
      raise TypeError(f"params.readout must be a Readout or None; "
                      f"got {type(params.readout).__name__}.")
    for name, x in zip(Readout._fields, params.readout):
      if not hasattr(x, "shape"):
        raise TypeError(f"params.readout.{name} must be an array; got {type(x).__name__}.")
    sy, sby = _shape(params.readout.W_hy), _shape(params.readout.b_y)
    if len(sy) != 2 or sy[0] != d_in:
      raise ValueError(f"params.readout.W_hy must have shape [H_L, O] with H_L = {d_in}; "
                       f"got {sy}.")
    if sby != (sy[1],):
      raise ValueError(f"params.readout.b_y must have shape [O] = {(sy[1],)}; got {sby}.")
  dtypes = {str(_dtype(x)) for x in jax.tree.leaves(params)}
  if len(dtypes) != 1 or not jnp.issubdtype(_dtype(jax.tree.leaves(params)[0]), jnp.floating):
    raise TypeError(f"params must all share one floating dtype; got {sorted(dtypes)}.")


def param_dtype(params):
  return _dtype(params.layers[0].W_xh)


def input_size(params) -> int:
  return _shape(params.layers[0].W_xh)[0]


def hidden_sizes(params) -> Tuple[int, ...]:
  return tuple(_shape(layer.W_hh)[0] for layer in params.layers)


def output_size(params) -> int:
  if params.readout is None:
    return hidden_sizes(params)[-1]
  return _shape(params.readout.W_hy)[1]


def _refuse_traced(name: str, value) -> None:
  """A static option that arrives as a tracer was passed through ``jax.jit`` as an
  ordinary argument: say so, and how to mark it static."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"{name} is a static option (it fixes the program's structure at trace time) but "
        f"got a traced value, {value}: it was passed through jax.jit as an array argument. "
        f"Mark it static, e.g. jax.jit(f, static_argnames=({name!r},)), or fix it with "
        f"functools.partial before jitting.")


def check_int(name: str, value, *, minimum: int = 1, or_none: bool = False) -> int:
  """Checks a static integer such as ``num_steps`` (at least ``minimum``).

  ``or_none``: the message says that None is accepted too (see
  :func:`check_int_option`).
  """
  _refuse_traced(name, value)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    raise ValueError(f"{name} must be {kind}{' or None' if or_none else ''}; "
                     f"got {value!r} ({type(value).__name__}).")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}; got {value}.")
  return int(value)


def check_int_option(name: str, value, *, minimum: int = 1) -> Optional[int]:
  """Checks a static integer option that may be None, such as ``tau_max``."""
  return None if value is None else check_int(name, value, minimum=minimum, or_none=True)


def check_bool(name: str, value) -> bool:
  """Checks a static option that is True or False."""
  _refuse_traced(name, value)
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool; got {value!r} ({type(value).__name__}).")
  return bool(value)


def check_optional_bool(name: str, value) -> Optional[bool]:
  """Checks a static option that is None, True or False."""
  _refuse_traced(name, value)
  if value is None or isinstance(value, (bool, np.bool_)):
    return None if value is None else bool(value)
  raise ValueError(f"{name} must be None, True or False; got {value!r} ({type(value).__name__}).")


class Truncation(NamedTuple):
  """Normalised truncation: chunks of ``tau_b`` steps, windows of ``window``."""
  tau_b: int
  window: int  # min(tau_max, T): the number of steps each chunk's gradient spans


def symbolic_axes(shape, axes: str):
  """The names (letters of ``axes``) of the dimensions of ``shape`` that are symbolic
  (``jax.export`` shape polymorphism), not ints."""
  return [a for a, d in zip(axes, shape) if not isinstance(d, (int, np.integer))]


def check_truncation(tau_max, tau_b, T: int) -> Optional[Truncation]:
  """Validates ``tau_max``/``tau_b`` and returns None when nothing is truncated.

  ``tau_max=None``, or ``tau_max >= T``, leaves every gradient path intact,
  whatever ``tau_b`` is.
  """
  tau_max = check_int_option("tau_max", tau_max)
  tau_b = check_int_option("tau_b", tau_b)
  if tau_max is not None and tau_b is not None and tau_max < tau_b:
    raise ValueError(f"tau_max must be >= tau_b (else some losses would get no gradient "
                     f"path); got tau_max={tau_max}, tau_b={tau_b}.")
  if tau_max is None:
    return None
  if symbolic_axes((T,), "T"):
    raise TypeError(f"truncation (tau_max={tau_max}) needs a concrete sequence length: its "
                    f"windows are laid out at trace time; got the symbolic T = {T}.")
  if tau_max >= T:
    return None
  return Truncation(tau_b=tau_max if tau_b is None else tau_b, window=tau_max)


def static_options(xs, loss, many_to_one, tau_max=None, tau_b=None):
  """Checks the static options of a public function before its jit boundary and
  returns ``(tau_max, tau_b)`` in canonical form (see :func:`canonical_truncation`)."""
  check_static_options(loss, many_to_one)
  return canonical_truncation(xs, tau_max, tau_b)


def canonical_truncation(xs, tau_max, tau_b):
  """``(tau_max, tau_b)`` in canonical form: ``(None, None)`` when nothing is cut.

  Used before the jit boundary so that equivalent options share one compiled
  function (``tau_max >= T`` and ``tau_max=None`` are the same, whatever tau_b).
  """
  T = np.shape(xs)[0] if np.ndim(xs) == 3 else 1
  trunc = check_truncation(tau_max, tau_b, T)
  return (None, None) if trunc is None else (trunc.window, trunc.tau_b)


def check_static_options(loss, many_to_one) -> None:
  """Checks the static options before the jit boundary (an unhashable value would
  otherwise fail inside ``jax.jit`` without naming the argument)."""
  if not isinstance(loss, str) or loss not in LOSSES:
    raise ValueError(f"loss must be one of {LOSSES}; got {loss!r}.")
  check_bool("many_to_one", many_to_one)


class Inputs(NamedTuple):
  """Validated, normalised inputs shared by the manual and autodiff paths."""
  xs: jax.Array                   # [T, B, D] in the params' dtype; 0 at padded steps
  h0: Tuple[jax.Array, ...]       # one [B, H_l] per layer
  valid: Optional[jax.Array]      # [T, B] bool, False past a sequence's length
  reset: Optional[jax.Array]      # [T, B] bool, resets at valid steps only
  # [T, B, O] float (mse) / [T, B] int (xent); 0 where unscored. None: forward only.
  targets: Optional[jax.Array]
  weights: Optional[jax.Array]    # [T, B] weight of each step's loss term; None: forward only
  truncation: Optional[Truncation]
  # The state a reset restores; None: h0 itself (then resets add to dL/dh0).
  h_reset: Optional[Tuple[jax.Array, ...]] = None
  # Static: every weight is 1 (no lengths, loss_weights or many_to_one).
  unit_weights: bool = False


# bptt's options that ``prepare`` does not take (the rest are prepare's keywords)
BPTT_ONLY_OPTIONS = ("return_dh0", "checkpoint_every", "unroll", "fused")


def prepare(params, xs, targets=None, *, loss="mse", many_to_one=False, h0=None,
            lengths=None, loss_weights=None, resets=None, tau_max=None,
            tau_b=None) -> Inputs:
  """Checks every argument and returns them normalised as :class:`Inputs`.

  With ``targets=None`` only the forward-pass arguments are checked, and
  ``targets``/``weights`` of the result are None.
  """
  check_params(params)
  dtype = param_dtype(params)
  hs = hidden_sizes(params)

  xs, targets, lengths, loss_weights, resets = as_arrays(
      xs=xs, targets=targets, lengths=lengths, loss_weights=loss_weights, resets=resets)
  if xs is None:
    raise TypeError("xs must be a [T, B, D] array; got None.")
  if xs.ndim != 3:
    raise ValueError(f"xs must have shape [T, B, D] (rank 3, time-major); "
                     f"got shape {_shape(xs)}.")
  T, B, D = xs.shape
  check_floating("xs", xs)
  if T == 0:
    raise ValueError(f"xs must have at least one time step (T >= 1); got shape {xs.shape}.")
  if B == 0:
    raise ValueError(f"xs must have at least one sequence (B >= 1); got shape {xs.shape}.")
  if D != input_size(params):
    raise ValueError(f"xs has input size D = {D}, but params expect "
                     f"D = {input_size(params)} (params.layers[0].W_xh is "
                     f"{_shape(params.layers[0].W_xh)}); got xs shape {xs.shape}.")
  xs = xs.astype(dtype)
  # Explicit meshes: xs split along B only, and every per-example array as xs
  # once checked (sharding.split_like; no-ops otherwise)
  xs = sharding.split_like(xs, xs)

  if h0 is None:
    h0 = tuple(sharding.batch_zeros(xs[0], (B, h), dtype) for h in hs)
  else:
    if not isinstance(h0, (tuple, list)) or len(h0) != len(hs):
      got = f"{type(h0).__name__} of length {len(h0)}" if isinstance(h0, (tuple, list)) \
          else f"one array of shape {_shape(h0)}" if hasattr(h0, "shape") \
          else type(h0).__name__
      raise ValueError(f"h0 must be None or a tuple of {len(hs)} arrays (one [B, H_l] per "
                       f"layer, shapes {[(B, h) for h in hs]}); got {got}.")
    h0 = tuple(as_array(f"h0[{l}]", h) for l, h in enumerate(h0))
    for l, (h, size) in enumerate(zip(h0, hs)):
      if _shape(h) != (B, size):
        raise ValueError(f"h0[{l}] must have shape [B, H_{l + 1}] = {(B, size)}; "
                         f"got {'None' if h is None else _shape(h)}.")
      check_floating(f"h0[{l}]", h)
    h0 = tuple(sharding.split_like(h.astype(dtype), xs, axis=0) for h in h0)

  valid = None
  if lengths is not None:
    if _shape(lengths) != (B,):
      raise ValueError(f"lengths must have shape [B] = {(B,)}; got {_shape(lengths)}.")
    if not jnp.issubdtype(_dtype(lengths), jnp.integer):
      raise TypeError(f"lengths must have an integer dtype; got {_dtype(lengths)}.")
    lengths = sharding.split_like(lengths, xs, axis=0)
    valid = jnp.arange(T, dtype=lengths.dtype)[:, None] < lengths[None, :]
    xs = jnp.where(valid[:, :, None], xs, 0)  # padded inputs can never leak (NaN-safe)
    # A length off [1, T] (a value: not checkable under jit) would drop or cut its
    # sequence silently; instead it makes what depends on that sequence NaN.
    inside = (lengths >= 1) & (lengths <= T)

  reset = None
  if resets is not None:
    if _shape(resets) != (T, B):
      raise ValueError(f"resets must have shape [T, B] = {(T, B)}; got {_shape(resets)}.")
    if _dtype(resets) != jnp.bool_:
      raise TypeError(f"resets must have dtype bool; got {_dtype(resets)}.")
    reset = sharding.split_like(resets, xs)
    if valid is not None:
      reset = reset & valid

  truncation = check_truncation(tau_max, tau_b, T)
  if targets is None:
    if lengths is not None:   # the forward pass: that sequence's states (a reset restores h0)
      h0 = tuple(jnp.where(inside[:, None], h, jnp.nan) for h in h0)
    return Inputs(xs, h0, valid, reset, None, None, truncation)

  check_static_options(loss, many_to_one)
  O = output_size(params)
  lead = (B,) if many_to_one else (T, B)
  want = lead + ((O,) if loss == "mse" else ())
  if _shape(targets) != want:
    axes = ("[B" if many_to_one else "[T, B") + (", O]" if loss == "mse" else "]")
    raise ValueError(f"targets must have shape {axes} = {want} for loss={loss!r}, "
                     f"many_to_one={many_to_one}; got {_shape(targets)}.")
  if loss == "xent":
    if not jnp.issubdtype(targets.dtype, jnp.integer):
      raise TypeError(f"targets must be integer class indices for loss='xent'; "
                      f"got dtype {targets.dtype}.")
  elif not jnp.issubdtype(targets.dtype, jnp.floating):
    raise TypeError(f"targets must have a floating dtype for loss='mse'; "
                    f"got {targets.dtype}.")
  else:
    targets = targets.astype(dtype)
  targets = sharding.split_like(targets, xs, axis=0 if many_to_one else 1)

  if loss_weights is not None:
    if many_to_one:
      raise ValueError("loss_weights and many_to_one=True cannot be combined: many_to_one "
                       "already puts weight 1 on each sequence's last valid step.")
    if _shape(loss_weights) != (T, B):
      raise ValueError(f"loss_weights must have shape [T, B] = {(T, B)}; "
                       f"got {_shape(loss_weights)}.")
    check_floating("loss_weights", loss_weights)
    weights = sharding.split_like(loss_weights.astype(dtype), xs)
    if valid is not None:
      weights = jnp.where(valid, weights, 0)
  elif many_to_one:
    last = (jnp.full((B,), T - 1) if lengths is None else lengths - 1)
    weights = (jnp.arange(T, dtype=last.dtype)[:, None] == last[None, :]).astype(dtype)
    targets = jnp.broadcast_to(targets[None], (T,) + targets.shape)
  elif valid is not None:
    weights = valid.astype(dtype)
  else:
    weights = jnp.ones((T, B), dtype)
  # Unscored targets are zeroed so that NaN or out-of-range values there cannot
  # reach a loss term or its gradient (0 * NaN would). Without lengths, loss
  # weights or many_to_one every step is scored: no copy is needed.
  if lengths is not None or loss_weights is not None or many_to_one:
    scored = weights != 0
    targets = jnp.where(scored[:, :, None] if loss == "mse" else scored, targets, 0)
  if lengths is not None:
    # The loss: NaN, and every gradient it reaches. (A select: XLA rewrites 0/1
    # weights times NaN as a select that drops the NaN.)
    weights = jnp.where(inside[None, :], weights, jnp.nan)
  unit = lengths is None and loss_weights is None and not many_to_one
  return Inputs(xs, h0, valid, reset, targets, weights, truncation, unit_weights=unit)


def validate_inputs(params: "RNNParams", xs: ArrayLike, targets: Optional[ArrayLike] = None,
                    **options: Any) -> None:
  """Eagerly checks shapes *and values* of concrete inputs; raises on the first problem.

  On top of the trace-time checks every public function already runs, this
  checks what needs concrete values: ``lengths`` in ``[1, T]``, finite
  ``params`` and ``h0``, finite ``xs`` at valid steps, finite non-negative
  ``loss_weights``, and at scored steps finite (mse) targets or class indices
  in ``[0, O)`` (xent). Call it once on your data before a jitted training
  loop.

  Args:
    params: RNNParams.
    xs: [T, B, D] inputs.
    targets: as for :func:`jaxrnn.loss`, or None to check forward inputs only.
    **options: the keyword options of :func:`jaxrnn.bptt`.
  """
  options = dict(options)
  for name, value in dict(params=params, xs=xs, targets=targets, **options).items():
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value)):
      raise TypeError(f"validate_inputs checks values, so it needs concrete arrays; {name} is "
                      f"traced (a call under jax.jit, vmap or grad). Call it outside them, "
                      f"once on your data.")
  static = {k: options.pop(k) for k in BPTT_ONLY_OPTIONS if k in options}
  known = [name for name, p in inspect.signature(prepare).parameters.items()
           if p.kind is inspect.Parameter.KEYWORD_ONLY]
  unknown = sorted(set(options) - set(known))
  if unknown:
    raise TypeError(f"validate_inputs got unknown option(s) {unknown}; the options of "
                    f"jaxrnn.bptt are {sorted(known + list(BPTT_ONLY_OPTIONS))}.")
  check_int_option("checkpoint_every", static.get("checkpoint_every"))
  check_int_option("unroll", static.get("unroll"))
  check_optional_bool("fused", static.get("fused"))
  check_bool("return_dh0", static.get("return_dh0", False))
  prepared = prepare(params, xs, targets, **options)
  T = np.shape(xs)[0]
  lengths = options.get("lengths")
  if lengths is not None:   # first: prepare makes what such a length reaches NaN
    lengths = np.asarray(lengths)
    bad = np.flatnonzero((lengths < 1) | (lengths > T))
    if bad.size:
      raise ValueError(f"lengths must lie in [1, T] = [1, {T}]; got lengths[{bad[0]}] = "
                       f"{lengths[bad[0]]}.")
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not np.isfinite(np.asarray(leaf)).all():
      raise ValueError(f"params{jax.tree_util.keystr(path)} has non-finite values.")
  for l, h in enumerate(prepared.h0):
    if not np.isfinite(np.asarray(h)).all():
      raise ValueError(f"h0[{l}] has non-finite values.")
  x = np.asarray(prepared.xs)
  if not np.isfinite(x).all():
    raise ValueError("xs has non-finite values at valid (non-padded) steps.")
  if options.get("loss_weights") is not None:
    w = np.asarray(options["loss_weights"])
    if not np.isfinite(w).all() or (w < 0).any():
      raise ValueError("loss_weights must be finite and >= 0.")
  if targets is not None and options.get("loss", "mse") == "mse":
    if not np.isfinite(np.asarray(prepared.targets)).all():
      raise ValueError("targets has non-finite values at scored steps.")
  if targets is not None and options.get("loss", "mse") == "xent":
    y = np.asarray(prepared.targets)
    O = output_size(params)
    if (y < 0).any() or (y >= O).any():
      raise ValueError(f"targets must be class indices in [0, O) = [0, {O}) at scored steps; "
                       f"got values in [{y.min()}, {y.max()}].")
