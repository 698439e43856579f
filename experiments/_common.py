"""Shared plumbing of the experiment scripts: config from the command line, results, timing."""

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import pathlib
import re
import statistics
import time
import tokenize
import typing
from typing import Any, Callable, Dict, Sequence, Type, TypeVar

import jax

C = TypeVar("C")
GRADS = ("manual", "autodiff")     # --grad: jaxrnn.bptt or jaxrnn.autodiff_bptt
DTYPES = ("float32", "float64")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def parse_config(cls: Type[C], argv: Sequence[str] | None = None, smoke: C | None = None) -> C:
  """Builds a frozen dataclass config from ``--field value`` overrides.

  ``--smoke`` starts from ``smoke`` (a tiny config that runs in seconds)
  instead of the defaults; explicit overrides still apply on top.
  """
  parser = argparse.ArgumentParser(description=cls.__doc__)
  parser.add_argument("--smoke", action="store_true", help="tiny run, for the tests")
  fields = [f for f in dataclasses.fields(cls) if f.name != "smoke"]  # --smoke sets it
  comments = field_comments(cls)
  for f in fields:
    kind = f.type if isinstance(f.type, type) else type(f.default)
    simple = kind in (bool, int, float, str)
    default = f"(default {f.default if simple else repr(f.default)})"
    helptext = f"{comments[f.name]} {default}" if f.name in comments else default
    helptext = helptext.replace("%", "%%")       # argparse formats help with %
    if kind is bool:
      parser.add_argument(f"--{f.name}", type=_boolean, default=None, help=helptext)
    elif simple:
      parser.add_argument(f"--{f.name}", type=kind, default=None, help=helptext)
    else:  # tuples and optionals: a Python literal like the default
      parser.add_argument(f"--{f.name}", type=_literal_like(f.default, f.type), default=None,
                          help=helptext)
  args = parser.parse_args(argv)
  base = smoke if (args.smoke and smoke is not None) else cls()
  overrides = {f.name: getattr(args, f.name) for f in fields
               if getattr(args, f.name) is not None}
  try:
    return dataclasses.replace(base, **overrides)
  except ValueError as e:  # a config's own checks (__post_init__): a usage error
    parser.error(str(e))


def field_comments(cls) -> Dict[str, str]:
  """Each field's comments in the dataclass's source, for ``--help``: the comment lines
  right above the field, then the comment at the end of its line."""
  try:
    lines = inspect.getsource(cls).splitlines()
  except (OSError, TypeError):  # no source (an interactive session, say)
    return {}
  comment = {}                  # line index -> (text, whether the line is only a comment)
  for tok in tokenize.generate_tokens(iter(line + "\n" for line in lines).__next__):
    if tok.type == tokenize.COMMENT:
      comment[tok.start[0] - 1] = (tok.string.lstrip("#").strip(),
                                   tok.line.lstrip().startswith("#"))
  names = {f.name for f in dataclasses.fields(cls)}
  found = {}
  for i, line in enumerate(lines):
    m = re.match(r"\s+(\w+)\s*:", line)
    if m is None or m[1] not in names or comment.get(i, ("", False))[1]:
      continue
    above, j = [], i - 1
    while comment.get(j, ("", False))[1]:
      above.insert(0, comment[j][0])
      j -= 1
    text = " ".join(above + ([comment[i][0]] if i in comment else []))
    if text:
      found[m[1]] = text
  return found


def _boolean(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"expected true or false (1/0, yes/no); got {text!r}")


def _literal_like(default, annotation):
  """An argparse type: a Python literal of the default's kind (a tuple of numbers, ...);
  ``Tuple[float, float]`` also fixes the length."""
  args = typing.get_args(annotation)
  length = len(args) if args and typing.get_origin(annotation) is tuple and ... not in args \
      else None

  def parse(text: str):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      raise argparse.ArgumentTypeError(f"expected a Python literal like {default!r}; "
                                       f"got {text!r}") from None
    if isinstance(default, tuple):
      value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
      kinds = {type(x) for x in default} or {int, float, str}
      number = kinds <= {int, float}
      if not all(type(x) in kinds or (number and type(x) is int) for x in value):
        raise argparse.ArgumentTypeError(f"expected a tuple like {default!r}; got {text!r}")
      if length is not None and len(value) != length:
        raise argparse.ArgumentTypeError(f"expected a tuple of {length} like {default!r}; "
                                         f"got {text!r}")
    return value
  parse.__name__ = "literal"  # argparse names the type in its messages
  return parse


