"""
How stable is the median cancellation ratio, sum_j |I(z_j, z')| / |sum_j I(z_j, z')|?
Trains the case-deletion benchmark's model several times (each seed gives another head
initialisation and example order; each layer count another model) and reports every
method's median ratio over the same test examples for each training run.

    python benchmarks/cancellation.py --json benchmarks/results/cancellation_mr_minilm.json > benchmarks/results/cancellation_mr_minilm.txt
    python benchmarks/cancellation.py --quick        # seconds: tiny data, for the tests
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import case_deletion  # noqa: E402
from common import run_benchmark  # noqa: E402

from captum_tracin_we.data import predict_proba  # noqa: E402
from captum_tracin_we.evaluation import cancellation_ratio  # noqa: E402

LAST_LAYER = "TracInCP (last layer)"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("mr", "bbc"), default="mr")
    parser.add_argument("--model", choices=("cnn", "minilm"), default="minilm")
    parser.add_argument("--train", type=int, default=1000, help="training examples")
    parser.add_argument("--test-examples", type=int, default=20)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="MiniLM layers kept, one model each")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one training run each")
    parser.add_argument("--quick", action="store_true", help="tiny settings, for the tests")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.seeds = [1], [0, 1]
        args.train, args.test_examples = case_deletion.QUICK["train"], case_deletion.QUICK["test_examples"]
    return args


def run(args):
    start = time.perf_counter()
    runs = []
    for layers in args.layers if args.model == "minilm" else [None]:
        # the case-deletion benchmark's settings (epochs, learning rate, checkpoints, ...) for this model
        shared = ["--dataset", args.dataset, "--model", args.model, "--train", str(args.train),
                  "--test-examples", str(args.test_examples), "--layers", str(layers or 1)]
        setup = case_deletion.Setup(case_deletion.parse_args(shared + ["--quick"] * args.quick), args.train)
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as directory:
                model, checkpoints = setup.trained(seed, setup.train, checkpoint_dir=directory)
                predicted = predict_proba(model, setup.held_out).argmax(1)
                scores, _ = case_deletion.influence_scores(setup, model, checkpoints)
            runs.append({
                "layers": layers, "seed": seed,
                "held_out_accuracy": (predicted == setup.held_out.tensors[-1]).float().mean().item(),
                "median_ratio": {name: cancellation_ratio(values).median().item()
                                 for name, values in scores.items() if name != case_deletion.SIMILARITY},
            })
    return {"settings": vars(args), "runs": runs, "total_seconds": time.perf_counter() - start}


def report(results):
    s, runs = results["settings"], results["runs"]
    methods = list(runs[0]["median_ratio"])
    print(f"{s['dataset'].upper()}, {s['model']}: {s['train']} training examples; median cancellation ratio "
          f"over {s['test_examples']} test examples, per training run; "
          f"{results['total_seconds'] / 60:.1f} minutes in all\n")
    print("| layers | seed | held-out accuracy | " + " | ".join(methods) + " |")
    print("|---:|---:|---:|" + "---:|" * len(methods))
    for r in runs:
        ratios = " | ".join(f"{r['median_ratio'][name]:.2f}" for name in methods)
        print(f"| {r['layers'] or '-'} | {r['seed']} | {r['held_out_accuracy']:.2f} | {ratios} |")
    lower = sum(r["median_ratio"]["TracInWE"] < r["median_ratio"][LAST_LAYER] for r in runs)
    print(f"\nTracInWE's median ratio is below {LAST_LAYER}'s in {lower} of {len(runs)} runs.")


def main(argv=None):
    torch.manual_seed(0)
    return run_benchmark(parse_args(argv), run, report)


if __name__ == "__main__":
    main(sys.argv[1:])
