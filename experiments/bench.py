"""Benchmark: jaxrnn.bptt against autodiff, Flax and PyTorch, with memory and FLOP rates.

For each point (T, B, D, H, layers) of the grid, float32, tanh, mse on every
step with a readout to O = D outputs: the median time of one jitted
loss-and-gradient call of each method (after warm-up, all methods
interleaved in every repeat), the ratio of each to ``jaxrnn.bptt``, the
GFLOP/s of ``jaxrnn.bptt`` beside the matrix-multiply peak measured in the
same run, and XLA's temporary memory (``compiled.memory_analysis()``) of
every JAX method. Flax and PyTorch are optional (``pip install -e ".[bench]"``
and ``pip install torch``): a missing peer is reported as skipped. Where JAX
runs on a GPU, PyTorch runs there too (``nn.RNN`` on cuDNN).

    python experiments/bench.py                       # the full grid, a few minutes
    python experiments/bench.py --smoke               # seconds
    python experiments/bench.py --precision float32   # no TF32 on a GPU, in any library
    python experiments/bench.py --heap_mib 30         # XLA's temp memory in heaps of <= 30 MiB
    python experiments/bench.py --points "(2,)"       # only the grid's H = 512 row

``--heap_mib``: every JAX method (and the peak matmul) is compiled with XLA's
``xla_multiheap_size_constraint_per_heap``, which splits a program's temporary
memory into several allocations of at most that size (one larger buffer still
gets its own). On Linux with glibc, an allocation under 32 MiB comes from the
heap once one of its size has been freed, while a larger one is mapped afresh
and page-faulted on every call (docs/performance.md).
"""

import dataclasses
import importlib
import math
import os
import platform
import sys
import time
from typing import Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxrnn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import check_config, parse_config, results_dir, time_interleaved, write_json  # noqa: E402

# (T, B, D, H, layers), and optional keyword options of bptt
GRID = (
    ((100, 32, 32, 128, 1), {}),
    ((1000, 16, 16, 64, 1), {}),
    ((200, 64, 256, 512, 1), {}),
    ((1000, 1, 8, 32, 1), {}),
    ((10000, 8, 8, 32, 1), {}),
    ((200, 32, 64, 256, 3), {}),
    ((1000, 16, 16, 64, 1), dict(tau_max=50, tau_b=50)),
    ((1000, 16, 16, 64, 1), dict(many_to_one=True)),
    # k = 100 = √T, the textbook segment; k = 200 spends more of the 10% memory budget
    ((10000, 8, 8, 32, 1), dict(checkpoint_every=100)),
    ((10000, 8, 8, 32, 1), dict(checkpoint_every=200)),
)
SMOKE_GRID = (((20, 4, 3, 8, 1), {}), ((16, 2, 3, 8, 2), dict(tau_max=4)),
              ((16, 2, 3, 8, 1), dict(many_to_one=True)), ((40, 2, 3, 8, 1), dict(checkpoint_every=7)))


@dataclasses.dataclass(frozen=True)
class Config:
  """Time and memory of RNN loss-and-gradient methods."""
  repeats: int = 11
  min_time: float = 0.1       # seconds per timing sample (calls are batched up to this)
  peers: bool = True          # include Flax and PyTorch when installed
  smoke: bool = False
  out: str = ""
  # float32 matrix products: "default" leaves each library its own default (on
  # NVIDIA GPUs since Ampere both JAX and cuDNN then use TF32 tensor cores);
  # "float32" asks every library for full float32 products.
  precision: str = "default"
  # > 0: compile every JAX method with XLA's temporary memory split into heaps
  # of at most this many MiB (see the module docstring); 0: XLA's default.
  heap_mib: float = 0.0
  # Rows of the grid to run, by 0-based index (``--points "(2, 5)"``); empty: all.
  # With a subset, the summary's geometric means are over those rows only.
  points: Tuple[int, ...] = ()

  def __post_init__(self):
    check_config(self, positive=("repeats", "min_time"), non_negative=("heap_mib",),
                 choices=dict(precision=PRECISIONS))
    select_points(SMOKE_GRID if self.smoke else GRID, self.points)  # names --points if bad


