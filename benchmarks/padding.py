"""
Per-batch padding against padding to the longest text of the whole dataset: the
time of every method (and of the floor, one forward and backward pass per batch
and checkpoint) on MR sentences with the MiniLM tokenizer and MiniLM's first
layers, and the agreement of their scores (MiniLM masks padding, so they are
the same up to rounding).

    python benchmarks/padding.py --json benchmarks/results/padding.json > benchmarks/results/padding.txt
    python benchmarks/padding.py --quick   # smoke run
"""

import argparse
import os
import sys
import tempfile

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import apply_quick, floor, in_memory_checkpoints, measure, run_benchmark  # noqa: E402

from captum_tracin_we import save_checkpoint  # noqa: E402
from captum_tracin_we.compare import compare_influence_methods  # noqa: E402
from captum_tracin_we.data import encode, load_minilm_classifier, load_movie_reviews, PaddedPerBatch  # noqa: E402

FLOOR = "floor"
METHODS = ("TracInWE", "TracInWE-TopK", "TracInWE (cosine)", "InfluenceWE (EK-FAC)", "TracInCP (last layer)",
           "TracInCPFast")
PADDINGS = ("longest", "batch")
QUICK = dict(train=24, test=2, layers=1, batch_size=8, methods=["TracInWE", "TracInCPFast"])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2, help="MiniLM layers kept")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--top-k-tokens", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--quick", action="store_true", help="a tiny setting, for the tests")
    return apply_quick(parser.parse_args(argv), parser, QUICK)


def checkpoints_of(model, directory, count):
    """`count` checkpoints: the pretrained weights, then slightly perturbed copies, with learning rates."""
    torch.manual_seed(0)
    paths = []
    for c in range(count):
        if c:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(1e-3 * torch.randn_like(p))
        paths.append(os.path.join(directory, f"checkpoint-{c}.pt"))
        save_checkpoint(model, paths[-1], learning_rate=1e-3 * (c + 1))
    return paths


def run(args):
    data = load_movie_reviews(n_train=args.train, n_test=args.test)
    model, tokenizer = load_minilm_classifier(2, num_hidden_layers=args.layers)
    datasets = {padding: (encode(tokenizer, data.train_texts, data.train_labels, args.max_length, padding),
                          encode(tokenizer, data.test_texts, data.test_labels, args.max_length, padding))
                for padding in PADDINGS}
    lengths = datasets["batch"][0].lengths.float()
    with tempfile.TemporaryDirectory() as directory:
        checkpoints = checkpoints_of(model, directory, args.checkpoints)
        load = in_memory_checkpoints(model, checkpoints)
        def scores_of(method, train, test):
            inputs = test.batch() if isinstance(test, PaddedPerBatch) else test.tensors
            return compare_influence_methods(
                model, train, checkpoints, inputs, nn.CrossEntropyLoss(), "model.classifier", methods=[method],
                top_k_tokens=args.top_k_tokens, batch_size=args.batch_size, checkpoints_load_func=load,
                cache_checkpoints=False).results[method].scores

        # warm-up of every code path on a few examples, so that neither padding pays first-call costs
        for train, test in datasets.values():
            for method in args.methods:
                scores_of(method, Subset(train, range(2 * args.batch_size)), test)
        results = {FLOOR: {}}
        for padding, (train, _) in datasets.items():
            batches = list(train.loader(args.batch_size) if isinstance(train, PaddedPerBatch)
                           else DataLoader(train, batch_size=args.batch_size))
            results[FLOOR][padding] = {"seconds": measure(lambda: floor(model, batches, checkpoints, load)).seconds}
        for method in args.methods:
            results[method] = {}
            for padding, (train, test) in datasets.items():
                measured = measure(lambda: scores_of(method, train, test))
                results[method][padding] = {"seconds": measured.seconds, "scores": measured.result}
            scores = [results[method][padding].pop("scores") for padding in PADDINGS]
            results[method]["max_relative_difference"] = float(
                (scores[0] - scores[1]).abs().max() / scores[0].abs().max())
            print(f"{method}: " + ", ".join(f"{p} {results[method][p]['seconds']:.1f} s" for p in PADDINGS),
                  file=sys.stderr)
    for entry in results.values():
        entry["speedup"] = entry["longest"]["seconds"] / entry["batch"]["seconds"]
    return {
        "settings": vars(args), "padded_length": int(datasets["longest"][0].tensors[0].shape[1]),
        "mean_length": float(lengths.mean()), "methods": results,
    }


def report(results):
    s = results["settings"]
    print(f"MR, {s['train']} training and {s['test']} test sentences, MiniLM's first {s['layers']} layers, "
          f"{s['checkpoints']} checkpoints, batch {s['batch_size']}: padded to {results['padded_length']} "
          f"tokens for the whole dataset, {results['mean_length']:.1f} on average\n")
    print("| method | padded to the longest text, s | padded per batch, s | speed-up | max relative difference |")
    print("|---|---:|---:|---:|---:|")
    for method, r in results["methods"].items():
        difference = r.get("max_relative_difference")
        print(f"| {method} | {r['longest']['seconds']:.2f} | {r['batch']['seconds']:.2f} | {r['speedup']:.2f}x "
              f"| {'' if difference is None else f'{difference:.1e}'} |")


def main(argv=None):
    return run_benchmark(parse_args(argv), run, report)


if __name__ == "__main__":
    main()
