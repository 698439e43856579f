"""The linear RNN that counts ones: two parameters, exploding gradients, and rprop.

State s_k = s_{k-1} w_rec + x_k w_x (identity activation, one unit, no bias,
no readout); the output is the last state and the loss is mean squared error
against the number of ones. The exact solution is w_x = w_rec = 1. The loss
surface is steep where |w_rec| > 1 (gradients grow like w_rec^T) and flat
where |w_rec| < 1, which is why sign-based rprop succeeds where SGD struggles.

    python experiments/counting.py [--grad autodiff] [--smoke]
"""

import dataclasses
import math
import sys
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxrnn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import GRADS, DTYPES, check_config, dtype_of, parse_config, pyplot, results_dir, write_json  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
  """Count the ones in bit strings with a two-parameter linear RNN."""
  grad: str = "manual"              # manual | autodiff
  seed: int = 0
  n_sequences: int = 20             # training set: 20 sequences ...
  length: int = 10                  # ... of 10 random bits
  start: Tuple[float, float] = (-1.5, 2.0)  # (w_x, w_rec) where every optimiser starts
  steps: int = 500
  rprop_lr: float = 0.01            # rprop's initial step size
  adam_lr: float = 0.05
  # The wall at w_rec = 2 is steep (gradient ~ 4e6): 1e-6 jumps it into the flat
  # region and stalls; 3e-6 and up overflow (see sgd_sweep).
  sgd_lr: float = 1e-6
  sgd_sweep: Tuple[float, ...] = (1e-5, 3e-6, 1e-6, 3e-7, 1e-7, 3e-8, 1e-8)  # SGD's other runs
  test_length: int = 12
  grid: int = 121                   # loss-surface resolution over [-3, 3]^2
  dtype: str = "float32"
  smoke: bool = False
  out: str = ""

  def __post_init__(self):
    check_config(self, positive=("n_sequences", "length", "steps", "test_length", "grid"),
                 non_negative=("rprop_lr", "adam_lr", "sgd_lr", "sgd_sweep"),
                 choices=dict(grad=GRADS, dtype=DTYPES))
    if self.grid < 2:  # the loss surface is drawn as contours: at least 2 x 2 points
      raise ValueError(f"--grid must be >= 2; got {self.grid}.")


SMOKE = Config(steps=20, grid=21, sgd_sweep=(1e-5, 1e-6), smoke=True)
GRAD_POINTS = ((1.0, 2.0), (1.0, 0.5), (1.0, 1.0), (1.0, -2.0))


def make_params(w_x, w_rec, dtype):
  layer = jaxrnn.LayerParams(jnp.full((1, 1), w_x, dtype), jnp.full((1, 1), w_rec, dtype),
                             jnp.zeros((1,), dtype))
  return jaxrnn.RNNParams((layer,), None, "identity")


# b_h stays at 0: exactly two trainable parameters.
LABELS = jaxrnn.RNNParams((jaxrnn.LayerParams("train", "train", "frozen"),), None, "identity")


def two_parameter(opt):
  return optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, LABELS)


