"""Training with optax: a jitted train step that takes the gradient method as an option, and a fit loop.

The step detects a non-finite loss or gradient and skips that update
(parameters and optimizer state unchanged); the fit loop counts skips and
stops with :class:`NonFiniteError` after too many in a row. Nothing silently
turns the parameters into NaN.
"""

import collections.abc
import functools
import inspect
import numbers
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike
from tqdm.auto import tqdm

from jaxrnn._src import checks, persist
from jaxrnn._src.autodiff import autodiff_bptt
from jaxrnn._src.bptt import bptt
from jaxrnn._src.params import RNNParams

GRAD_METHODS = ("manual", "autodiff")  # jaxrnn.bptt, jaxrnn.autodiff_bptt


class StepMetrics(NamedTuple):
  """What one train step measured: all scalars, before the update."""
  loss: jax.Array       # scalar, the batch loss before the update
  grad_norm: jax.Array  # scalar, global norm of the (unclipped) gradient
  skipped: jax.Array    # bool scalar: the loss or gradient was not finite, nothing changed


# make_train_step's step: (params, opt_state, xs, targets, *, h0, lengths, loss_weights,
# resets) -> (params, opt_state, metrics).
TrainStep = Callable[..., Tuple[RNNParams, Any, StepMetrics]]


class NonFiniteError(RuntimeError):
  """Raised by :func:`fit` after too many consecutive non-finite steps."""


def check_optimizer(optimizer) -> None:
  """``optimizer`` has optax's ``init`` and ``update`` (not, say, ``optax.adam`` itself)."""
  if callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None)):
    return
  hint = ""
  if callable(optimizer) and hasattr(optimizer, "__name__"):
    hint = (f" {optimizer.__name__}: a function that makes one? Call it, as in "
            f"optax.adam(1e-3)")
  raise TypeError(f"optimizer must be an optax GradientTransformation (with init and "
                  f"update); got {type(optimizer).__name__}{hint}.")


def check_opt_state(optimizer, params, opt_state) -> None:
  """At trace time: ``opt_state`` has the structure and shapes of ``optimizer.init(params)``.

  Otherwise optax fails inside its update with an error that names neither
  argument (an AttributeError on a state field, or a broadcasting error).
  """
  want, got = jax.eval_shape(optimizer.init, params), opt_state
  want_def: Any   # (jaxlib's type stubs give PyTreeDef no == or !=)
  got_def: Any
  (want_leaves, want_def), (got_leaves, got_def) = (
      jax.tree_util.tree_flatten_with_path(t) for t in (want, got))
  remedy = "Make it with optimizer.init(params) for this optimizer and these params."
  if got_def != want_def:
    raise ValueError(f"opt_state does not have the structure of optimizer.init(params): got "
                     f"{str(got_def):.300}, expected {str(want_def):.300}. {remedy}")
  for (path, g), (_, w) in zip(got_leaves, want_leaves):
    if np.shape(g) != w.shape:
      raise ValueError(f"opt_state{jax.tree_util.keystr(path)} has shape {np.shape(g)}; "
                       f"optimizer.init(params) gives {w.shape}. {remedy}")


def _objective(loss_and_grads: Callable) -> Callable:
  """``params -> loss`` whose ``jax.grad`` is the gradient ``loss_and_grads`` computes.

  ``loss_and_grads(params) -> (loss, grads)`` is the step's own method (the
  hand-written BPTT, or autodiff; truncated if the step is), so an optimizer
  that differentiates the objective itself (``optax.lbfgs``'s line search)
  gets the same gradient as the step.
  """
  @jax.custom_vjp
  def value_fn(params):
    return loss_and_grads(params)[0]

  def value_fn_fwd(params):
    return loss_and_grads(params)       # the gradient is the residual

  def value_fn_bwd(grads, ct):
    return (jax.tree.map(lambda g: ct.astype(g.dtype) * g, grads),)

  value_fn.defvjp(value_fn_fwd, value_fn_bwd)
  return value_fn


