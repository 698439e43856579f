"""Shared plumbing of the experiment scripts: config from the command line, results, timing."""

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import time
from typing import Any, Callable, Dict, Sequence, Type, TypeVar

import jax

C = TypeVar("C")
ROOT = pathlib.Path(__file__).resolve().parent.parent


def parse_config(cls: Type[C], argv: Sequence[str] | None = None, smoke: C | None = None) -> C:
  """Builds a frozen dataclass config from ``--field value`` overrides.

  ``--smoke`` starts from ``smoke`` (a tiny config that runs in seconds)
  instead of the defaults; explicit overrides still apply on top.
  """
  parser = argparse.ArgumentParser(description=cls.__doc__)
  parser.add_argument("--smoke", action="store_true", help="tiny run, for the tests")
  fields = [f for f in dataclasses.fields(cls) if f.name != "smoke"]  # --smoke sets it
  for f in fields:
    kind = f.type if isinstance(f.type, type) else type(f.default)
    if kind is bool:
      parser.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"),
                          default=None, help=f"(default {f.default})")
    elif kind in (int, float, str):
      parser.add_argument(f"--{f.name}", type=kind, default=None, help=f"(default {f.default})")
    else:  # tuples and optionals: a Python literal
      import ast
      parser.add_argument(f"--{f.name}", type=ast.literal_eval, default=None,
                          help=f"(default {f.default!r})")
  args = parser.parse_args(argv)
  base = smoke if (args.smoke and smoke is not None) else cls()
  overrides = {f.name: getattr(args, f.name) for f in fields
               if getattr(args, f.name) is not None}
  return dataclasses.replace(base, **overrides)


def results_dir(name: str, out: str | None = None) -> pathlib.Path:
  path = pathlib.Path(out) if out else ROOT / "results" / name
  path.mkdir(parents=True, exist_ok=True)
  return path


def write_json(path: pathlib.Path, obj: Any) -> None:
  """Writes JSON atomically (write to a temporary file, then rename)."""
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
  os.replace(tmp, path)


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
  if name not in ("float32", "float64"):
    raise ValueError(f"dtype must be 'float32' or 'float64'; got {name!r}.")
  if name == "float64":
    jax.config.update("jax_enable_x64", True)
  return jnp.dtype(name)
