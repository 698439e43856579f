"""Training checkpoints: atomic writes, integrity checks, resume from the newest good one.

A checkpoint is one ``.npz`` file per step holding every array leaf of the
training state, a JSON record of everything else (step, metrics so far, skip
counters, data position) and a SHA-256 over all of it. Leaves of a dtype that
NumPy's format lacks (bfloat16 and the other ml_dtypes) are stored as their
raw bits and restored bit for bit; typed PRNG keys (``jax.random.key``, as in
the state of ``optax.noisy_sgd``) as their key data, rewrapped on loading with
their implementation. The file is written to a temporary file,
flushed to disk, then renamed into place, so a crash leaves either the old
set of checkpoints or the new one, never half a file under a checkpoint's
name. Loading walks from the newest checkpoint back and skips,
with a warning naming the file and the reason, any that is truncated,
corrupted or does not fit the expected state.
"""

import hashlib
import io
import json
import os
import pathlib
import re
import warnings
from typing import Any, Dict, Optional, Tuple, Union

import jax
import numpy as np

from jaxrnn._src import checks

Path = Union[str, os.PathLike]   # a checkpoint folder

PATTERN = "ckpt_{:09d}.npz"
_NAME = re.compile(r"ckpt_(\d+)\.npz")
_FOREIGN = "_leaf_dtypes"   # record key: dtype names of leaves stored as raw bits
_KEYS = "_leaf_key_impls"   # record key: PRNG implementations of leaves stored as key data


def _folder(directory: Path) -> pathlib.Path:
  """``directory`` as a Path; a NotADirectoryError if something else has its name."""
  path = pathlib.Path(directory)
  if path.exists() and not path.is_dir():
    raise NotADirectoryError(f"checkpoint directory {str(path)!r} is a file, not a folder.")
  return path


def _checkpoints(directory: pathlib.Path):
  """The checkpoint files in ``directory``, oldest step first (by number, not by name)."""
  steps = {p: int(m[1]) for p in directory.glob("ckpt_*.npz") if (m := _NAME.fullmatch(p.name))}
  return sorted(steps, key=steps.__getitem__)


def _is_key(x) -> bool:
  """Whether ``x`` is a typed PRNG key array (``jax.random.key``), which NumPy cannot hold."""
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _spec(x) -> str:
  """A state leaf's dtype and shape, e.g. ``float32[2, 3]`` or ``key<fry>[]``."""
  a = x if _is_key(x) else np.asarray(x)
  return f"{a.dtype}{list(a.shape)}"