def optimizer_update(optimizer, grads, opt_state, params, *, value, grad,
                     loss_and_grads: Callable):
  """``optimizer.update``, with optax's extra arguments for optimizers that read the objective.

  ``value`` (this batch's loss), ``grad`` (its gradient, before any clipping)
  and ``value_fn`` (the loss at other params, see :func:`_objective`) are what
  ``optax.contrib.reduce_on_plateau``, ``optax.polyak_sgd`` and
  ``optax.lbfgs`` take; other optimizers ignore them
  (``optax.with_extra_args_support``), and ``value_fn`` is then never traced.
  One that refuses unknown extra arguments, against optax's protocol
  (``optax.contrib.sam``, also inside a chain), is called without them.
  """
  extra_args = dict(value=value, grad=grad, value_fn=_objective(loss_and_grads))
  try:
    return optax.with_extra_args_support(optimizer).update(grads, opt_state, params,
                                                           **extra_args)
  except TypeError as e:
    if "unexpected keyword argument" not in str(e):
      raise
  return optimizer.update(grads, opt_state, params)


def make_train_step(optimizer: optax.GradientTransformation, *, method: str = "manual",
                    loss: str = "mse", many_to_one: bool = False,
                    tau_max: Optional[int] = None, tau_b: Optional[int] = None,
                    clip_norm: Optional[float] = None, checkpoint_every: Optional[int] = None,
                    unroll: Optional[int] = None, fused: Optional[bool] = None) -> TrainStep:
  """A jitted optax train step on ``jaxrnn.bptt`` or ``jaxrnn.autodiff_bptt``.

  Args:
    optimizer: any optax GradientTransformation. Those that read the
      objective get it as optax's extra arguments: ``value`` (the batch
      loss), ``grad`` (its gradient before clipping) and ``value_fn`` (the
      batch loss as a function of params, whose ``jax.grad`` is this step's
      method, truncated if the step is), so
      ``optax.contrib.reduce_on_plateau``, ``optax.polyak_sgd`` and
      ``optax.lbfgs`` (whose line search calls ``value_fn``) work as is.
    method: ``"manual"`` (:func:`jaxrnn.bptt`) or ``"autodiff"``
      (:func:`jaxrnn.autodiff_bptt`); the two give the same trajectory up to
      float rounding.
    loss, many_to_one, tau_max, tau_b: as for :func:`jaxrnn.bptt`.
    clip_norm: if given, gradients are clipped to this global norm before the
      optimizer sees them (``optax.clip_by_global_norm``; stateless, so the
      optimizer state is ``optimizer.init(params)`` either way).
    checkpoint_every, unroll, fused: options of the manual method, as for
      :func:`jaxrnn.bptt` (for example ``checkpoint_every=100`` trains on
      long sequences in the memory-efficient mode); a ValueError with
      ``method="autodiff"``.

  Returns:
    ``step(params, opt_state, xs, targets, *, h0=None, lengths=None,
    loss_weights=None, resets=None) -> (params, opt_state, StepMetrics)``.
    A step whose loss or gradient is not finite returns ``params`` and
    ``opt_state`` unchanged with ``metrics.skipped`` True. The step donates
    nothing, so the arrays passed in stay valid; to let XLA reuse their
    buffers for the results, wrap it: ``jax.jit(step, donate_argnums=(0, 1))``.
  """
  check_optimizer(optimizer)
  if method not in GRAD_METHODS:
    raise ValueError(f"method must be one of {GRAD_METHODS}; got {method!r}.")
  checks.check_static_options(loss, many_to_one)
  checks.check_truncation(tau_max, tau_b, (tau_max or 0) + 1)
  if clip_norm is not None and (isinstance(clip_norm, (bool, np.bool_)) or
                                not isinstance(clip_norm, numbers.Real) or not clip_norm > 0):
    raise ValueError(f"clip_norm must be a positive number or None; got {clip_norm!r}.")
  # Clipping is stateless, so it is applied to the gradients directly and the
  # caller's ``optimizer.init(params)`` state stays the one the step expects.
  clip = None if clip_norm is None else optax.clip_by_global_norm(clip_norm)
  manual_options = dict(checkpoint_every=checkpoint_every, unroll=unroll, fused=fused)
  given = [k for k, v in manual_options.items() if v is not None]
  if method == "manual":
    checks.check_int_option("checkpoint_every", checkpoint_every)
    checks.check_int_option("unroll", unroll)
    checks.check_optional_bool("fused", fused)
    grad_fn: Callable[..., Any] = functools.partial(bptt, **manual_options)
  elif given:
    raise ValueError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only "
                     f"to method='manual'; got method={method!r} "
                     f"with {', '.join(f'{k}={manual_options[k]!r}' for k in given)}.")
  else:
    grad_fn = autodiff_bptt

  @checks.jit_checked
  def step(params: RNNParams, opt_state: Any, xs: ArrayLike, targets: ArrayLike, *,
           h0: Optional[Sequence[ArrayLike]] = None, lengths: Optional[ArrayLike] = None,
           loss_weights: Optional[ArrayLike] = None,
           resets: Optional[ArrayLike] = None) -> Tuple[RNNParams, Any, StepMetrics]:
    loss_and_grads = functools.partial(
        grad_fn, xs=xs, targets=targets, loss=loss, many_to_one=many_to_one, h0=h0,
        tau_max=tau_max, tau_b=tau_b, lengths=lengths, loss_weights=loss_weights,
        resets=resets)
    value, grads = loss_and_grads(params)
    check_opt_state(optimizer, params, opt_state)   # after grad_fn has checked params
    with jax.numpy_dtype_promotion("standard"):  # optax is not strict-promotion clean
      grad_norm = optax.tree_utils.tree_norm(grads)
      unclipped = grads
      if clip is not None:
        grads, _ = clip.update(grads, optax.EmptyState())
      updates, new_opt_state = optimizer_update(optimizer, grads, opt_state, params,
                                                value=value, grad=unclipped,
                                                loss_and_grads=loss_and_grads)
      new_params = optax.apply_updates(params, updates)
    ok = jnp.isfinite(value) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    return (keep(new_params, params), keep(new_opt_state, opt_state),
            StepMetrics(value, grad_norm, ~ok))

  return step