# Environment variables that change the timings without changing the program
# (glibc's allocator, XLA's flags, a preloaded allocator); recorded with the results.
ENVIRONMENT = ("GLIBC_TUNABLES", "XLA_FLAGS", "LD_PRELOAD", "MALLOC_ARENA_MAX")

PRECISIONS = ("default", "float32")


def set_precision(precision: str) -> None:
  """Applies Config.precision to JAX and, if installed, PyTorch."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}.")
  if precision == "float32":
    jax.config.update("jax_default_matmul_precision", "float32")
    try:
      import torch
    except ImportError:
      return
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def compiler_options(heap_mib: float) -> Optional[Dict[str, int]]:
  """XLA options for every JAX method's compile (None: the defaults)."""
  if heap_mib < 0:
    raise ValueError(f"heap_mib must be >= 0; got {heap_mib}.")
  if heap_mib == 0:
    return None
  return {"xla_multiheap_size_constraint_per_heap": int(heap_mib * (1 << 20))}


def select_points(grid, points):
  """The rows of ``grid`` named by ``points`` (0-based indices, in that order; empty: all)."""
  if isinstance(points, int):   # --points 2
    points = (points,)
  if not points:
    return tuple(grid)
  bad = [i for i in points
         if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(grid)]
  if bad or len(set(points)) != len(points):
    raise ValueError(f"--points must be distinct row indices in [0, {len(grid)}) of the "
                     f"{'smoke ' if grid is SMOKE_GRID else ''}grid; got {tuple(points)!r}.")
  return tuple(grid[i] for i in points)


def environment() -> Dict[str, str]:
  """The variables of ``ENVIRONMENT`` set in this process, to record with the results."""
  return {k: os.environ[k] for k in ENVIRONMENT if os.environ.get(k)}


def environment_text(env: Dict[str, str]) -> str:
  """``", NAME=value"`` for each recorded variable, for a table's machine line."""
  return "".join(f", {k}={v}" for k, v in env.items())


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


def _label(dims, opts):
  T, B, D, H, L = dims
  extra = ", ".join(f"{k}={v}" for k, v in opts.items())
  return f"T={T} B={B} D={D} H={H} L={L}" + (f" ({extra})" if extra else "")


def flops(dims, opts) -> float:
  """Matrix-multiply FLOPs of one loss-and-gradient call (2 per multiply-add).

  Forward: input projections, recurrences, readout. Backward: the same three
  again for the deltas and once more for the weight gradients, except the
  delta to the inputs of layer 1, which nobody needs.
  """
  T, B, D, H, L = dims
  O = D
  fwd = sum(2 * T * B * ((D if l == 0 else H) * H + H * H) for l in range(L)) + 2 * T * B * H * O
  return 3 * fwd - 2 * T * B * D * H


def peak_matmul(n: int = 2048, options=None):
  """A zero-argument call doing one float32 n×n matmul, and its FLOPs."""
  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda a: a @ a).lower(a).compile(compiler_options=options)
  jax.block_until_ready(mm(a))
  return (lambda: mm(a)), 2 * n ** 3


def measure_peak(call, fl: float) -> float:
  """Best of 5 calls of :func:`peak_matmul`'s ``call`` (``fl`` FLOPs each), in GFLOP/s."""
  samples = []
  for _ in range(5):
    t0 = time.perf_counter()
    jax.block_until_ready(call())
    samples.append(time.perf_counter() - t0)
  return fl / min(samples) / 1e9


def _data(dims, opts):
  """float32 inputs [T, B, D] and targets ([B, D] many-to-one, else [T, B, D])."""
  T, B, D, _, _ = dims
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.normal(size=(T, B, D)), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(B, D) if opts.get("many_to_one") else (T, B, D)),
                   jnp.float32)
  return xs, ys


CHECKPOINTED = "bptt checkpoint_every="   # + k: the checkpointed mode's name


def checkpointed_name(k: int) -> str:
  """The name under which the bench reports ``bptt`` with ``checkpoint_every=k``."""
  return f"{CHECKPOINTED}{k}"


