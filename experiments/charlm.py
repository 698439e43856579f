"""Character-level language model on the Python standard library, by streaming truncated BPTT.

The corpus needs no download: the ``.py`` files of the running interpreter's
standard library, split by file into training and held-out sets. Text is read
as bytes; the vocabulary is the set of bytes seen in training (plus one
"unknown" symbol). B streams read the training text in parallel; every call
of the streaming step (``jaxrnn.make_tbptt_stream``) consumes the next
``tau_b`` characters of each stream, backpropagates through the last
``tau_max`` and updates with Adam. File boundaries reset the state (``resets``)
and the last character of a file is not asked to predict the next file
(``loss_weights``). Reports held-out bits per character beside unigram and
bigram baselines computed on the same split, prints samples, plots the loss.

    python experiments/charlm.py [--grad autodiff] [--smoke]    # default: 65-71 s of training on 2 CPU cores
"""

import dataclasses
import pathlib
import sys
import sysconfig
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxrnn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import GRADS, DTYPES, check_config, dtype_of, parse_config, pyplot, results_dir, write_json  # noqa: E402

LOG2E = 1.0 / np.log(2.0)


@dataclasses.dataclass(frozen=True)
class Config:
  """Byte-level RNN language model of the Python standard library."""
  grad: str = "manual"          # manual | autodiff
  seed: int = 0
  hidden: int = 256
  tau_b: int = 25               # characters per update
  tau_max: int = 25             # characters the gradient reaches back
  streams: int = 32             # B parallel streams through the training text
  steps: int = 20000            # updates (20000 × 25 × 32 = 16M characters, ~70 s on 2 cores)
  lr: float = 2e-3
  clip_norm: float = 5.0
  train_chars: int = 6_000_000  # at most this much training text
  heldout_chars: int = 300_000  # at most this much held-out text
  heldout_every: int = 10       # every 10th file (by a hash of its path) is held out
  eval_every: int = 2500
  sample_chars: int = 240
  temperature: float = 0.8
  dtype: str = "float32"
  checkpoint_every: int = 1000  # updates between checkpoints (params, optimizer, stream state)
  resume: bool = False          # continue from the newest intact checkpoint in <out>/checkpoints
  smoke: bool = False
  out: str = ""

  def __post_init__(self):
    check_config(self, positive=("hidden", "tau_b", "tau_max", "streams", "steps", "clip_norm",
                                 "train_chars", "heldout_chars", "heldout_every", "eval_every",
                                 "temperature", "checkpoint_every"),
                 non_negative=("lr", "sample_chars"), choices=dict(grad=GRADS, dtype=DTYPES))
    if self.tau_max < self.tau_b:
      raise ValueError(f"--tau_max must be >= --tau_b; got {self.tau_max} < {self.tau_b}.")
    if self.heldout_every < 2:  # 1 would hold out every file and leave nothing to train on
      raise ValueError(f"--heldout_every must be >= 2; got {self.heldout_every}.")
    need = self.streams * self.tau_b + 1   # one chunk per stream, and its next character
    for name in ("train_chars", "heldout_chars"):
      if getattr(self, name) < need:
        raise ValueError(f"--{name} must be >= --streams * --tau_b + 1 = {need}; "
                         f"got {getattr(self, name)}.")


SMOKE = Config(hidden=16, streams=4, steps=12, train_chars=20_000, heldout_chars=5_000,
               eval_every=6, sample_chars=40, tau_b=8, tau_max=12, smoke=True)