def _digest(arrays, record: str) -> str:
  h = hashlib.sha256(record.encode())
  for a in arrays:
    h.update(str((a.dtype.str, a.shape)).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def save(directory: Path, step: int, state: Any, record: Dict[str, Any],
         keep: int = 3) -> pathlib.Path:
  """Atomically writes the checkpoint of ``step``; keeps the newest ``keep`` files.

  Args:
    directory: folder of the checkpoints (created if needed).
    step: the number of completed steps (names the file).
    state: a pytree of arrays (params, optimizer state, ...).
    record: JSON-serialisable data (metrics so far, counters, data position).
    keep: how many checkpoints to keep (>= 1).
  """
  step = checks.check_int("step", step, minimum=0)
  keep = checks.check_int("keep", keep)
  directory = _folder(directory)
  leaves = jax.tree.leaves(state)
  record = dict(record, step=step)
  impls = [str(jax.random.key_impl(x)) if _is_key(x) else None for x in leaves]
  if any(impls):
    record[_KEYS] = impls
  arrays = [np.asarray(jax.random.key_data(x) if impl else x) for x, impl in zip(leaves, impls)]
  # NumPy's format has no bfloat16 (or other ml_dtypes): such a leaf is stored
  # as its raw bits, and its dtype's name in the record.
  foreign = [None if np.dtype(a.dtype.str) == a.dtype else a.dtype.name for a in arrays]
  if any(foreign):
    record[_FOREIGN] = foreign
    arrays = [a if name is None else a.view(f"u{a.dtype.itemsize}")
              for a, name in zip(arrays, foreign)]
  try:
    text = json.dumps(record, sort_keys=True)
  except TypeError as e:
    raise TypeError(f"record must be JSON-serialisable (numbers, strings, lists, dicts): "
                    f"{e}.") from e
  buf = io.BytesIO()
  np.savez(buf, *arrays, record=np.array(text), digest=np.array(_digest(arrays, text)))
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / PATTERN.format(step)
  tmp = path.with_suffix(".tmp")
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  for old in _checkpoints(directory)[:-keep]:
    old.unlink()
  return path


def start_from(directory: Path, template: Any, *, resume: bool = True,
               num_steps: Optional[int] = None) -> Optional[Tuple[Any, Dict[str, Any]]]:
  """Where a training loop that checkpoints into ``directory`` starts.

  What :func:`jaxrnn.fit` calls; a loop of your own (a stream, say) calls it
  before its first step and then :func:`save` as it goes.

  Args:
    directory: the loop's checkpoint folder (it need not exist).
    template: a pytree like the saved state (for example the fresh one).
    resume: continue from the newest checkpoint that fits ``template``.
    num_steps: the steps the loop will run in all, if known.

  Returns:
    ``(state, record)`` to continue from, or None: start fresh.

  Raises:
    ValueError: naming the files, when the loop would mix its checkpoints
      with an earlier run's: ``resume`` is False and checkpoints exist, or it
      is True and none of them fits ``template`` (each one's reason is in a
      warning). Checkpoints are kept by step number, so an earlier run's at
      higher steps would outrank this run's: each new one would be deleted
      as the oldest, and a later resume would continue the earlier run.
      Also when the checkpoint to resume is past ``num_steps``.
  """
  found = load_latest(directory, template) if resume else None
  if found is not None:
    step = found[1]["step"]
    if num_steps is not None and step > num_steps:  # more steps than this run asks for
      raise ValueError(f"checkpoint_dir {str(directory)!r}: its newest usable checkpoint is at "
                       f"step {step}, past num_steps={num_steps}. Ask for at least {step} "
                       f"steps, or start over elsewhere.")
    return found
  existing = [p.name for p in _checkpoints(_folder(directory))]
  if existing:
    shown = ", ".join(existing[-3:]) + (f" and {len(existing) - 3} more" if len(existing) > 3
                                        else "")
    why = ("none of its checkpoints fits this training state (the warnings say why for each)"
           if resume else "it holds an earlier run's checkpoints and resume=False")
    raise ValueError(f"checkpoint_dir {str(directory)!r}: {why}: {shown}. This run's "
                     f"checkpoints would be mixed with them (the highest step wins on resume). "
                     f"Delete them or choose another folder"
                     f"{'' if resume else ', or continue that run with resume=True'}.")
  return None


def load_latest(directory: Path, template: Any) -> Optional[Tuple[Any, Dict[str, Any]]]:
  """``(state, record)`` of the newest intact checkpoint, or None if there is none.

  ``template`` is a pytree with the structure, shapes and dtypes of the saved
  state (for example the freshly initialised one).
  """
  directory = _folder(directory)
  leaves, treedef = jax.tree.flatten(template)
  paths = _checkpoints(directory)
  for n, path in reversed(list(enumerate(paths))):
    try:
      # The file is opened here: np.load leaves it open when the zip is unreadable.
      with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
        text = str(z["record"])
        saved = sum(1 for name in z.files if name.startswith("arr_"))
        if saved != len(leaves):   # another optimizer or model
          raise ValueError(f"it holds {saved} arrays, the state has {len(leaves)}")
        arrays = [z[f"arr_{i}"] for i in range(len(leaves))]
        if str(z["digest"]) != _digest(arrays, text):
          raise ValueError("its checksum does not match its contents")
      record = json.loads(text)
      foreign = record.pop(_FOREIGN, [None] * len(arrays))
      impls = record.pop(_KEYS, [None] * len(arrays))
      arrays = [a if name is None else a.view(jax.numpy.dtype(name))
                for a, name in zip(arrays, foreign)]
      arrays = [a if impl is None else jax.random.wrap_key_data(a, impl=impl)
                for a, impl in zip(arrays, impls)]
      for i, (a, t) in enumerate(zip(arrays, leaves)):
        if _spec(a) != _spec(t):
          raise ValueError(f"array {i} is {_spec(a)}, the state expects {_spec(t)}")
      return jax.tree.unflatten(treedef, [jax.numpy.asarray(a) for a in arrays]), record
    except Exception as e:  # noqa: BLE001 - any unreadable file means: try the previous one
      then = "Falling back to the previous checkpoint." if n else "It was the oldest one."
      warnings.warn(f"skipping checkpoint {path}: {type(e).__name__}: {e}. {then}",
                    RuntimeWarning, stacklevel=2)
  return None
