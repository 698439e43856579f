"""How far back must the gradient reach? A delay task with a known lag, swept over tau_max.

Task: the input is a random ±1 sequence and the target at step t is the input
seen k steps earlier, y_t = x_{t-k} (steps t < k are not scored). A tanh RNN
whose recurrent weights start near zero (0.05 × orthogonal, so it has no
"reservoir" memory to read from at first) must *learn* to carry x_{t-k} for k
steps. We sweep tau_max from 1 to 2k for

* per-output truncation (tau_b = 1: every loss term reaches back tau_max steps), and
* chunked truncation (tau_b = tau_max: classic truncated BPTT),

training several seeds at once (``jax.vmap`` over the train step) and
reporting the median test error. With per-output truncation, learning
reliably succeeds once the window of the loss at step t contains step t-k.
Shorter windows can sometimes still succeed, by "bootstrapping": the constant
state at the window's start already carries a little of x_{t-k}, and a
truncated gradient can learn to keep it. The seeds show how often.

    python experiments/truncation.py [--grad autodiff] [--smoke]
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxrnn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import GRADS, DTYPES, check_config, dtype_of, parse_config, pyplot, results_dir, write_json  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
  """Delay task y_t = x_{t-k}: final error against tau_max."""
  grad: str = "manual"          # manual | autodiff
  seed: int = 0
  lag: int = 4                  # k
  T: int = 30
  batch: int = 32
  hidden: int = 16
  w_hh_scale: float = 0.05      # recurrent weights start at this × orthogonal
  steps: int = 500
  lr: float = 0.01
  n_seeds: int = 5              # trained together with jax.vmap
  success: float = 0.1          # RMSE below which a run counts as solved (predicting 0 gives 1)
  dtype: str = "float32"
  smoke: bool = False
  out: str = ""

  def __post_init__(self):
    # lag >= 1: the sweep is tau_max = 1 .. 2 * lag, empty for lag 0
    check_config(self, positive=("lag", "T", "batch", "hidden", "steps", "n_seeds", "success"),
                 non_negative=("w_hh_scale", "lr"), choices=dict(grad=GRADS, dtype=DTYPES))
    if self.lag >= self.T:
      raise ValueError(f"--lag must be < --T; got {self.lag} >= {self.T}.")


SMOKE = Config(steps=5, n_seeds=2, lag=1, T=6, hidden=4, smoke=True)


def make_batch(cfg: Config, key, dtype):
  """A fresh batch from a key (generated on the device, inside the training scan)."""
  x = jax.random.rademacher(key, (cfg.T, cfg.batch, 1), dtype)
  y = jnp.concatenate([jnp.zeros((cfg.lag, cfg.batch, 1), dtype), x[:-cfg.lag]], axis=0)
  w = (jnp.arange(cfg.T) >= cfg.lag).astype(dtype)[:, None] * jnp.ones((1, cfg.batch), dtype)
  return dict(xs=x, targets=y, loss_weights=w)


def stack(trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def init(cfg: Config, seed: int, dtype):
  p = jaxrnn.init_params(jax.random.key(cfg.seed * 1000 + seed), 1, (cfg.hidden,), 1,
                         dtype=dtype)
  layer = p.layers[0]
  return p._replace(layers=(layer._replace(W_hh=cfg.w_hh_scale * layer.W_hh),))


def rmse(params, batch):
  ys = jaxrnn.forward(params, batch["xs"])[2]
  w = batch["loss_weights"][:, :, None]
  return jnp.sqrt(jnp.sum(w * (ys - batch["targets"]) ** 2) / jnp.sum(w))


def train(cfg: Config, tau_max: int, tau_b: int, dtype):
  """All seeds at once (vmap), all steps in one compiled lax.scan; returns test RMSEs."""
  opt = optax.adam(cfg.lr)
  step = jaxrnn.make_train_step(opt, method=cfg.grad, loss="mse", tau_max=tau_max,
                                tau_b=tau_b)

  def one_seed(params, key):
    def body(carry, i):
      params, opt_state = carry
      params, opt_state, _ = step(params, opt_state,
                                  **make_batch(cfg, jax.random.fold_in(key, i), dtype))
      return (params, opt_state), None
    (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), jnp.arange(cfg.steps))
    return rmse(params, make_batch(cfg, jax.random.fold_in(key, 2**31 - 1), dtype))

  params = stack([init(cfg, s, dtype) for s in range(cfg.n_seeds)])
  keys = jax.random.split(jax.random.key(cfg.seed), cfg.n_seeds)
  return np.asarray(jax.jit(jax.vmap(one_seed))(params, keys))


def run(cfg: Config):
  dtype = dtype_of(cfg.dtype)
  k = cfg.lag
  taus = list(range(1, 2 * k + 1))
  sweeps = {}
  from tqdm.auto import tqdm
  for scheme in ("per-output (tau_b=1)", "chunked (tau_b=tau_max)"):
    rows = []
    for tau in tqdm(taus, desc=scheme, disable=None, leave=False):
      errors = train(cfg, tau, 1 if scheme.startswith("per") else tau, dtype)
      rows.append(dict(tau_max=tau, errors=errors.tolist(), median=float(np.median(errors)),
                       solved=float(np.mean(errors < cfg.success))))
    sweeps[scheme] = rows
  per = sweeps["per-output (tau_b=1)"]
  metrics = dict(lag=k, sweeps=sweeps)
  metrics["targets"] = {
      "per-output: every seed solves the task once tau_max > lag":
          all(r["solved"] == 1.0 for r in per if r["tau_max"] > k),
      "per-output: the median run fails while tau_max < lag":
          all(r["median"] > cfg.success for r in per if r["tau_max"] < k)}
  return metrics


def plot(path, cfg, metrics):
  plt = pyplot()
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
  for (scheme, rows), color in zip(metrics["sweeps"].items(), ["tab:blue", "tab:orange"]):
    taus = [r["tau_max"] for r in rows]
    for j, r in enumerate(rows):
      ax.plot([r["tau_max"]] * len(r["errors"]), r["errors"], ".", color=color, alpha=0.35)
    ax.plot(taus, [r["median"] for r in rows], "o-", color=color, label=f"{scheme}, median")
    ax2.plot(taus, [r["solved"] for r in rows], "o-", color=color, label=scheme)
  for a in (ax, ax2):
    a.axvline(metrics["lag"], color="k", ls=":", lw=1)
    a.set_xlabel("tau_max (truncation length)")
  ax.axhline(cfg.success, color="0.5", ls="--", lw=1)
  ax.set(yscale="log", ylabel="test RMSE", title=f"delay task y_t = x_(t-{metrics['lag']})")
  ax2.set(ylabel=f"fraction of {cfg.n_seeds} seeds with RMSE < {cfg.success}",
          title="success rate", ylim=(-0.05, 1.05))
  ax.legend(fontsize=8)
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  cfg = parse_config(Config, argv, smoke=SMOKE)
  out = results_dir("truncation", cfg.out or None)
  metrics = run(cfg)
  metrics["config"] = dataclasses.asdict(cfg)
  write_json(out / "metrics.json", metrics)
  plot(out / "truncation.png", cfg, metrics)
  print(f"lag k = {cfg.lag}; median test RMSE (fraction of {cfg.n_seeds} seeds solved):")
  for scheme, rows in metrics["sweeps"].items():
    print(f"  {scheme:>26}: " + "  ".join(f"{r['tau_max']}: {r['median']:.3f} ({r['solved']:.1f})"
                                          for r in rows))
  print(f"targets: {metrics['targets']}; results in {out}")
  return metrics


if __name__ == "__main__":
  main()
