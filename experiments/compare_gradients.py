"""Manual BPTT against autodiff (and finite differences): errors and times, side by side.

For each configuration: the largest relative error of ``jaxrnn.bptt``
against ``jaxrnn.autodiff_bptt`` per parameter (float64), and the time of
each jitted loss-and-gradient call (float32, after warm-up, median; the two
methods are timed in turn in every repeat, and the speedup is the median of
the within-repeat ratios, so a slow phase of the machine cancels out).
A tiny model is also checked against a full central-difference gradient.

    python experiments/compare_gradients.py            # ~40 s on 2 CPU cores
    python experiments/compare_gradients.py --smoke    # a few seconds
"""

import dataclasses
import sys
from typing import Optional, Tuple

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxrnn  # noqa: E402

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import check_config, parse_config, results_dir, time_interleaved, write_json  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  T: int
  B: int
  D: int
  hidden: Tuple[int, ...]
  O: Optional[int]
  activation: str = "tanh"
  loss: str = "mse"
  many_to_one: bool = False
  tau_max: Optional[int] = None
  tau_b: Optional[int] = None
  ragged: bool = False                     # random lengths, resets and loss weights
  checkpoint_every: Optional[int] = None   # bptt's memory-efficient mode (manual side only)


CASES = (
    Case("tanh 1x32 mse", 100, 8, 4, (32,), 3),
    Case("sigmoid 16-8 xent m2o", 50, 8, 5, (16, 8), 4, "sigmoid", "xent", True),
    Case("relu 3 layers mse", 60, 4, 3, (16, 12, 8), 2, "relu"),
    Case("identity 1 unit (counting)", 10, 20, 1, (1,), None, "identity", "mse", True),
    Case("tanh TBPTT k=10", 100, 8, 4, (32,), 3, tau_max=10),
    Case("tanh per-output tau_max=5", 40, 8, 4, (32,), 3, tau_max=5, tau_b=1),
    Case("tanh 2 layers tau_b=5 tau_max=15 xent", 100, 8, 4, (24, 16), 5, loss="xent",
         tau_max=15, tau_b=5),
    Case("tanh lengths, resets, loss weights", 100, 8, 4, (32,), 3, ragged=True),
    Case("tanh 2 layers checkpoint_every=10", 100, 8, 4, (24, 16), 3, checkpoint_every=10),
)
# xent many-to-one, truncated, ragged and checkpointed: short, so they compile fast
SMOKE_CASES = tuple(dataclasses.replace(c, T=min(c.T, 12), B=min(c.B, 3))
                    for c in (CASES[1], CASES[4], CASES[7], CASES[8]))


@dataclasses.dataclass(frozen=True)
class Config:
  """Compare hand-written BPTT with jax.value_and_grad."""
  seed: int = 0
  repeats: int = 9
  smoke: bool = False
  out: str = ""

  def __post_init__(self):
    check_config(self, positive=("repeats",))