def load_corpus(cfg: Config):
  """Training and held-out bytes, with the index of each file's first byte."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
  parts = {"train": [], "heldout": []}
  sizes = {"train": 0, "heldout": 0}
  limit = {"train": cfg.train_chars, "heldout": cfg.heldout_chars}
  for p in files:
    split = "heldout" if zlib.crc32(str(p.relative_to(root)).encode()) % cfg.heldout_every == 0 \
        else "train"
    if sizes[split] >= limit[split]:
      continue
    try:
      data = p.read_bytes()
    except OSError:
      continue
    if data:
      parts[split].append(data)
      sizes[split] += len(data)
  out = {}
  for split, chunks in parts.items():
    text = np.frombuffer(b"".join(chunks), np.uint8)[:limit[split]]
    starts = np.cumsum([0] + [len(c) for c in chunks[:-1]])
    out[split] = (text, starts[starts < len(text)])
  return out, len(files)


def vocabulary(train_bytes):
  seen = np.unique(train_bytes)
  table = np.full(256, len(seen), np.int32)       # unseen bytes -> "unknown" (last index)
  table[seen] = np.arange(len(seen))
  return table, seen, len(seen) + 1


def baselines(train, heldout, V):
  """Held-out bits per character of add-one smoothed unigram and bigram models."""
  uni = np.bincount(train, minlength=V) + 1.0
  uni_bits = -np.mean(np.log2(uni / uni.sum())[heldout])
  big = np.ones((V, V))
  np.add.at(big, (train[:-1], train[1:]), 1.0)
  big /= big.sum(axis=1, keepdims=True)
  big_bits = -np.mean(np.log2(big[heldout[:-1], heldout[1:]]))
  return float(uni_bits), float(big_bits)


def streams(ids, file_starts, B, tau_b):
  """Cuts the text into B equal streams: inputs, next-char targets, resets, weights [N, B]."""
  n = (len(ids) - 1) // B // tau_b * tau_b
  first = np.zeros(len(ids), bool)
  first[file_starts] = True
  x = ids[:B * n].reshape(B, n).T
  y = ids[1:B * n + 1].reshape(B, n).T
  r = first[:B * n].reshape(B, n).T
  w = (~first[1:B * n + 1]).reshape(B, n).T      # do not predict across a file boundary
  return x, y, r, w.astype(np.float32)


def run(cfg: Config, out=None):
  dtype = dtype_of(cfg.dtype)
  corpus, n_files = load_corpus(cfg)
  table, seen, V = vocabulary(corpus["train"][0])
  train_ids = table[corpus["train"][0]]
  held_ids = table[corpus["heldout"][0]]
  uni_bits, big_bits = baselines(train_ids, held_ids, V)
  print(f"corpus: {n_files} stdlib files; {len(train_ids):,} training and {len(held_ids):,} "
        f"held-out characters; vocabulary {V}; held-out baselines: unigram {uni_bits:.3f}, "
        f"bigram {big_bits:.3f} bits/char")

  x, y, r, w = streams(train_ids, corpus["train"][1], cfg.streams, cfg.tau_b)
  hx, hy, hr, hw = streams(held_ids, corpus["heldout"][1], cfg.streams, cfg.tau_b)
  for split, ids, cut in (("training", train_ids, x), ("held-out", held_ids, hx)):
    if len(cut) == 0:  # the config's checks passed, but this Python's stdlib has less text
      raise ValueError(f"the {split} text has {len(ids)} characters, too few for one chunk "
                       f"of --tau_b {cfg.tau_b} in each of --streams {cfg.streams}; lower them.")
  eye = jnp.eye(V, dtype=dtype)

  params = jaxrnn.init_params(jax.random.key(cfg.seed), V, (cfg.hidden,), V, dtype=dtype)
  opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.lr))
  stream = jaxrnn.make_tbptt_stream(opt, tau_b=cfg.tau_b, tau_max=cfg.tau_max, loss="xent",
                                    method=cfg.grad)
  opt_state, state = stream.init(params, cfg.streams)

  @jax.jit
  def heldout_bits(params):
    """Bits per character over the held-out streams, carrying the state chunk to chunk."""
    def body(h, chunk):
      xc, yc, rc, wc = chunk
      _, hs, logits = jaxrnn.forward(params, eye[xc], h, resets=rc)
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), yc[..., None], axis=-1)[..., 0]
      return tuple(s[-1] for s in hs), (jnp.sum(wc * nll), jnp.sum(wc))
    n = hx.shape[0] // cfg.tau_b
    split = lambda a: jnp.asarray(a[:n * cfg.tau_b]).reshape((n, cfg.tau_b) + a.shape[1:])
    h0 = tuple(jnp.zeros((cfg.streams, l.b_h.shape[0]), dtype) for l in params.layers)
    _, (nll, count) = jax.lax.scan(body, h0, (split(hx), split(hy), split(hr),
                                              split(hw).astype(dtype)))
    return jnp.sum(nll) / jnp.sum(count) * LOG2E

  @jax.jit
  def sample(params, key):
    prefix = jnp.asarray(table[np.frombuffer(b"def ", np.uint8)])
    _, hs, logits = jaxrnn.forward(params, eye[prefix][:, None])
    def body(carry, k):
      h, logit = carry
      c = jax.random.categorical(k, logit / cfg.temperature)
      _, hs, logits = jaxrnn.forward(params, eye[c][None, None], h)
      return (tuple(s[-1] for s in hs), logits[-1, 0]), c
    _, chars = jax.lax.scan(body, (tuple(s[-1] for s in hs), logits[-1, 0]),
                            jax.random.split(key, cfg.sample_chars))
    return jnp.concatenate([prefix, chars])

  def decode(ids):
    symbols = np.append(seen, ord("?")).astype(np.uint8)
    return bytes(symbols[np.asarray(ids)]).decode("utf-8", "replace")

  n_chunks = x.shape[0] // cfg.tau_b
  history = dict(step=[], train_bits=[], eval_step=[], heldout_bits=[])
  samples = []
  running, start, seconds_before = None, 0, 0.0
  # Checkpoints hold the params, the optimizer state and the stream's carried state; the
  # stream position is the update count (chunk i % n_chunks), the sample keys derive from it.
  ckpt = None if out is None else out / "checkpoints"
  if ckpt is not None and not cfg.resume and ckpt.exists():   # a fresh run starts over there
    for old in ckpt.glob("ckpt_*"):
      old.unlink()
  # refuses checkpoints that do not fit this config, or past --steps
  found = None if ckpt is None else jaxrnn.start_from_checkpoint(
      ckpt, (params, opt_state, state), resume=cfg.resume, num_steps=cfg.steps)
  if found is not None:
    (params, opt_state, state), rec = found
    start, history, samples = rec["step"], rec["history"], rec["samples"]
    running, seconds_before = rec["running"], rec["seconds"]
    print(f"resumed from update {start}")
  from tqdm.auto import tqdm
  t0 = time.perf_counter()
  for i in tqdm(range(start, cfg.steps), desc="charlm", disable=None, initial=start,
                total=cfg.steps):
    c = i % n_chunks
    sl = slice(c * cfg.tau_b, (c + 1) * cfg.tau_b)
    params, opt_state, state, loss = stream.step(
        params, opt_state, state, eye[x[sl]], jnp.asarray(y[sl]), jnp.asarray(r[sl]),
        jnp.asarray(w[sl], dtype))
    if i % 50 == 0 or i == cfg.steps - 1:
      bits = float(loss) / cfg.tau_b * LOG2E        # loss: nats summed over tau_b steps
      running = bits if running is None else 0.9 * running + 0.1 * bits
      history["step"].append(i)
      history["train_bits"].append(running)
    if (i + 1) % cfg.eval_every == 0 or i == cfg.steps - 1:
      held = float(heldout_bits(params))
      history["eval_step"].append(i + 1)
      history["heldout_bits"].append(held)
      text = decode(sample(params, jax.random.key(i)))
      samples.append(dict(step=i + 1, text=text))
      print(f"\nstep {i + 1}: held-out {held:.3f} bits/char (bigram {big_bits:.3f}); sample:\n"
            f"{text}\n" + "-" * 60)
    if ckpt is not None and ((i + 1) % cfg.checkpoint_every == 0 or i == cfg.steps - 1):
      jaxrnn.save_checkpoint(ckpt, i + 1, (params, opt_state, state), dict(
          history=history, samples=samples, running=running,
          seconds=seconds_before + time.perf_counter() - t0))
  seconds = seconds_before + time.perf_counter() - t0
  final = history["heldout_bits"][-1]
  metrics = dict(heldout_bits_per_char=final, unigram_bits_per_char=uni_bits,
                 bigram_bits_per_char=big_bits, vocabulary=V, train_chars=int(len(train_ids)),
                 heldout_chars=int(len(held_ids)), train_seconds=seconds,
                 chars_seen=cfg.steps * cfg.tau_b * cfg.streams, samples=samples,
                 history=history)
  metrics["targets"] = {"beats the bigram baseline on held-out data": bool(final < big_bits)}
  return metrics


def plot(path, metrics):
  plt = pyplot()
  h = metrics["history"]
  fig, ax = plt.subplots(figsize=(8, 4.5))
  ax.plot(h["step"], h["train_bits"], label="training (running mean)")
  ax.plot(h["eval_step"], h["heldout_bits"], "o-", label="held-out")
  ax.axhline(metrics["unigram_bits_per_char"], color="0.5", ls=":", label="unigram baseline")
  ax.axhline(metrics["bigram_bits_per_char"], color="k", ls="--", label="bigram baseline")
  ax.set(xlabel="update (one per chunk of tau_b characters)", ylabel="bits per character",
         title="character-level RNN on the Python standard library")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  cfg = parse_config(Config, argv, smoke=SMOKE)
  out = results_dir("charlm", cfg.out or None)
  metrics = run(cfg, out)
  metrics["config"] = dataclasses.asdict(cfg)
  write_json(out / "metrics.json", metrics)
  plot(out / "charlm.png", metrics)
  print(f"held-out {metrics['heldout_bits_per_char']:.3f} bits/char; unigram "
        f"{metrics['unigram_bits_per_char']:.3f}, bigram {metrics['bigram_bits_per_char']:.3f}; "
        f"{metrics['train_seconds']:.0f} s of training")
  print(f"targets: {metrics['targets']}; results in {out}")
  return metrics


if __name__ == "__main__":
  main()