def check_config(cfg, *, positive: Sequence[str] = (), non_negative: Sequence[str] = (),
                 choices: Dict[str, Sequence[Any]] | None = None) -> None:
  """Raises a ValueError naming ``--field`` when a config value is out of range.

  ``positive``/``non_negative``: fields that must be > 0 / >= 0 (for a tuple,
  every element, and the tuple must not be empty); ``choices``: field ->
  allowed values.
  """
  for names, sign, ok in ((positive, "> 0", lambda v: v > 0),
                          (non_negative, ">= 0", lambda v: v >= 0)):
    for name in names:
      value = getattr(cfg, name)
      values = value if isinstance(value, tuple) else (value,)
      if not values or not all(ok(v) for v in values):
        what = "a non-empty tuple with every element " if isinstance(value, tuple) else ""
        raise ValueError(f"--{name} must be {what}{sign}; got {value!r}.")
  for name, allowed in (choices or {}).items():
    if getattr(cfg, name) not in allowed:
      raise ValueError(f"--{name} must be one of {tuple(allowed)}; "
                       f"got {getattr(cfg, name)!r}.")


def results_dir(name: str, out: str | None = None) -> pathlib.Path:
  path = pathlib.Path(out) if out else ROOT / "results" / name
  path.mkdir(parents=True, exist_ok=True)
  return path


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Writes JSON atomically (write to a temporary file, then rename).

  JSON has no NaN or infinity (Python's ``json`` would write the invalid
  tokens ``NaN`` and ``Infinity``, which strict readers reject): they are
  written as ``null``, like a missing value.
  """
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(_finite_or_null(obj), indent=2, default=float, allow_nan=False)
                 + "\n")
  os.replace(tmp, path)


def _finite_or_null(obj: Any) -> Any:
  """``obj`` with every non-finite float (also NumPy's) replaced by None."""
  if isinstance(obj, dict):
    return {k: _finite_or_null(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite_or_null(v) for v in obj]
  if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):   # NumPy arrays, scalars
    return _finite_or_null(obj.tolist())
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def block(x):
  """Waits for a JAX result or a PyTorch tensor (on a GPU, until its stream is done)."""
  if not hasattr(x, "detach"):
    return jax.block_until_ready(x)
  if x.is_cuda:
    import torch
    torch.cuda.synchronize(x.device)
  return x.detach()


def calls_per_sample(fn: Callable[[], Any], min_time: float = 0.05) -> int:
  """Warms ``fn`` up, then doubles the calls per timing sample until one lasts min_time."""
  block(fn())
  n = 1
  while True:
    t0 = time.perf_counter()
    for _ in range(n):
      block(fn())
    if time.perf_counter() - t0 >= min_time or n >= 4096:
      return n
    n *= 2


def time_interleaved(methods: Dict[str, Callable[[], Any]], base: str, repeats: int = 5,
                     min_time: float = 0.05):
  """Times zero-argument calls in turn: every repeat times every method once.

  Returns ``(median seconds per call, median over repeats of time / time of
  base)`` as two dicts keyed like ``methods``. The ratios are taken within
  each repeat, where all methods ran within a second of each other, so a
  slow phase of a shared machine cancels out of them.
  """
  calls = {name: calls_per_sample(f, min_time) for name, f in methods.items()}
  samples = {name: [] for name in methods}
  for _ in range(repeats):
    for name, f in methods.items():
      t0 = time.perf_counter()
      for _ in range(calls[name]):
        block(f())
      samples[name].append((time.perf_counter() - t0) / calls[name])
  ratios = {name: statistics.median(t / b for t, b in zip(s, samples[base]))
            for name, s in samples.items()}
  return {name: statistics.median(s) for name, s in samples.items()}, ratios


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend (no display needed)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def dtype_of(name: str):
  import jax.numpy as jnp
  if name not in DTYPES:
    raise ValueError(f"dtype must be 'float32' or 'float64'; got {name!r}.")
  if name == "float64":
    jax.config.update("jax_enable_x64", True)
  return jnp.dtype(name)
