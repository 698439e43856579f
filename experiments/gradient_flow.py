"""How errors trickle back through time and layers: ‖∂L/∂h^l_t‖ for the last step's loss.

Recurrent matrices are scaled orthogonal matrices, W_hh = ρ Q, so every
eigenvalue has modulus ρ (the spectral radius) and every singular value is ρ.
Backpropagating through a step multiplies the delta by diag(f'(z)) W_hhᵀ, so
over a lag of n steps

    ‖δh_{t-n}‖ ≲ (ρ γ)^n ‖δh_t‖,     γ = max f'   (1 for tanh and identity, ¼ for sigmoid)

and log ‖δh_{t-n}‖ falls (or grows) at most at the rate log(ρ γ) per step:
exactly that rate for the identity activation, and at most that for tanh and
sigmoid, whose slopes f'(z) ≤ γ shrink as units saturate. The deltas come
from jaxrnn's manual backward pass (``jaxrnn.backward_deltas``).

    python experiments/gradient_flow.py [--grad autodiff] [--smoke]
"""

import dataclasses
import sys
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxrnn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import GRADS, DTYPES, check_config, dtype_of, parse_config, pyplot, results_dir, write_json  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
  """Delta norms over layers × time for several spectral radii and activations."""
  grad: str = "manual"          # manual (backward_deltas) | autodiff (grad w.r.t. perturbations)
  seed: int = 0
  T: int = 30
  batch: int = 8
  input_size: int = 4
  hidden: Tuple[int, ...] = (32, 32, 32)
  radii: Tuple[float, ...] = (0.5, 1.0, 1.5, 3.0)
  activations: Tuple[str, ...] = ("tanh", "sigmoid", "identity")
  input_scale: float = 0.1      # small inputs: units start away from saturation
  dtype: str = "float64"        # identity with ρ = 3 grows like 3^T
  smoke: bool = False
  out: str = ""

  def __post_init__(self):
    check_config(self, positive=("T", "batch", "input_size", "hidden"),
                 non_negative=("radii", "input_scale"),
                 choices=dict(grad=GRADS, dtype=DTYPES))
    if not self.activations or not set(self.activations) <= set(jaxrnn.ACTIVATIONS):
      raise ValueError(f"--activations must be a non-empty tuple of {sorted(jaxrnn.ACTIVATIONS)}; "
                       f"got {self.activations!r}.")


SMOKE = Config(T=6, hidden=(4, 4), radii=(0.5, 3.0), activations=("tanh", "identity"),
               smoke=True)


def make_params(cfg: Config, activation: str, rho: float, dtype):
  p = jaxrnn.init_params(jax.random.key(cfg.seed), cfg.input_size, cfg.hidden, 1,
                         activation=activation, dtype=dtype)
  return p._replace(layers=tuple(l._replace(W_hh=rho * l.W_hh) for l in p.layers))


def deltas_autodiff(params, xs, targets):
  """The same deltas by jax.grad: dL/d(perturbation added to each h^l_t) at zero."""
  def loss_with(eps):
    # forward with an additive perturbation on each layer's states, layer by layer
    f = jaxrnn.ACTIVATIONS[params.activation].fn
    inp = xs
    for l, layer in enumerate(params.layers):
      def step(h, inp_t):
        x_t, e_t = inp_t
        h = f(x_t @ layer.W_xh + h @ layer.W_hh + layer.b_h[None]) + e_t
        return h, h
      _, inp = jax.lax.scan(step, jnp.zeros_like(eps[l][0]), (inp, eps[l]))
    y = inp[-1] @ params.readout.W_hy + params.readout.b_y[None]
    return 0.5 * jnp.sum((y - targets) ** 2) / xs.shape[1]
  eps = tuple(jnp.zeros((xs.shape[0], xs.shape[1], h), xs.dtype) for h in
              (l.W_hh.shape[0] for l in params.layers))
  return jax.grad(loss_with)(eps)


def fit_rate(norms):
  """Least-squares slope of log‖δh‖ against lag (per step): the decay (<0) or growth rate."""
  lags = np.arange(len(norms))[::-1]              # lag 0 is the last step
  return float(np.polyfit(lags, np.log(norms), 1)[0])


