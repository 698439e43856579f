"""Next-value prediction on a noisy sine, then closed-loop generation.

A sine over [0, 4π] sampled at 100 points plus N(0, 0.05²) noise is cut into
75 windows of 25 values; a tanh RNN (32 units, linear readout) reads a window
and predicts the next value (many-to-one, ½·sum of squared errors, Adam).
Then the network generates on its own: seeded with 25 clean points, it feeds
each prediction back as the next input for 75 steps, and 75 more past the end
of the training interval (t > 4π), where it has seen no data.

    python experiments/sine.py [--grad autodiff] [--smoke]
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
  """Predict and generate a sine with a one-layer tanh RNN."""
  grad: str = "manual"        # manual | autodiff
  seed: int = 0
  n_points: int = 100         # sin over [0, 4π] at 100 points
  noise: float = 0.05         # standard deviation of the added noise
  window: int = 25            # input window; 100 - 25 = 75 samples
  hidden: int = 32
  steps: int = 600            # full-batch Adam steps; more overfits the noise (½·SSE << noise floor)
  lr: float = 0.01            # peak of a cosine decay to 1% of it
  dtype: str = "float32"
  checkpoint_every: int = 100  # steps between training checkpoints (in <out>/checkpoints)
  resume: bool = False         # continue from the newest intact checkpoint
  smoke: bool = False
  out: str = ""

  def __post_init__(self):
    check_config(self, positive=("n_points", "window", "hidden", "steps", "checkpoint_every"),
                 non_negative=("noise", "lr"), choices=dict(grad=GRADS, dtype=DTYPES))
    if self.window >= self.n_points:
      raise ValueError(f"--window must be < --n_points; got {self.window} >= {self.n_points}.")


SMOKE = Config(steps=20, smoke=True)


def run(cfg: Config, out=None):
  dtype = dtype_of(cfg.dtype)
  rng = np.random.default_rng(cfg.seed)
  t = np.linspace(0.0, 4 * np.pi, cfg.n_points)
  clean = np.sin(t)
  noisy = clean + rng.normal(0.0, cfg.noise, size=cfg.n_points)
  n = cfg.n_points - cfg.window
  idx = np.arange(cfg.window)[:, None] + np.arange(n)[None, :]       # [window, n]
  xs = jnp.asarray(noisy[idx][:, :, None], dtype)                    # [T=25, B=75, 1]
  ys = jnp.asarray(noisy[cfg.window:][:, None], dtype)               # [75, 1]

  params = jaxrnn.init_params(jax.random.key(cfg.seed), 1, (cfg.hidden,), 1,
                              activation="tanh", dtype=dtype)
  opt = optax.adam(optax.cosine_decay_schedule(cfg.lr, cfg.steps, alpha=0.01))
  # jaxrnn's mse is ½ Σ (ŷ − y)² averaged over the batch: ½·SSE / B. Adam is
  # invariant to that constant factor; reported losses are converted to ½·SSE.
  step = jaxrnn.make_train_step(opt, method=cfg.grad, loss="mse", many_to_one=True)
  ckpt = None if out is None else out / "checkpoints"
  if ckpt is not None and not cfg.resume and ckpt.exists():
    for old in ckpt.glob("ckpt_*"):  # a fresh run starts fresh
      old.unlink()
  fit = jaxrnn.fit(step, params, opt.init(params), lambda i: dict(xs=xs, targets=ys),
                   cfg.steps, log_every=max(1, cfg.steps // 100), desc="sine",
                   checkpoint_dir=ckpt, checkpoint_every=cfg.checkpoint_every,
                   resume=cfg.resume)
  half_sse = [l * n for l in fit.history["loss"]]

  @jax.jit
  def generate(params, seed):
    """Closed loop: predict, append, slide the window; 2·75 steps in one scan."""
    def body(win, _):
      y = jaxrnn.forward(params, win[:, None, None])[2][-1, 0, 0]
      return jnp.concatenate([win[1:], y[None]]), y
    return jax.lax.scan(body, seed, None, length=2 * n)[1]

  rollout = np.asarray(generate(fit.params, jnp.asarray(clean[:cfg.window], dtype)))
  generated, beyond = rollout[:n], rollout[n:]
  t_beyond = t[-1] + (t[1] - t[0]) * np.arange(1, n + 1)  # the same spacing, past 4π
  rmse = float(np.sqrt(np.mean((generated - clean[cfg.window:]) ** 2)))
  one_step = np.asarray(jaxrnn.forward(fit.params, xs)[2][-1, :, 0])
  metrics = dict(generation_rmse=rmse, final_half_sse=half_sse[-1],
                 one_step_rmse_vs_clean=float(np.sqrt(np.mean((one_step - clean[cfg.window:]) ** 2))),
                 # the generated curve against the noisy points: near 0 would mean it
                 # replays the training noise instead of a sine
                 generation_rmse_vs_noisy=float(np.sqrt(np.mean(
                     (generated - noisy[cfg.window:]) ** 2))),
                 beyond_training_rmse=float(np.sqrt(np.mean((beyond - np.sin(t_beyond)) ** 2))),
                 targets={"generation RMSE < 0.1": bool(rmse < 0.1)})
  curves = dict(t=t, clean=clean, noisy=noisy, generated=generated, one_step=one_step,
                t_beyond=t_beyond, beyond=beyond,
                history=fit.history, half_sse=half_sse, params=fit.params)
  return metrics, curves


def plot(path, cfg, metrics, c):
  plt = pyplot()
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw=dict(width_ratios=[2, 1]))
  ax.plot(c["t"], c["noisy"], ".", color="0.6", label="noisy training input")
  ax.plot(c["t"], c["clean"], "k-", lw=1, label="true sine")
  ax.plot(c["t"][cfg.window:], c["generated"], "r-", lw=2,
          label=f"closed-loop generation (RMSE {metrics['generation_rmse']:.3f})")
  ax.plot(c["t_beyond"], np.sin(c["t_beyond"]), "k--", lw=1)
  ax.plot(c["t_beyond"], c["beyond"], "r--", lw=2,
          label=f"... past the training data (RMSE {metrics['beyond_training_rmse']:.3f})")
  for x, text in ((c["t"][cfg.window - 1], "generation starts"), (c["t"][-1], "no data")):
    ax.axvline(x, color="k", ls=":", lw=1)
    ax.text(x, 1.12, " " + text, fontsize=8)
  ax.set(xlabel="t", ylabel="value", ylim=(-1.2, 1.25),
         title="seeded with 25 clean points, then on its own")
  ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4, fontsize=8)
  ax2.semilogy(c["history"]["step"], c["half_sse"])
  ax2.set(xlabel="Adam step", ylabel="½·sum of squared errors", title="training")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  cfg = parse_config(Config, argv, smoke=SMOKE)
  out = results_dir("sine", cfg.out or None)
  metrics, curves = run(cfg, out)
  metrics["config"] = dataclasses.asdict(cfg)
  metrics["generated"] = curves["generated"].tolist()
  metrics["generated_beyond_training"] = curves["beyond"].tolist()
  write_json(out / "metrics.json", metrics)
  np.savez(out / "params.npz", *[np.asarray(x) for x in jax.tree.leaves(curves["params"])])
  plot(out / "sine.png", cfg, metrics, curves)
  print(f"final ½·SSE {metrics['final_half_sse']:.4f}; one-step RMSE vs clean sine "
        f"{metrics['one_step_rmse_vs_clean']:.4f}; closed-loop generation RMSE "
        f"{metrics['generation_rmse']:.4f} (against the noisy points "
        f"{metrics['generation_rmse_vs_noisy']:.4f}), past the training data "
        f"{metrics['beyond_training_rmse']:.4f}")
  print(f"targets: {metrics['targets']}; results in {out}")
  return metrics


if __name__ == "__main__":
  main()
