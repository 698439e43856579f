"""Many-to-one: sum the bits of strings of 5 to 8 random bits (ragged batches via `lengths`).

Two sigmoid layers of 6 and 4 units and a linear readout read a bit string one
bit per step; the loss is ½ (ŷ − y)² on each sequence's last valid step
(``many_to_one`` with ``lengths``). Trained with full BPTT and with truncated
BPTT (``tau_max=7``, so the first bit of an 8-bit string is out of reach of
the gradient). Reports test RMSE and predictions on longer strings (9 to 16
bits) that the network never saw.

    python experiments/bitsum.py [--grad autodiff] [--smoke]
"""

import dataclasses
import sys
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxrnn

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import GRADS, DTYPES, check_config, dtype_of, parse_config, pyplot, results_dir, write_json  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
  """Sum 5 to 8 bits with a two-layer sigmoid RNN, full and truncated BPTT."""
  grad: str = "manual"              # manual | autodiff
  seed: int = 0
  n_sequences: int = 600
  n_train: int = 402                # the rest (198) is the test set
  min_bits: int = 5
  max_bits: int = 8
  hidden: Tuple[int, ...] = (6, 4)
  steps: int = 4000                 # full-batch Adam steps
  lr: float = 0.03                  # peak of a cosine decay to 1% of it
  truncated_tau_max: int = 7
  long_bits: Tuple[int, int] = (9, 16)
  dtype: str = "float32"
  smoke: bool = False
  out: str = ""

  def __post_init__(self):
    check_config(self, positive=("n_sequences", "n_train", "min_bits", "hidden", "steps",
                                 "truncated_tau_max", "long_bits"),
                 non_negative=("lr",), choices=dict(grad=GRADS, dtype=DTYPES))
    if not self.n_train < self.n_sequences:
      raise ValueError(f"--n_train must be < --n_sequences (the rest is the test set); "
                       f"got {self.n_train} and {self.n_sequences}.")
    if not self.min_bits <= self.max_bits:
      raise ValueError(f"--min_bits must be <= --max_bits; got {self.min_bits} > {self.max_bits}.")
    if not self.long_bits[0] <= self.long_bits[1]:
      raise ValueError(f"--long_bits must be (low, high) with low <= high; got {self.long_bits}.")


SMOKE = Config(steps=30, smoke=True)


def make_data(rng, n, min_bits, max_bits, dtype):
  lengths = rng.integers(min_bits, max_bits + 1, size=n)
  bits = rng.integers(0, 2, size=(max_bits, n)) * (np.arange(max_bits)[:, None] < lengths)
  return (jnp.asarray(bits[:, :, None], dtype), jnp.asarray(bits.sum(0)[:, None], dtype),
          jnp.asarray(lengths, jnp.int32))


def predict(params, xs, lengths):
  ys = jaxrnn.forward(params, xs, lengths=lengths)[2]
  return ys[lengths - 1, jnp.arange(xs.shape[1]), 0]


