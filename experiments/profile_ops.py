"""Where one jitted loss-and-gradient call spends its time, operation by operation (XLA:CPU).

Compiles the bench's loss-and-gradient call of one method at one point
(float32, tanh, mse on every step, a readout to O = D outputs: the program
``experiments/bench.py`` times), traces ``calls`` calls with
``jax.profiler``, and sums the events of XLA's CPU threads by operation:
how often each ran per call, for how long each time, and its share of the
call. Also: the call's wall time untraced, XLA's temporary memory and the
process's page faults per call.

    python experiments/profile_ops.py                     # bptt at the bench's H = 512 point
    python experiments/profile_ops.py --method autodiff   # jaxrnn.autodiff_bptt there
    python experiments/profile_ops.py --T 1000 --B 16 --D 16 --H 64
    python experiments/profile_ops.py --smoke             # seconds

Reading the table:

- An operation that runs once per loop step has ``runs per call`` = T (or
  T − 1: the reverse loop peels step 0).
- ``ynn_fusion*`` are matrix products in XLA's matrix library; ``while*``
  are the time loops. A loop that runs all its steps on one thread shows
  as one event that contains its body's operations; a loop whose steps move
  between threads (XLA's runtime continues it wherever a step's last
  operation finished) shows only its start. Shares of the call therefore
  overlap for ``while*``, and for ``SlinkyThreadPool::Await`` (the time a
  product's calling thread waits for its helper thread, inside the product).
- ``dot_general*`` are products XLA runs in Eigen, which it starts and
  leaves running on the thread pool: their events cover the start only.
  ``unattributed`` (the wall time less every other operation's events) holds
  that work, the runtime's own costs and the page faults of memory mapped
  for the call outside any operation.

Results: ``results/profile/<point>.json``, ``.md`` and a bar chart ``.png``.
The events are XLA:CPU's thread events; on a GPU the script stops with an
error rather than report host threads as the device's time.
"""

import dataclasses
import glob
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from typing import Dict, List

import jax

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import bench  # noqa: E402
from _common import check_config, parse_config, pyplot, results_dir, write_json  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
  """Per-operation time of one jitted loss-and-gradient call (XLA:CPU)."""
  T: int = 200
  B: int = 64
  D: int = 256
  H: int = 512
  layers: int = 1
  method: str = "bptt"          # "bptt" or "autodiff"
  tau_max: int = 0              # > 0: truncated BPTT, with tau_b
  tau_b: int = 0
  many_to_one: bool = False
  checkpoint_every: int = 0     # > 0 (method "bptt"): the checkpointed mode
  calls: int = 5                # traced calls (and as many untraced, for the wall time)
  top: int = 25                 # rows of the table
  smoke: bool = False
  out: str = ""

  def __post_init__(self):
    check_config(self, positive=("T", "B", "D", "H", "layers", "calls", "top"),
                 non_negative=("tau_max", "tau_b", "checkpoint_every"),
                 choices=dict(method=METHODS))
    if self.tau_max and self.tau_b and self.tau_max < self.tau_b:
      raise ValueError(f"--tau_max must be >= --tau_b; got {self.tau_max} < {self.tau_b}.")
    if self.checkpoint_every and self.method != "bptt":
      raise ValueError("--checkpoint_every is an option of method 'bptt'; "
                       f"got method {self.method!r}.")


METHODS = ("bptt", "autodiff")
# Events of the runtime's own bookkeeping, not operations of the program.
_BOOKKEEPING = ("ThunkExecutor::", "ThreadpoolListener::", "end: ")
# Events that contain other operations' events (see the module docstring).
_NESTED = ("while", "SlinkyThreadPool::Await")


def check(cfg: Config) -> None:
  """What the config's own checks can't see: the backend and the profiler."""
  if jax.default_backend() != "cpu":
    raise RuntimeError("profile_ops.py sums XLA:CPU's thread events; JAX runs on "
                       f"{jax.default_backend()!r} here. Run it with JAX_PLATFORMS=cpu.")
  if getattr(jax.profiler, "ProfileData", None) is None:   # None where jaxlib lacks it
    raise RuntimeError(f"jax.profiler.ProfileData is missing from jax {jax.__version__}; "
                       "profile_ops.py needs a newer jax.")


def _options(cfg: Config) -> Dict:
  opts = {}
  if cfg.tau_max:
    opts.update(tau_max=cfg.tau_max, tau_b=cfg.tau_b or cfg.tau_max)
  if cfg.many_to_one:
    opts["many_to_one"] = True
  if cfg.checkpoint_every:
    opts["checkpoint_every"] = cfg.checkpoint_every
  return opts


def _method_name(cfg: Config) -> str:
  if cfg.method == "autodiff":
    return "jaxrnn.autodiff_bptt"
  return bench.checkpointed_name(cfg.checkpoint_every) if cfg.checkpoint_every else "jaxrnn.bptt"