def _batch_reader(step: Callable, batches: Callable) -> Callable[[int], Dict[str, Any]]:
  """``i -> batches(i)``, checked against the arguments ``step`` takes after the state.

  A batch that is not a mapping, lacks a required argument or has one the
  step does not take gets a TypeError that names ``batches(i)``, the key and
  the step's arguments, instead of Python's error about ``step()``.
  """
  names = required = None          # None: nothing to check the keys against
  try:
    rest = list(inspect.signature(step).parameters.values())[2:]   # after params, opt_state
  except (TypeError, ValueError):  # no signature to read: leave the checks to the call
    rest = []
  plain = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
  if rest and all(p.kind in plain for p in rest):     # no *args or **kwargs
    names = [p.name for p in rest]
    required = [p.name for p in rest if p.default is inspect.Parameter.empty]

  def read(i):
    batch = batches(i)
    if not isinstance(batch, collections.abc.Mapping):
      raise TypeError(f"batches({i}) must return a dict of the step's arguments; got "
                      f"{type(batch).__name__}.")
    if names is not None:
      missing = [k for k in required if k not in batch]
      unknown = [k for k in batch if k not in names]
      if missing or unknown:
        what = "; ".join(([f"missing {missing}"] if missing else [])
                         + ([f"unknown {unknown}"] if unknown else []))
        raise TypeError(f"batches({i}) returned keys {list(batch)}: {what}. The step takes "
                        f"{required} and optionally "
                        f"{[k for k in names if k not in required]}.")
    return batch
  return read


class FitResult(NamedTuple):
  """What :func:`fit` returns: the final state, logged metrics and the skip count."""
  params: Any
  opt_state: Any
  history: Dict[str, List[float]]  # "step", "loss", "grad_norm" every log_every steps
  skipped: int                     # steps skipped for non-finite loss or gradient