def _problem(case: Case, dtype, seed: int):
  params = jaxrnn.init_params(jax.random.key(seed), case.D, case.hidden, case.O,
                              activation=case.activation, dtype=dtype)
  rng = np.random.default_rng(seed)  # data from NumPy: no per-shape RNG compiles
  xs = jnp.asarray(rng.normal(size=(case.T, case.B, case.D)), dtype)
  out = case.O or case.hidden[-1]
  lead = (case.B,) if case.many_to_one else (case.T, case.B)
  if case.loss == "mse":
    targets = jnp.asarray(rng.normal(size=lead + (out,)), dtype)
  else:
    targets = jnp.asarray(rng.integers(0, out, size=lead), jnp.int32)
  kw = dict(loss=case.loss, many_to_one=case.many_to_one, tau_max=case.tau_max,
            tau_b=case.tau_b)
  if case.ragged:  # sequences of T/2..T steps, a reset in 2% of steps, weights in [0, 1)
    kw.update(lengths=jnp.asarray(rng.integers(case.T // 2, case.T + 1, size=case.B)),
              resets=jnp.asarray(rng.random((case.T, case.B)) < 0.02),
              loss_weights=jnp.asarray(rng.random((case.T, case.B)), dtype))
  return params, xs, targets, kw


def _rel_errors(grads, ref, floor: float = 1e-6):
  """Max relative error per parameter name (over layers): ``max|a-b| / max|b|``.

  The denominator is at least ``floor`` times the largest entry of the whole
  reference gradient: a parameter whose exact gradient is 0 (b_h in the
  counting case, where W_hh = -1 makes Σ_k W_hh^k vanish) is not divided by
  its own rounding noise.
  """
  ref_leaves = {jax.tree_util.keystr(path): b
                for path, b in jax.tree_util.tree_flatten_with_path(ref)[0]}
  scale = max(float(jnp.max(jnp.abs(b))) for b in ref_leaves.values())
  out = {}
  for path, a in jax.tree_util.tree_flatten_with_path(grads)[0]:
    b = ref_leaves[jax.tree_util.keystr(path)]
    err = float(jnp.max(jnp.abs(a - b)) / max(float(jnp.max(jnp.abs(b))), floor * scale, 1e-300))
    name = path[-1].name
    out[name] = max(out.get(name, 0.0), err)
  return out


def _finite_difference_check(seed: int, eps: float = 1e-6):
  """Full central-difference gradient of a tiny model against bptt (float64)."""
  case = Case("finite differences", 6, 2, 2, (3, 2), 2, "tanh", "xent")
  params, xs, targets, kw = _problem(case, jnp.float64, seed)
  f = jax.jit(lambda p: jaxrnn.loss(p, xs, targets, loss=kw["loss"]))
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  eye = np.eye(flat.size)
  fd = np.array([(f(unravel(flat + eps * e)) - f(unravel(flat - eps * e))) / (2 * eps)
                 for e in eye])
  _, grads = jaxrnn.bptt(params, xs, targets, **kw)
  return case, _rel_errors(grads, unravel(jnp.asarray(fd)))


def run(cfg: Config):
  import jax.flatten_util  # noqa: F401
  cases = SMOKE_CASES if cfg.smoke else CASES
  rows = []
  for case in cases:
    params, xs, targets, kw = _problem(case, jnp.float64, cfg.seed)
    manual_kw = dict(kw, checkpoint_every=case.checkpoint_every)
    loss_m, grads_m = jaxrnn.bptt(params, xs, targets, **manual_kw)
    loss_a, grads_a = jaxrnn.autodiff_bptt(params, xs, targets, **kw)
    errors = _rel_errors(grads_m, grads_a)
    errors["loss"] = float(abs(loss_m - loss_a) / abs(loss_a))
    p32, x32, t32 = jax.tree.map(
        lambda a: a.astype(jnp.float32) if a.dtype == jnp.float64 else a, (params, xs, targets))
    manual = jax.jit(lambda p, x, y: jaxrnn.bptt(p, x, y, **manual_kw))
    auto = jax.jit(lambda p, x, y: jaxrnn.autodiff_bptt(p, x, y, **kw))
    times, ratios = time_interleaved({"manual": lambda: manual(p32, x32, t32),
                                      "autodiff": lambda: auto(p32, x32, t32)},
                                     "manual", cfg.repeats)
    rows.append(dict(case=dataclasses.asdict(case), rel_error_vs_autodiff=errors,
                     time_manual_s=times["manual"], time_autodiff_s=times["autodiff"],
                     speedup=ratios["autodiff"]))
  fd_case, fd_err = _finite_difference_check(cfg.seed)
  rows.append(dict(case=dataclasses.asdict(fd_case), rel_error_vs_finite_differences=fd_err))
  return rows


def format_table(rows) -> str:
  names = ["W_xh", "W_hh", "b_h", "W_hy", "b_y"]
  head = (f"| {'configuration':<40} | " + " | ".join(f"{n:>8}" for n in names)
          + " | manual ms | autodiff ms | speedup |")
  lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
  for r in rows:
    err = r.get("rel_error_vs_autodiff") or r["rel_error_vs_finite_differences"]
    cells = [f"{err[n]:8.1e}" if n in err else f"{'-':>8}" for n in names]
    name = r["case"]["name"] + ("  [vs FD]" if "rel_error_vs_finite_differences" in r else "")
    if "time_manual_s" in r:
      times = (f"{1e3 * r['time_manual_s']:9.3f} | {1e3 * r['time_autodiff_s']:11.3f} | "
               f"{r['speedup']:6.2f}x")
    else:
      times = f"{'-':>9} | {'-':>11} | {'-':>7}"
    lines.append(f"| {name:<40} | " + " | ".join(cells) + f" | {times} |")
  return "\n".join(lines)


def main(argv=None):
  cfg = parse_config(Config, argv, smoke=Config(smoke=True, repeats=2))
  rows = run(cfg)
  table = format_table(rows)
  print("Max relative gradient error (float64) and time per loss+grad call (float32, jitted)\n")
  print(table)
  out = results_dir("compare_gradients", cfg.out or None)
  write_json(out / "metrics.json", dict(config=dataclasses.asdict(cfg), rows=rows,
                                        device=str(jax.devices()[0])))
  (out / "table.md").write_text(table + "\n")
  worst = max(max(r.get("rel_error_vs_autodiff", {}).values(), default=0) for r in rows)
  worst_fd = max(rows[-1]["rel_error_vs_finite_differences"].values())
  print(f"\nworst error vs autodiff: {worst:.1e}; vs finite differences: {worst_fd:.1e}")
  print(f"results written to {out}")
  return rows


if __name__ == "__main__":
  main()