def train(cfg: Config, tau_max: Optional[int], data, dtype):
  xs, ys, lengths = data
  params = jaxrnn.init_params(jax.random.key(cfg.seed), 1, cfg.hidden, 1,
                              activation="sigmoid", dtype=dtype)
  opt = optax.adam(optax.cosine_decay_schedule(cfg.lr, cfg.steps, alpha=0.01))
  step = jaxrnn.make_train_step(opt, method=cfg.grad, loss="mse", many_to_one=True,
                                tau_max=tau_max)
  tr = slice(0, cfg.n_train)
  batch = dict(xs=xs[:, tr], targets=ys[tr], lengths=lengths[tr])
  desc = f"bitsum {'full' if tau_max is None else f'tau_max={tau_max}'}"
  return jaxrnn.fit(step, params, opt.init(params), lambda i: batch, cfg.steps,
                    log_every=max(1, cfg.steps // 100), desc=desc)


def run(cfg: Config):
  dtype = dtype_of(cfg.dtype)
  rng = np.random.default_rng(cfg.seed)
  data = make_data(rng, cfg.n_sequences, cfg.min_bits, cfg.max_bits, dtype)
  xs, ys, lengths = data
  te = slice(cfg.n_train, cfg.n_sequences)

  # Longer strings: for each length, all ones, a single one, and a random string.
  lo, hi = cfg.long_bits
  long_rows = []
  for n in range(lo, hi + 1):
    for kind, bits in (("all ones", np.ones(n)), ("single one", np.eye(n)[0]),
                       ("random", rng.integers(0, 2, size=n))):
      long_rows.append((n, kind, bits))
  long_x = np.zeros((hi, len(long_rows), 1))
  for j, (n, _, bits) in enumerate(long_rows):
    long_x[:n, j, 0] = bits
  long_x = jnp.asarray(long_x, dtype)
  long_len = jnp.asarray([n for n, _, _ in long_rows], jnp.int32)

  results, histories = {}, {}
  for name, tau_max in (("full", None), (f"tau_max={cfg.truncated_tau_max}",
                                          cfg.truncated_tau_max)):
    fit = train(cfg, tau_max, data, dtype)
    pred = predict(fit.params, xs[:, te], lengths[te])
    rmse = float(jnp.sqrt(jnp.mean((pred - ys[te, 0]) ** 2)))
    single = predict(fit.params, jnp.asarray(np.eye(cfg.min_bits)[:, :1, None], dtype),
                     jnp.asarray([cfg.min_bits], jnp.int32))
    long_pred = predict(fit.params, long_x, long_len)
    results[name] = dict(test_rmse=rmse, train_loss=fit.history["loss"][-1],
                         single_one_prediction=float(single[0]),
                         long_predictions=[
                             dict(bits=n, kind=kind, true=float(b.sum()), predicted=float(p))
                             for (n, kind, b), p in zip(long_rows, np.asarray(long_pred))])
    histories[name] = fit.history
    results[name]["test_predictions"] = np.asarray(pred).tolist()
  metrics = dict(results=results, test_targets=np.asarray(ys[te, 0]).tolist())
  metrics["targets"] = {f"test RMSE < 0.1 ({k})": bool(r["test_rmse"] < 0.1)
                        for k, r in results.items()}
  return metrics, histories


def plot(path, metrics, histories):
  plt = pyplot()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  for name, h in histories.items():
    axes[0].semilogy(h["step"], h["loss"], label=name)
  axes[0].set(xlabel="Adam step", ylabel="train loss", title="training")
  axes[0].legend()
  y = np.asarray(metrics["test_targets"])
  for name, r in metrics["results"].items():
    jitter = (0.15 if "tau" in name else -0.15)
    axes[1].plot(y + jitter, r["test_predictions"], ".", alpha=0.5,
                 label=f"{name}: RMSE {r['test_rmse']:.3f}")
  axes[1].plot([0, 8], [0, 8], "k--", lw=1)
  axes[1].set(xlabel="true sum", ylabel="predicted", title="test set (5 to 8 bits)")
  axes[1].legend()
  for name, r in metrics["results"].items():
    rows = [row for row in r["long_predictions"] if row["kind"] == "all ones"]
    axes[2].plot([row["bits"] for row in rows], [row["predicted"] for row in rows], "o-",
                 label=f"{name}")
  n = [row["bits"] for row in rows]
  axes[2].plot(n, n, "k--", lw=1, label="true")
  axes[2].set(xlabel="string length (all ones)", ylabel="predicted sum",
              title="longer strings than trained on")
  axes[2].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  cfg = parse_config(Config, argv, smoke=SMOKE)
  out = results_dir("bitsum", cfg.out or None)
  metrics, histories = run(cfg)
  metrics["config"] = dataclasses.asdict(cfg)
  write_json(out / "metrics.json", metrics)
  plot(out / "bitsum.png", metrics, histories)
  for name, r in metrics["results"].items():
    print(f"{name:>12}: test RMSE {r['test_rmse']:.4f}; a single 1 -> "
          f"{r['single_one_prediction']:.3f}")
  print("\nlonger strings (all ones / single one / random), predicted vs true:")
  names = list(metrics["results"])
  print(f"{'bits':>4} {'kind':>10} {'true':>5} " + " ".join(f"{n:>12}" for n in names))
  for i, row in enumerate(metrics["results"][names[0]]["long_predictions"]):
    preds = [metrics["results"][n]["long_predictions"][i]["predicted"] for n in names]
    print(f"{row['bits']:>4} {row['kind']:>10} {row['true']:>5.0f} "
          + " ".join(f"{p:>12.3f}" for p in preds))
  print(f"\ntargets: {metrics['targets']}; results in {out}")
  return metrics


if __name__ == "__main__":
  main()