def compiled_methods(dims, opts, options=None, names=None):
  """``(name -> compiled loss-and-gradient of jaxrnn, its arguments)``; ``options``: XLA's.

  The methods: ``jaxrnn.bptt`` and ``jaxrnn.autodiff_bptt`` with ``opts``, and
  with ``checkpoint_every`` in ``opts`` the checkpointed ``bptt``
  (:func:`checkpointed_name`) beside them; ``names``: compile only these.
  """
  T, B, D, H, L = dims
  params = jaxrnn.init_params(jax.random.key(0), D, (H,) * L, D, dtype=jnp.float32)
  xs, ys = _data(dims, opts)
  opts = dict(opts)
  k = opts.pop("checkpoint_every", None)
  methods = [("jaxrnn.bptt", jaxrnn.bptt, opts), ("jaxrnn.autodiff_bptt", jaxrnn.autodiff_bptt, opts)]
  if k:  # the memory-efficient mode beside full storage
    methods.append((checkpointed_name(k), jaxrnn.bptt, dict(opts, checkpoint_every=k)))
  unknown = set(names or ()) - {name for name, _, _ in methods}
  if unknown:
    raise ValueError(f"names must be among {[m[0] for m in methods]}; got {sorted(unknown)}.")
  out = {}
  for name, fn, kw in methods:
    if names is not None and name not in names:
      continue
    f = jax.jit(lambda p, x, y, fn=fn, kw=kw: fn(p, x, y, **kw))
    out[name] = f.lower(params, xs, ys).compile(compiler_options=options)
  return out, (params, xs, ys)


def jax_methods(dims, opts, options=None) -> Dict[str, Tuple[Callable, Optional[int]]]:
  """name -> (zero-argument call, XLA temp bytes); ``options``: XLA compiler options."""
  compiled, args = compiled_methods(dims, opts, options)
  return {name: ((lambda c=c: c(*args)), c.memory_analysis().temp_size_in_bytes)
          for name, c in compiled.items()}


PEAK = "matmul peak"


class NotInstalled(Exception):
  pass


def _peer(module: str, opts):
  """The peer library's module, or None where it has nothing to compare with
  (truncated BPTT, checkpointing). Raises NotInstalled if it is missing."""
  try:
    mod = importlib.import_module(module)
  except ImportError as e:
    raise NotInstalled from e
  return None if opts.get("tau_max") or opts.get("checkpoint_every") else mod


def flax_method(dims, opts, options=None):
  nn = _peer("flax.linen", opts)
  if nn is None:
    return None
  T, B, D, H, L = dims

  class Model(nn.Module):
    @nn.compact
    def __call__(self, xs):
      h = xs
      for _ in range(L):
        h = nn.RNN(nn.SimpleCell(features=H), time_major=True)(h)
      return nn.Dense(D)(h)

  model = Model()
  xs, ys = _data(dims, opts)
  many_to_one = opts.get("many_to_one", False)
  variables = model.init(jax.random.key(0), xs)

  def loss(v):
    o = model.apply(v, xs)
    o = o[-1] if many_to_one else o
    return 0.5 * jnp.sum((o - ys) ** 2) / B

  compiled = jax.jit(jax.value_and_grad(loss)).lower(variables).compile(compiler_options=options)
  return (lambda: compiled(variables)), compiled.memory_analysis().temp_size_in_bytes


def torch_device(torch) -> str:
  """PyTorch's device: the GPU where JAX runs on one (and PyTorch sees it), else the CPU."""
  return "cuda" if on_gpu() and torch.cuda.is_available() else "cpu"


def torch_name() -> str:
  """The PyTorch peer's name in the results: "torch nn.RNN (CPU)" or "(cuDNN)"."""
  try:
    import torch
  except ImportError:
    return "torch nn.RNN (CPU)"
  return "torch nn.RNN (cuDNN)" if torch_device(torch) == "cuda" else "torch nn.RNN (CPU)"


def torch_method(dims, opts, options=None):
  del options   # XLA's; PyTorch has its own allocator
  torch = _peer("torch", opts)
  if torch is None:
    return None
  T, B, D, H, L = dims
  dev = torch_device(torch)
  torch.set_num_threads(os.cpu_count() or 1)
  torch.manual_seed(0)
  rnn = torch.nn.RNN(D, H, num_layers=L, nonlinearity="tanh", device=dev)  # time-major [T, B, D]
  head = torch.nn.Linear(H, D, device=dev)
  xs = torch.randn(T, B, D, device=dev)
  many_to_one = opts.get("many_to_one", False)
  ys = torch.randn(B, D, device=dev) if many_to_one else torch.randn(T, B, D, device=dev)

  def call():
    for p in (*rnn.parameters(), *head.parameters()):
      p.grad = None
    o = head(rnn(xs)[0])
    o = o[-1] if many_to_one else o
    loss = 0.5 * ((o - ys) ** 2).sum() / B
    loss.backward()
    return loss

  return call, None


