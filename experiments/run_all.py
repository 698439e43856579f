"""Runs every experiment and writes results/README.md: figures, key numbers, targets.

    python experiments/run_all.py            # full configs (charlm takes most of the ~15 min)
    python experiments/run_all.py --smoke    # every experiment in seconds
    python experiments/run_all.py --only counting,sine
"""

import argparse
import importlib
import json
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import GRADS  # noqa: E402

EXPERIMENTS = ("counting", "bitsum", "sine", "charlm", "gradient_flow", "truncation")

TITLES = {
    "counting": "Counting ones with a two-parameter linear RNN",
    "bitsum": "Summing 5 to 8 bits (ragged batches), full vs truncated BPTT",
    "sine": "Sine prediction and closed-loop generation",
    "charlm": "Character-level language model of the Python standard library",
    "gradient_flow": "Gradient flow through time and layers",
    "truncation": "Truncation length against a known dependency lag",
}


def _loss(value):
  return "not finite" if value is None else f"{value:.3g}"


def summary(name, m):
  """Key numbers of an experiment, one line each."""
  if name == "counting":
    return [f"rprop after {m['config']['steps']} steps: w_x = {m['w_x']:.5f}, "
            f"w_rec = {m['w_rec']:.5f} (target: within 1e-2 of (1, 1))",
            f"{m['config']['test_length']}-bit test sequence: counted {m['test_count']:.4f}, "
            f"true {m['test_true_count']:.0f} (target: within 0.05)",
            f"for contrast, Adam ends at {tuple(round(v, 3) for v in m['final_params']['adam'])} "
            f"and SGD (learning rate {m['config']['sgd_lr']:g}) at "
            f"{tuple(round(v, 3) for v in m['final_params']['sgd'])}",
            f"SGD's loss after {m['config']['steps']} steps, by learning rate (rprop's: "
            f"{_loss(m['final_loss']['rprop'])}): " + ", ".join(
                f"{lr}: {_loss(r['end_loss'])}"
                + (f" ({r['skipped_steps']} steps skipped)" if r["skipped_steps"] else "")
                for lr, r in m["sgd_sweep"].items())]
  if name == "bitsum":
    lines = [f"{k}: test RMSE {r['test_rmse']:.4f} (target < 0.1); a single 1 predicted as "
             f"{r['single_one_prediction']:.3f}" for k, r in m["results"].items()]
    full = m["results"]["full"]["long_predictions"]
    lines.append("longer strings, all ones (full BPTT): " + ", ".join(
        f"{r['bits']}→{r['predicted']:.2f}" for r in full if r["kind"] == "all ones"))
    return lines
  if name == "sine":
    return [f"closed-loop generation RMSE against the clean sine: {m['generation_rmse']:.4f} "
            f"(target < 0.1); against the noisy training points "
            f"{m['generation_rmse_vs_noisy']:.4f} (the noise's standard deviation: "
            f"{m['config']['noise']:g})",
            f"75 more steps past the training data (t > 4π): RMSE "
            f"{m['beyond_training_rmse']:.4f} against the sine",
            f"one-step RMSE: {m['one_step_rmse_vs_clean']:.4f}"]
  if name == "charlm":
    return [f"held-out {m['heldout_bits_per_char']:.3f} bits/char vs bigram "
            f"{m['bigram_bits_per_char']:.3f} and unigram {m['unigram_bits_per_char']:.3f} "
            f"(target: beat the bigram), after {m['train_seconds']:.0f} s of training on "
            f"{m['chars_seen']:,} characters",
            "last sample: `" + m["samples"][-1]["text"][:160].replace("\n", "⏎")
            .replace("`", "'") + "`"]
  if name == "gradient_flow":
    import gradient_flow
    rows = ["| activation | ρ | γ | fitted rate | log(ργ) | steps fitted |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {r['activation']} | {r['rho']} | {r['gamma']} | {gradient_flow.rate_text(r)} | "
             f"{r['predicted_rate']:.4f} | {r['fitted_steps']} of {m['config']['T']} |"
             for r in m["rates"]]
    return ["fitted decay/growth rate of ‖δh^L‖ per step against the spectral-radius rate:",
            ""] + rows
  if name == "truncation":
    lines = [f"lag k = {m['lag']}; median test RMSE over seeds (fraction solved):"]
    for scheme, rows in m["sweeps"].items():
      lines.append(f"{scheme}: " + ", ".join(f"τ={r['tau_max']}: {r['median']:.3f} "
                                             f"({r['solved']:.1f})" for r in rows))
    return lines
  return []


def run(names, smoke: bool, root: pathlib.Path, extra=()):
  report = ["# Experiment results", "",
            f"Written by `python experiments/run_all.py{' --smoke' if smoke else ''}`"
            f" on {time.strftime('%Y-%m-%d')}. Each section: the figure, the key numbers, and "
            "each target as met or missed."
            + (" **Smoke run: tiny configs, so the targets (set for the full configs) are not "
               "expected to be met.**" if smoke else ""), ""]
  all_targets = {}
  for name in names:
    module = importlib.import_module(name)
    out = root / name
    t0 = time.perf_counter()
    metrics = module.main((["--smoke"] if smoke else []) + ["--out", str(out), *extra])
    seconds = time.perf_counter() - t0
    all_targets[name] = metrics["targets"]
    report += [f"## {TITLES[name]} (`experiments/{name}.py`)", "",
               f"![{name}]({name}/{name}.png)", ""]
    report += [f"- {line}" if line and not line.startswith("|") else line
               for line in summary(name, metrics)]
    report += [""] + [f"- target {'met' if ok else '**missed**'}: {t}"
                      for t, ok in metrics["targets"].items()]
    report += ["", f"_{seconds:.0f} s; metrics in `{name}/metrics.json`_", ""]
  (root / "README.md").write_text("\n".join(report) + "\n")
  return all_targets


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--only", default=",".join(EXPERIMENTS))
  parser.add_argument("--out", default=str(HERE.parent / "results"))
  parser.add_argument("--grad", default="manual", choices=GRADS)
  args = parser.parse_args(argv)
  names = args.only.split(",")
  unknown = [n for n in names if n not in EXPERIMENTS]
  if unknown or not names:
    parser.error(f"--only: unknown experiment(s) {unknown}; choose from {list(EXPERIMENTS)}.")
  root = pathlib.Path(args.out)
  root.mkdir(parents=True, exist_ok=True)
  targets = run(names, args.smoke, root, ["--grad", args.grad])
  print(json.dumps(targets, indent=2))
  print(f"report: {root / 'README.md'}")
  return targets


if __name__ == "__main__":
  main()
