"""
How stable is the median cancellation ratio, sum_j |I(z_j, z')| / |sum_j I(z_j, z')|?
Trains the case-deletion benchmark's model several times (each seed gives another head
initialisation and example order; each MiniLM layer count another model) and reports
every method's median ratio (torch's median: the lower middle value) over the same
test examples for each training run. Every other option (--dataset, --model, --train,
--max-length, --epochs, --methods, ...) is case_deletion.py's, with its defaults, except
--model minilm, --train 1000, --test-examples 20 and the methods in METHODS.

    python benchmarks/cancellation.py --json benchmarks/results/cancellation_mr_minilm.json > benchmarks/results/cancellation_mr_minilm.txt
    python benchmarks/cancellation.py --quick        # seconds: tiny data, for the tests
"""

import argparse
import copy
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import case_deletion  # noqa: E402
from common import run_benchmark  # noqa: E402

LAST_LAYER = "TracInCP (last layer)"
METHODS = ("TracInWE", "TracInWE-TopK", LAST_LAYER, "TracInCPFast")  # the committed results' (--methods)
DEFAULTS = ["--model", "minilm", "--train", "1000", "--test-examples", "20", "--methods", *METHODS]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4],
                        help="MiniLM layers kept, one model each (ignored with --model cnn)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one training run each")
    ours, rest = parser.parse_known_args(argv)
    args = case_deletion.parse_args(DEFAULTS + rest)  # --quick sets tiny data there
    args.layers = [None] if args.model == "cnn" else ([1] if args.quick else ours.layers)
    args.seeds = [0, 1] if args.quick else ours.seeds
    del args.ks, args.plot, args.flip_fraction, args.mislabel_train, args.add_to, args.cache  # case deletion's own
    return args


def run(args):
    start = time.perf_counter()
    runs = []
    for layers in args.layers:
        model_args = copy.copy(args)
        model_args.layers = layers
        setup = case_deletion.Setup(model_args, args.train)
        for seed in args.seeds:
            accuracy, scores, _ = case_deletion.trained_and_scored(setup, seed)
            del scores[case_deletion.SIMILARITY]  # not a sum of gradient products: nothing cancels
            runs.append({"layers": layers, "seed": seed, "held_out_accuracy": accuracy,
                         "median_ratio": case_deletion.median_cancellation_ratios(scores)})
    return {"settings": vars(args), "runs": runs, "total_seconds": time.perf_counter() - start}


def report(results):
    s, runs = results["settings"], results["runs"]
    methods = list(runs[0]["median_ratio"])
    print(f"{s['dataset'].upper()}, {s['model']}: {s['train']} training examples, {s['max_length']} tokens, "
          f"{s['epochs']} epochs; median cancellation ratio over {s['test_examples']} test examples, "
          f"per training run; {results['total_seconds'] / 60:.1f} minutes in all\n")
    print("| layers | seed | held-out accuracy | " + " | ".join(methods) + " |")
    print("|---:|---:|---:|" + "---:|" * len(methods))
    for r in runs:
        ratios = " | ".join(f"{r['median_ratio'][name]:.2f}" for name in methods)
        print(f"| {r['layers'] or '-'} | {r['seed']} | {r['held_out_accuracy']:.2f} | {ratios} |")
    lower = sum(r["median_ratio"]["TracInWE"] < r["median_ratio"][LAST_LAYER] for r in runs)
    print(f"\nTracInWE's median ratio is below {LAST_LAYER}'s in {lower} of {len(runs)} runs.")


def main(argv=None):
    case_deletion.quiet_model_loading()
    return run_benchmark(parse_args(argv), run, report)


if __name__ == "__main__":
    main(sys.argv[1:])