def cpu_model() -> str:
  """The CPU's model name where the OS tells it (Linux), else platform.processor()."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "?"


def run(cfg: Config):
  set_precision(cfg.precision)
  options = compiler_options(cfg.heap_mib)
  grid = select_points(SMOKE_GRID if cfg.smoke else GRID, cfg.points)
  # A GPU needs a larger product than a CPU to reach its peak.
  peak_n = 512 if cfg.smoke else (8192 if on_gpu() else 2048)
  peak_call, peak_flops = peak_matmul(peak_n, options)
  peak = measure_peak(peak_call, peak_flops)
  rows, skipped = [], set()
  for dims, opts in grid:
    methods = jax_methods(dims, opts, options)
    if cfg.peers:
      for name, make in (("flax nn.RNN(SimpleCell)", flax_method),
                         (torch_name(), torch_method)):
        try:
          m = make(dims, opts, options)
        except NotInstalled:
          skipped.add(name)
          continue
        if m is not None:
          methods[name] = m
    # The matmul peak is timed in the same repeats too, so that bptt's rate
    # and the peak are medians over the same moments of a shared machine.
    timed = {k: v[0] for k, v in methods.items()}
    timed[PEAK] = peak_call
    times, ratios = time_interleaved(timed, "jaxrnn.bptt", cfg.repeats, cfg.min_time)
    row_peak = peak_flops / times.pop(PEAK) / 1e9
    ratios.pop(PEAK)
    gflops = flops(dims, opts) / times["jaxrnn.bptt"] / 1e9
    rows.append(dict(point=_label(dims, opts), dims=dims, options=opts,
                     time_s=times, ratio_to_bptt=ratios,
                     temp_bytes={k: v[1] for k, v in methods.items() if v[1] is not None},
                     bptt_gflops=gflops, peak_gflops=row_peak,
                     bptt_fraction_of_peak=gflops / row_peak,
                     bptt_fraction_of_best_peak=gflops / peak))
    print(format_row(rows[-1]), flush=True)
  return dict(peak_gflops=peak, peak_n=peak_n, rows=rows, skipped=sorted(skipped),
              machine=dict(platform=platform.platform(), processor=cpu_model(),
                           cpus=os.cpu_count(), device=str(jax.devices()[0]),
                           device_kind=jax.devices()[0].device_kind,
                           jax=jax.__version__, precision=cfg.precision,
                           heap_mib=cfg.heap_mib, environment=environment()))


def format_row(r):
  return (f"{r['point']}: " + ", ".join(f"{k} {1e3 * t:.2f} ms ({r['ratio_to_bptt'][k]:.2f}x)"
                                        for k, t in r["time_s"].items())
          + f"; bptt {r['bptt_gflops']:.1f} GFLOP/s")


def geomean(xs):
  xs = [x for x in xs if x is not None]
  return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summarise(result):
  rows = result["rows"]
  grid = [r for r in rows if not r["options"]]  # the six plain grid points
  def ratios(name, subset):
    return [r["ratio_to_bptt"].get(name) for r in subset]
  s = {}
  for name in ("jaxrnn.autodiff_bptt", "flax nn.RNN(SimpleCell)", "torch nn.RNN (CPU)",
               "torch nn.RNN (cuDNN)"):
    rs = [x for x in ratios(name, grid) if x is not None]
    if rs:
      s[name] = dict(geomean_speedup=geomean(rs), min_speedup=min(rs))
  mem = [r["temp_bytes"]["jaxrnn.bptt"] / r["temp_bytes"]["jaxrnn.autodiff_bptt"] for r in rows]
  s["max_temp_memory_ratio_vs_autodiff"] = max(mem)
  s["checkpoint"] = [dict(point=r["point"], mode=n, time_ratio=r["ratio_to_bptt"][n],
                          temp_memory_ratio=r["temp_bytes"][n] / r["temp_bytes"]["jaxrnn.bptt"])
                     for r in rows for n in r["time_s"] if n.startswith(CHECKPOINTED)]
  h512 = [r for r in rows if r["dims"][3] == 512]
  if h512:
    s["fraction_of_peak_at_H512"] = h512[0]["bptt_fraction_of_peak"]
    s["fraction_of_best_peak_at_H512"] = h512[0]["bptt_fraction_of_best_peak"]
  return s


def markdown(result) -> str:
  rows = result["rows"]
  # One "ckpt" column for every checkpointed mode: a row has one at most (its own k).
  column = lambda n: CHECKPOINTED if n.startswith(CHECKPOINTED) else n
  names = list(dict.fromkeys(column(k) for r in rows for k in r["time_s"]))
  short = {"jaxrnn.bptt": "bptt", "jaxrnn.autodiff_bptt": "autodiff",
           "flax nn.RNN(SimpleCell)": "flax", "torch nn.RNN (CPU)": "torch",
           "torch nn.RNN (cuDNN)": "torch", CHECKPOINTED: "ckpt"}
  head = ("| point | " + " | ".join(f"{short[n]} ms" for n in names) + " | "
          + " | ".join(f"{short[n]}/bptt" for n in names[1:])
          + " | bptt GFLOP/s (% of peak) | peak GFLOP/s | temp MB: " + " / ".join(
              short[n] for n in names if not n.startswith("torch")) + " |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    r = dict(r, **{key: {column(n): v for n, v in r[key].items()}
                   for key in ("time_s", "ratio_to_bptt", "temp_bytes")})
    t = [f"{1e3 * r['time_s'][n]:.2f}" if n in r["time_s"] else "–" for n in names]
    ratio = [f"{r['ratio_to_bptt'][n]:.2f}x" if n in r["time_s"] else "–" for n in names[1:]]
    mem = [f"{r['temp_bytes'][n] / 1e6:.1f}" if n in r["temp_bytes"] else "–"
           for n in names if not n.startswith("torch")]
    lines.append(f"| {r['point']} | " + " | ".join(t) + " | " + " | ".join(ratio)
                 + f" | {r['bptt_gflops']:.1f} ({100 * r['bptt_fraction_of_peak']:.0f}%)"
                 + f" | {r['peak_gflops']:.0f} | "
                 + " / ".join(mem) + " |")
  m = result["machine"]
  torch_names = [n for n in names if n.startswith("torch")]
  lines += ["", f"Matrix-multiply peak (float32, {result['peak_n']}² matmul): the 'peak' column is its "
            f"median rate timed in the same repeats as the row's methods; the best of 5 at the start "
            f"was {result['peak_gflops']:.1f} GFLOP/s. Machine: {m['cpus']} CPUs "
            f"({m.get('processor') or '?'}), {m['platform']}, "
            f"{m['device']} ({m.get('device_kind', '?')}), jax {m['jax']}, float32 products: "
            f"{m.get('precision', 'default')}"
            + (f", XLA temp memory in heaps of <= {m['heap_mib']:g} MiB (every JAX method)"
               if m.get("heap_mib") else "")
            + (f", torch = {torch_names[0]}" if torch_names else "")
            + environment_text(m.get("environment", {}))
            + ". Ratios > 1 mean jaxrnn.bptt is faster; "
            "each is the median over repeats of the ratio within a repeat."]
  points = result.get("config", {}).get("points")
  if points:
    lines.append(f"Only rows {points} of the grid (--points); the summary covers those rows.")
  if result["skipped"]:
    lines.append(f"Skipped (not installed): {', '.join(result['skipped'])}.")
  return "\n".join(lines)


def main(argv=None):
  cfg = parse_config(Config, argv, smoke=Config(smoke=True, repeats=2, min_time=0.01))
  result = run(cfg)
  result["summary"] = summarise(result)
  result["config"] = dataclasses.asdict(cfg)
  out = results_dir("bench", cfg.out or None)
  write_json(out / "bench.json", result)
  table = markdown(result)
  (out / "bench.md").write_text(table + "\n")
  print("\n" + table + "\n")
  print("summary:", result["summary"])
  return result


if __name__ == "__main__":
  main()