def hlo_ops(hlo_text: str) -> Dict[str, Dict[str, str]]:
  """``op name -> {"shape", "source"}`` from a compiled program's HLO text.

  ``shape``: the operation's result; ``source``: the JAX operation it came
  from (the HLO's ``op_name`` metadata, without the ``jit(...)/`` prefixes).
  """
  ops = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) (\w[\w-]*)\((.*)$", hlo_text, re.M):
    name, shape, opcode, rest = m.groups()
    src = re.search(r'op_name="([^"]*)"', rest)
    source = src.group(1) if src else opcode
    source = re.sub(r"(jit\([^)]*\)/)+", "", source)
    ops[name] = dict(shape=re.sub(r"\{[^}]*\}", "", shape), source=source)
  return ops


def op_times(xspace_path: str, calls: int) -> List[Dict]:
  """Per-operation totals of XLA's CPU thread events in one trace, per call."""
  data = jax.profiler.ProfileData.from_file(xspace_path)
  totals: Dict[str, List[float]] = {}
  for plane in data.planes:
    if not plane.name.startswith("/host:CPU"):
      continue
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):   # XLA's worker and client threads
        continue
      for ev in line.events:
        if ev.name.startswith(_BOOKKEEPING):
          continue
        t = totals.setdefault(ev.name, [0, 0.0])
        t[0] += 1
        t[1] += ev.duration_ns
  return [dict(op=name, runs_per_call=n / calls, us_per_run=ns / n / 1e3,
               ms_per_call=ns / calls / 1e6)
          for name, (n, ns) in sorted(totals.items(), key=lambda kv: -kv[1][1])]


def _page_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run(cfg: Config) -> Dict:
  check(cfg)
  dims = (cfg.T, cfg.B, cfg.D, cfg.H, cfg.layers)
  opts = _options(cfg)
  name = _method_name(cfg)
  compiled, args = bench.compiled_methods(dims, opts, names=(name,))
  fn = compiled[name]
  for _ in range(2):                       # warm-up: first touches, thread pools
    jax.block_until_ready(fn(*args))
  walls, faults = [], _page_faults()
  for _ in range(cfg.calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    walls.append(time.perf_counter() - t0)
  faults = (_page_faults() - faults) / cfg.calls
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(cfg.calls):
        jax.block_until_ready(fn(*args))
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    if not paths:
      raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {trace_dir}.")
    rows = op_times(paths[-1], cfg.calls)
  wall = statistics.median(walls)
  info = hlo_ops(fn.as_text())
  for r in rows:
    r.update(info.get(r["op"], dict(shape="", source="")))
    r["share_of_call"] = r["ms_per_call"] / (wall * 1e3)
  attributed = sum(r["ms_per_call"] for r in rows if not r["op"].startswith(_NESTED))
  return dict(point=bench._label(dims, opts), method=name, dims=dims, options=opts,
              wall_ms=wall * 1e3, gflops=bench.flops(dims, opts) / wall / 1e9,
              temp_mb=fn.memory_analysis().temp_size_in_bytes / 1e6,
              page_faults_per_call=faults, ops=rows,
              unattributed_ms=wall * 1e3 - attributed,
              machine=dict(processor=bench.cpu_model(), cpus=os.cpu_count(),
                           jax=jax.__version__, environment=bench.environment()))


def markdown(result: Dict, top: int) -> str:
  lines = [f"**{result['method']}**, {result['point']} (float32): "
           f"{result['wall_ms']:.2f} ms per call untraced (median), "
           f"{result['gflops']:.1f} GFLOP/s, XLA temporary memory {result['temp_mb']:.1f} MB, "
           f"{result['page_faults_per_call']:.0f} page faults per call. "
           f"Machine: {result['machine']['cpus']} CPUs ({result['machine']['processor']}), "
           f"jax {result['machine']['jax']}"
           + bench.environment_text(result["machine"].get("environment", {}))
           + ".",
           "",
           "| op | from | result | runs per call | µs per run | ms per call | share of call |",
           "|---|---|---|---|---|---|---|"]
  for r in result["ops"][:top]:
    lines.append(f"| `{r['op']}` | {r['source'] or '–'} | {r['shape'] or '–'} "
                 f"| {r['runs_per_call']:.0f} | {r['us_per_run']:.1f} | {r['ms_per_call']:.2f} "
                 f"| {100 * r['share_of_call']:.1f}% |")
  lines += ["", f"Unattributed: {result['unattributed_ms']:.2f} ms per call (the wall time "
            "less the events of every operation but `while*` and `SlinkyThreadPool::Await`"
            + ("; below zero: the traced calls' events add up to more than the untraced "
               "call's wall time, from the tracer's own cost or operations overlapping on "
               "several threads" if result["unattributed_ms"] < 0 else "") + "). "
            "`while*` events contain their body's operations where the loop ran on one "
            "thread, and `SlinkyThreadPool::Await` lies inside a product: their shares overlap "
            "the others'. `dot_general*` run in Eigen after their event ends "
            "(experiments/profile_ops.py's docstring)."]
  return "\n".join(lines)


def plot(result: Dict, top: int, path) -> None:
  plt = pyplot()
  ops = result["ops"][:top][::-1]
  fig, ax = plt.subplots(figsize=(8, 0.3 * len(ops) + 1.2))
  ax.barh([r["op"] for r in ops], [r["ms_per_call"] for r in ops])
  ax.set_xlabel("ms per call")
  ax.set_title(f"{result['method']}, {result['point']}: {result['wall_ms']:.1f} ms per call",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _file_stem(result: Dict) -> str:
  return re.sub(r"[^A-Za-z0-9=._-]+", "_", f"{result['method']} {result['point']}").strip("_")


def main(argv=None):
  cfg = parse_config(Config, argv, smoke=Config(T=20, B=4, D=3, H=8, calls=2, smoke=True))
  result = run(cfg)
  result["config"] = dataclasses.asdict(cfg)
  out = results_dir("profile", cfg.out or None)
  stem = _file_stem(result)
  write_json(out / f"{stem}.json", result)
  table = markdown(result, cfg.top)
  (out / f"{stem}.md").write_text(table + "\n")
  plot(result, cfg.top, out / f"{stem}.png")
  print("\n" + table + "\n")
  return result


if __name__ == "__main__":
  main()
