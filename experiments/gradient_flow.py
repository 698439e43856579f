"""How errors trickle back through time and layers: ‖∂L/∂h^l_t‖ for the last step's loss.

Recurrent matrices are scaled orthogonal matrices, W_hh = ρ Q, so every
eigenvalue has modulus ρ (the spectral radius) and every singular value is ρ.
Backpropagating through a step multiplies the delta by diag(f'(z)) W_hhᵀ, so
over a lag of n steps

    ‖δh_{t-n}‖ ≲ (ρ γ)^n ‖δh_t‖,     γ = max f'   (1 for tanh and identity, ¼ for sigmoid)

and log ‖δh_{t-n}‖ falls (or grows) at most at the rate log(ρ γ) per step:
exactly that rate for the identity activation, and at most that for tanh and
sigmoid, whose slopes f'(z) ≤ γ shrink as units saturate. The deltas come
from jaxrnn's manual backward pass (``jaxrnn.backward_deltas``). The rate is
fitted over the steps whose deltas the run's dtype can hold (normal, finite
numbers); in float32, ρ = 3 overflows them within a few dozen steps, and the
table says over how many steps each rate was fitted.

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
    # radii > 0: the predicted rate is log(ρ γ); T >= 2: a rate needs two lags
    check_config(self, positive=("T", "batch", "input_size", "hidden", "radii"),
                 non_negative=("input_scale",), choices=dict(grad=GRADS, dtype=DTYPES))
    if self.T < 2:
      raise ValueError(f"--T must be >= 2 (a rate is fitted over lags); got {self.T}.")
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


def delta_norms(d, dtype):
  """Mean over the batch of ‖δh^l_t‖, per layer and step, and where those are measurable.

  Args:
    d: the deltas, one ``[T, B, H_l]`` array per layer, in the run's ``dtype``.

  Returns:
    ``(norms, ok)``, both ``[L, T]``. The norms are taken in float64 with each
    vector scaled by its largest entry first, so squaring neither overflows
    nor underflows. ``ok`` marks the steps where every example's largest
    entry is a finite *normal* number of ``dtype``: past the range of the
    dtype the deltas are inf, zero or subnormal (a few bits), and a rate
    fitted there would measure the number format, not the network.
  """
  info = np.finfo(dtype)
  norms, ok = [], []
  for dl in d:
    a = np.abs(np.asarray(dl, np.float64))                      # [T, B, H]
    top = a.max(axis=-1)                                        # [T, B]
    safe = np.where((top > 0) & np.isfinite(top), top, 1.0)[..., None]
    norms.append((top * np.sqrt(np.sum((a / safe) ** 2, axis=-1))).mean(axis=1))
    ok.append(np.all((top >= info.tiny) & (top <= info.max), axis=1))
  return np.stack(norms), np.stack(ok)


def fit_rate(norms, ok):
  """Least-squares slope of log‖δh‖ against lag (per step) over the measurable steps:
  the decay (< 0) or growth (> 0) rate, or None when fewer than two steps are measurable."""
  lags = np.arange(len(norms))[::-1]              # lag 0 is the last step
  if np.count_nonzero(ok) < 2:
    return None
  return float(np.polyfit(lags[ok], np.log(norms[ok]), 1)[0])


def rate_text(row) -> str:
  """A table row's fitted rate, or why there is none."""
  if row["fitted_rate"] is None:
    return "out of range"
  return f"{row['fitted_rate']:.4f}"


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
      norms, ok = delta_norms(d, dtype)
      maps[f"{act} rho={rho}"] = norms                               # [L, T]
      table.append(dict(activation=act, rho=rho, gamma=gamma,
                        fitted_rate=fit_rate(norms[-1], ok[-1]),
                        fitted_steps=int(np.count_nonzero(ok[-1])),
                        predicted_rate=float(np.log(rho * gamma))))
  metrics = dict(rates=table)
  # a row with no fitted rate (its deltas left the dtype's range) fails its target
  exact = [r for r in table if r["activation"] == "identity"]
  bounded = [r for r in table if r["activation"] != "identity"]
  metrics["targets"] = {}
  if exact:
    metrics["targets"]["identity: fitted rate = log(ρ) (within 1e-6)"] = all(
        r["fitted_rate"] is not None and abs(r["fitted_rate"] - r["predicted_rate"]) < 1e-6
        for r in exact)
  if bounded:
    names = ", ".join(dict.fromkeys(r["activation"] for r in bounded))
    metrics["targets"][f"{names}: fitted rate <= log(ρ·γ) (+0.01)"] = all(
        r["fitted_rate"] is not None and r["fitted_rate"] <= r["predicted_rate"] + 0.01
        for r in bounded)
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
                  label=f"ρ={r['rho']}: fit {rate_text(r)}, log(ργ) {r['predicted_rate']:+.3f}")
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
  print(f"{'activation':>10} {'ρ':>5} {'γ':>5} {'fitted rate':>12} {'log(ργ)':>9}  fitted over")
  for r in metrics["rates"]:
    print(f"{r['activation']:>10} {r['rho']:>5} {r['gamma']:>5} {rate_text(r):>12} "
          f"{r['predicted_rate']:>9.4f}  {r['fitted_steps']} of {cfg.T} steps")
  print(f"targets: {metrics['targets']}; results in {out}")
  return metrics


if __name__ == "__main__":
  main()