def fit(step: Callable, params: RNNParams, opt_state: Any, batches: Callable[[int], Dict[str, Any]],
        num_steps: int, *, log_every: int = 10, max_consecutive_skips: int = 20,
        progress: bool = True, desc: str = "train", checkpoint_dir=None,
        checkpoint_every: int = 100, resume: bool = True) -> FitResult:
  """Runs ``num_steps`` train steps with a progress bar and periodic metrics.

  Step ``i``'s metrics are read (and its checkpoint written) after step
  ``i + 1`` has been dispatched, so ``batches(i + 1)`` runs while step ``i``
  computes; a :class:`NonFiniteError` about step ``i`` therefore comes after
  ``batches(i + 1)`` was called. If ``batches`` raises (an interrupt, say),
  the previous step is still settled and checkpointed first.

  Args:
    step: a train step from :func:`make_train_step`.
    params, opt_state: the starting point.
    batches: ``i -> dict(xs=..., targets=..., [h0, lengths, loss_weights, resets])``,
      the batch of step ``i``. Derive any randomness from ``i`` (for example
      ``jax.random.fold_in(key, i)``) and the run is deterministic.
    num_steps: how many steps.
    log_every: record loss and gradient norm every this many steps (and at
      the last step).
    max_consecutive_skips: raise :class:`NonFiniteError` after this many
      non-finite steps in a row.
    progress: show a tqdm progress bar.
    checkpoint_dir: if given, the training state (params, optimizer state,
      step, metrics so far, skip counters) is saved there atomically every
      ``checkpoint_every`` steps and at the end (see :mod:`jaxrnn._src.persist`).
    checkpoint_every: steps between checkpoints.
    resume: with a ``checkpoint_dir``, continue from its newest intact
      checkpoint (a corrupted newest one is skipped with a warning). The
      resumed run is bitwise identical to an uninterrupted one, since step
      ``i`` depends only on the state and on ``batches(i)``. A run that does
      not resume (``resume=False``, or an empty folder) starts fresh.

  Returns:
    ``FitResult(params, opt_state, history, skipped)``.

  Raises:
    ValueError: ``num_steps`` is not an int >= 0, or ``log_every``,
      ``checkpoint_every`` or ``max_consecutive_skips`` is not an int >= 1;
      or ``checkpoint_dir`` holds checkpoints that this run would mix its
      own with: with ``resume=False`` any, with ``resume=True`` only ones
      that do not fit ``(params, opt_state)``; or the checkpoint to resume
      from is past ``num_steps`` (all checked before any step runs).
    TypeError: ``step`` or ``batches`` is not callable, or ``batches(i)`` is
      not a dict of the step's arguments (a missing or unknown key is named).
    NonFiniteError: ``max_consecutive_skips`` steps in a row were skipped.
  """
  for name, fn in (("step", step), ("batches", batches)):
    if not callable(fn):
      raise TypeError(f"{name} must be callable; got {type(fn).__name__}.")
  num_steps = checks.check_int("num_steps", num_steps, minimum=0)
  for name, value in (("log_every", log_every), ("checkpoint_every", checkpoint_every),
                      ("max_consecutive_skips", max_consecutive_skips)):
    checks.check_int(name, value)
  read_batch = _batch_reader(step, batches)
  history: Dict[str, List[float]] = {"step": [], "loss": [], "grad_norm": []}
  skipped = consecutive = start = 0
  if checkpoint_dir is not None:
    found = persist.start_from(checkpoint_dir, (params, opt_state), resume=resume,
                               num_steps=num_steps)
    if found is not None:
      (params, opt_state), record = found
      start, history = record["step"], record["history"]
      skipped, consecutive = record["skipped"], record["consecutive"]

  # disable=None: a bar on a terminal, silence in logs (CI, pipes)
  bar = tqdm(range(start, num_steps), desc=desc, disable=None if progress else True,
             leave=False, initial=start, total=num_steps)

  def settle(i, params, opt_state, m):
    """Reads step i's metrics (waiting for it): skips, the log, the checkpoint after it."""
    nonlocal skipped, consecutive
    if bool(m.skipped):
      skipped += 1
      consecutive += 1
      if consecutive >= max_consecutive_skips:
        raise NonFiniteError(
            f"{consecutive} consecutive steps had a non-finite loss or gradient "
            f"(last at step {i}: loss={float(m.loss)}, grad_norm={float(m.grad_norm)}); "
            f"parameters are kept at their last finite values. Lower the learning rate, "
            f"clip gradients (clip_norm) or truncate (tau_max).")
    else:
      consecutive = 0
    if i % log_every == 0 or i == num_steps - 1:
      history["step"].append(i)
      history["loss"].append(float(m.loss))
      history["grad_norm"].append(float(m.grad_norm))
      bar.set_postfix(loss=f"{float(m.loss):.4g}", skipped=skipped, refresh=False)
    if checkpoint_dir is not None and ((i + 1) % checkpoint_every == 0 or i == num_steps - 1):
      persist.save(checkpoint_dir, i + 1, (params, opt_state),
                   dict(history=history, skipped=skipped, consecutive=consecutive))

  # Step i's metrics are read once step i + 1 is dispatched, so that the host
  # prepares the next batch while the device computes (1.4-1.6x the steps per
  # second of a small model on the CPU). The states stay what they would be.
  pending = None
  for i in bar:
    try:
      dispatched = (i,) + tuple(step(params, opt_state, **read_batch(i)))
    except BaseException:
      if pending is not None:   # an interrupted batch still keeps the step before it
        settle(*pending)
      raise
    if pending is not None:
      settle(*pending)
    pending = dispatched
    params, opt_state = dispatched[1:3]
  if pending is not None:
    settle(*pending)
  return FitResult(params, opt_state, history, skipped)