def run(cfg: Config):
  dtype = dtype_of(cfg.dtype)
  rng = np.random.default_rng(cfg.seed)
  xs = jnp.asarray(rng.integers(0, 2, size=(cfg.length, cfg.n_sequences, 1)), dtype)
  ys = xs.sum(0)                                                 # [B, 1]
  batch = dict(xs=xs, targets=ys)

  def train(opt, **hyperparams):
    """One optimiser's path from cfg.start; ``hyperparams`` are set in its initial state
    (``optax.inject_hyperparams``), so one compiled step serves every value."""
    tx = two_parameter(opt)
    step = steps.setdefault(id(opt), jaxrnn.make_train_step(
        tx, method=cfg.grad, loss="mse", many_to_one=True))
    params = make_params(*cfg.start, dtype)
    opt_state = tx.init(params)
    if hyperparams:
      opt_state = optax.tree_utils.tree_set(
          opt_state, **{k: jnp.asarray(v, dtype) for k, v in hyperparams.items()})
    path = [cfg.start]
    losses, skipped = [], 0
    for i in range(cfg.steps):  # a Python loop to record the path
      params, opt_state, m = step(params, opt_state, **batch)
      if bool(m.skipped):       # the loss overflowed: the step changed nothing
        skipped += 1
        continue
      layer = params.layers[0]
      path.append((float(layer.W_xh[0, 0]), float(layer.W_hh[0, 0])))
      losses.append(float(m.loss))
    return dict(path=path, loss=losses, w_x=path[-1][0], w_rec=path[-1][1],
                skipped_steps=skipped)

  steps = {}   # one train step per optimiser
  sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=cfg.sgd_lr)
  runs = {name: train(opt) for name, opt in [
      ("rprop", optax.rprop(cfg.rprop_lr)), ("adam", optax.adam(cfg.adam_lr)), ("sgd", sgd)]}
  # SGD at other rates too (the same compiled step): none reaches (1, 1). The loss at
  # its last parameters is None where it overflows (the steps from there were skipped).
  def end_loss(r):
    loss = float(jaxrnn.loss(make_params(r["w_x"], r["w_rec"], dtype), xs, ys, many_to_one=True))
    return loss if math.isfinite(loss) else None

  sgd_sweep = {}
  for lr in cfg.sgd_sweep:
    r = runs["sgd"] if lr == cfg.sgd_lr else train(sgd, learning_rate=lr)
    sgd_sweep[f"{lr:g}"] = dict(final_params=(r["w_x"], r["w_rec"]), end_loss=end_loss(r),
                                skipped_steps=r["skipped_steps"])

  # Loss surface over [-3, 3]^2.
  w = jnp.linspace(-3.0, 3.0, cfg.grid, dtype=dtype)
  surface = jax.jit(jax.vmap(jax.vmap(
      lambda a, b: jaxrnn.loss(make_params(a, b, dtype), xs, ys, many_to_one=True),
      in_axes=(0, None)), in_axes=(None, 0)))(w, w)              # [w_rec, w_x]

  # Gradient norm against time step: |dL/ds_k| from the manual backward pass, for
  # a unit error at the last step (targets one below the prediction), so that the
  # exact solution (1, 1), whose error is zero, shows its flow too.
  flow = {}
  for w_x, w_rec in GRAD_POINTS:
    p = make_params(w_x, w_rec, dtype)
    unit_error = jaxrnn.forward(p, xs)[2][-1] - 1
    deltas = jaxrnn.backward_deltas(p, xs, unit_error, many_to_one=True)
    flow[f"{w_x},{w_rec}"] = np.asarray(jnp.linalg.norm(deltas[0][:, :, 0], axis=1)).tolist()

  # Count a longer test sequence with the rprop solution.
  best = make_params(runs["rprop"]["w_x"], runs["rprop"]["w_rec"], dtype)
  test_x = jnp.asarray(rng.integers(0, 2, size=(cfg.test_length, 1, 1)), dtype)
  counted = float(jaxrnn.forward(best, test_x)[2][-1, 0, 0])
  true_count = float(test_x.sum())

  metrics = dict(
      w_x=runs["rprop"]["w_x"], w_rec=runs["rprop"]["w_rec"],
      # the last finite loss; None when every step was skipped (see skipped_steps)
      final_loss={k: r["loss"][-1] if r["loss"] else None for k, r in runs.items()},
      skipped_steps={k: r["skipped_steps"] for k, r in runs.items()},  # non-finite loss
      final_params={k: (r["w_x"], r["w_rec"]) for k, r in runs.items()},
      sgd_sweep=sgd_sweep,
      distance_to_solution=math.hypot(runs["rprop"]["w_x"] - 1, runs["rprop"]["w_rec"] - 1),
      test_sequence=np.asarray(test_x[:, 0, 0]).astype(int).tolist(),
      test_count=counted, test_true_count=true_count, test_error=abs(counted - true_count),
      grad_norm_by_step=flow)
  metrics["targets"] = {
      "rprop within 1e-2 of (1, 1)": bool(max(abs(metrics["w_x"] - 1),
                                              abs(metrics["w_rec"] - 1)) < 1e-2),
      "12-bit test sequence counted within 0.05": bool(metrics["test_error"] < 0.05)}
  return metrics, runs, np.asarray(w), np.asarray(surface)


def plot(path, metrics, runs, w, surface):
  plt = pyplot()
  from matplotlib.colors import LogNorm
  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
  cs = ax.contourf(w, w, np.maximum(surface, 1e-6), levels=np.logspace(-4, 10, 29),
                   norm=LogNorm(), cmap="viridis")
  fig.colorbar(cs, ax=ax, label="loss (log scale)")
  for (name, r), color in zip(runs.items(), ["w", "tab:orange", "tab:red"]):
    p = np.asarray(r["path"])
    ax.plot(p[:, 0], p[:, 1], ".-", color=color, ms=2, lw=1, label=name)
  ax.plot([1], [1], "r*", ms=12, label="solution (1, 1)")
  ax.set(xlabel="w_x", ylabel="w_rec", title="loss surface and optimiser paths",
         xlim=(-3, 3), ylim=(-3, 3))
  ax.legend(loc="lower left", fontsize=8)
  # distinct markers and dashes: w_rec = 2 and -2 give the same norms, one curve on the other
  styles = [("o", "-", 8), ("s", "--", 5), ("^", "-.", 6), ("x", ":", 8)]
  for (key, norms), (marker, ls, ms) in zip(metrics["grad_norm_by_step"].items(),
                                            styles * len(metrics["grad_norm_by_step"])):
    ax2.semilogy(range(len(norms)), norms, marker=marker, ls=ls, ms=ms, mfc="none",
                 label=f"(w_x, w_rec) = ({key})")
  ax2.set(xlabel="time step k", ylabel="‖∂L/∂s_k‖ over the batch",
          title="gradient through time, unit error at the last step")
  ax2.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  cfg = parse_config(Config, argv, smoke=SMOKE)
  out = results_dir("counting", cfg.out or None)
  metrics, runs, w, surface = run(cfg)
  metrics["config"] = dataclasses.asdict(cfg)
  write_json(out / "metrics.json", metrics)
  plot(out / "counting.png", metrics, runs, w, surface)
  final = metrics["final_loss"]["rprop"]
  print(f"rprop: w_x = {metrics['w_x']:.5f}, w_rec = {metrics['w_rec']:.5f} "
        f"(loss {'not finite at any step' if final is None else f'{final:.2e}'}); "
        f"adam: {metrics['final_params']['adam']}, "
        f"sgd: {metrics['final_params']['sgd']}")
  sweep = {lr: "not finite" if r["end_loss"] is None else f"{r['end_loss']:.3g}"
           for lr, r in metrics["sgd_sweep"].items()}
  print("sgd's loss at the end, by learning rate: "
        + ", ".join(f"{k}: {v}" for k, v in sweep.items()))
  print(f"test sequence of {cfg.test_length} bits: counted {metrics['test_count']:.4f}, "
        f"true {metrics['test_true_count']:.0f}")
  print(f"targets: {metrics['targets']}; results in {out}")
  return metrics


if __name__ == "__main__":
  main()