def run(cfg: Config):
  dtype = dtype_of(cfg.dtype)
  rng = np.random.default_rng(cfg.seed)
  xs = jnp.asarray(cfg.input_scale * rng.normal(size=(cfg.T, cfg.batch, cfg.input_size)), dtype)
  targets = jnp.asarray(rng.normal(size=(cfg.batch, 1)), dtype)
  maps, table = {}, []
  for act in cfg.activations:
    gamma = jaxrnn.ACTIVATIONS[act].max_slope
    for rho in cfg.radii:
      params = make_params(cfg, act, rho, dtype)
      if cfg.grad == "manual":
        d = jaxrnn.backward_deltas(params, xs, targets, many_to_one=True)
      else:
        d = jax.jit(deltas_autodiff)(params, xs, targets)
      norms = np.stack([np.asarray(jnp.linalg.norm(dl, axis=-1).mean(axis=1)) for dl in d])
      maps[f"{act} rho={rho}"] = norms                               # [L, T]
      fitted = fit_rate(norms[-1])
      table.append(dict(activation=act, rho=rho, gamma=gamma, fitted_rate=fitted,
                        predicted_rate=float(np.log(rho * gamma))))
  metrics = dict(rates=table)
  metrics["targets"] = {
      "identity: fitted rate = log(ρ) (within 1e-6)": all(
          abs(r["fitted_rate"] - r["predicted_rate"]) < 1e-6
          for r in table if r["activation"] == "identity"),
      "tanh, sigmoid: fitted rate <= log(ρ·γ) (+0.01)": all(
          r["fitted_rate"] <= r["predicted_rate"] + 0.01
          for r in table if r["activation"] != "identity")}
  return metrics, maps


def plot(path, cfg, metrics, maps):
  plt = pyplot()
  A, R = len(cfg.activations), len(cfg.radii)
  fig = plt.figure(figsize=(3.2 * R + 4.5, 2.1 * A + 1))
  grid = fig.add_gridspec(A, R + 1, width_ratios=[1] * R + [1.5])
  for i, act in enumerate(cfg.activations):
    for j, rho in enumerate(cfg.radii):
      ax = fig.add_subplot(grid[i, j])
      m = np.log10(maps[f"{act} rho={rho}"] + 1e-300)
      im = ax.imshow(m, aspect="auto", cmap="magma", origin="lower",
                     extent=(-0.5, cfg.T - 0.5, 0.5, len(cfg.hidden) + 0.5))
      fig.colorbar(im, ax=ax, pad=0.02)
      ax.set_title(f"{act}, ρ = {rho}", fontsize=9)
      ax.set_yticks(range(1, len(cfg.hidden) + 1))
      if j == 0:
        ax.set_ylabel("layer")
      if i == A - 1:
        ax.set_xlabel("time step")
    ax = fig.add_subplot(grid[i, R])
    for r in (r for r in metrics["rates"] if r["activation"] == act):
      norms = maps[f"{act} rho={r['rho']}"][-1]
      lags = np.arange(cfg.T)[::-1]
      line, = ax.semilogy(lags, norms, ".", ms=3)
      ax.semilogy(lags, norms[-1] * np.exp(r["predicted_rate"] * lags), "--", lw=0.8,
                  color=line.get_color(),
                  label=f"ρ={r['rho']}: fit {r['fitted_rate']:+.3f}, log(ργ) {r['predicted_rate']:+.3f}")
    ax.set(xlabel="lag n", ylabel="‖δh^L‖", title=f"{act}: rate per step", ylim=(1e-30, 1e30))
    ax.legend(fontsize=6)
  fig.suptitle("log10 ‖∂L/∂h^l_t‖ for the last step's loss (dashes: the spectral-radius rate)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  cfg = parse_config(Config, argv, smoke=SMOKE)
  out = results_dir("gradient_flow", cfg.out or None)
  metrics, maps = run(cfg)
  metrics["config"] = dataclasses.asdict(cfg)
  metrics["norms"] = {k: v.tolist() for k, v in maps.items()}
  write_json(out / "metrics.json", metrics)
  plot(out / "gradient_flow.png", cfg, metrics, maps)
  print(f"{'activation':>10} {'ρ':>5} {'γ':>5} {'fitted rate':>12} {'log(ργ)':>9}")
  for r in metrics["rates"]:
    print(f"{r['activation']:>10} {r['rho']:>5} {r['gamma']:>5} {r['fitted_rate']:>12.4f} "
          f"{r['predicted_rate']:>9.4f}")
  print(f"targets: {metrics['targets']}; results in {out}")
  return metrics


if __name__ == "__main__":
  main()
