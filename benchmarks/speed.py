"""
Speed of TracInWE against Captum's TracInCP on the word embeddings (the same
scores, computed densely), Captum's TracInCPFast (last layer), and the floor: one
forward and one backward pass over the same batches and checkpoints.

All methods run in one process on the same model, data and checkpoints; the
script prints each time, its ratio to the floor and to TracInWE, and the largest
relative difference of TracInWE's scores to TracInCP's.

    python benchmarks/speed.py                      # the README's numbers
    python benchmarks/speed.py --train 8 --test 2 --vocab 100 --hidden 16   # smoke run
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch
from captum.influence import TracInCP, TracInCPFast
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from captum_tracin_we import HuggingFaceClassifier, load_checkpoint, save_checkpoint, TracInWE

EMBEDDING = "model.bert.embeddings.word_embeddings"


def benchmark_parser(description, train):
    """Options of the model and data that `build` makes, shared by the benchmarks."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--train", type=int, default=train)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpoints", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="time each method this many times, keep the best")
    parser.add_argument("--json", help="write the results to this file")
    return parser


def parse_args(argv):
    parser = benchmark_parser(__doc__.split("\n\n")[0], train=128)
    parser.add_argument("--top-k-tokens", type=int, default=10)
    parser.add_argument(
        "--sweep", type=int, nargs="*", default=[],
        help="also time TracInWE and TracInCP (embeddings) at these batch sizes",
    )
    return parser.parse_args(argv)


def build(args, directory):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        intermediate_size=4 * args.hidden,
        max_position_embeddings=max(64, args.seq_len),
        num_labels=2,
    )
    model = HuggingFaceClassifier(BertForSequenceClassification(config)).eval()

    def sentences(n):
        ids = torch.randint(1000 if args.vocab > 2000 else 1, args.vocab, (n, args.seq_len))
        ids[:, 0], ids[:, -1] = 1, 2  # shared special tokens, like [CLS] and [SEP]
        return TensorDataset(ids, torch.ones_like(ids), torch.randint(0, 2, (n,)))

    # a Zipf-like vocabulary: frequent words shared by many sentences
    train, test = sentences(args.train), sentences(args.test)
    for dataset in (train, test):
        common = torch.randint(3, 200 if args.vocab > 200 else args.vocab, dataset.tensors[0][:, 1:8].shape)
        dataset.tensors[0][:, 1:8] = common
    checkpoints = []
    for c in range(args.checkpoints):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        path = os.path.join(directory, f"checkpoint-{c}.pt")
        save_checkpoint(model, path, learning_rate=1e-3 * (c + 1))
        checkpoints.append(path)
    return model, train, test, checkpoints


def timed(fn, repeats):
    """The best of `repeats` wall-clock times, and the last result."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def floor(model, batches, checkpoints):
    """One forward and one full backward pass per batch and checkpoint."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for checkpoint in checkpoints:
        load_checkpoint(model, checkpoint)
        for ids, mask, labels in batches:
            loss_fn(model(ids, mask), labels).backward()
            model.zero_grad(set_to_none=True)


def run(args):
    with tempfile.TemporaryDirectory() as directory:
        model, train, test, checkpoints = build(args, directory)
        test_batch = test.tensors
        batches = [test_batch] + list(DataLoader(train, batch_size=args.batch_size))
        common = dict(train_dataset=train, checkpoints=checkpoints, batch_size=args.batch_size)
        none_loss = nn.CrossEntropyLoss(reduction="none")
        sum_loss = nn.CrossEntropyLoss(reduction="sum")

        times, scores = {}, {}
        floor(model, batches[:1], checkpoints[:1])  # warm-up: first-call allocations
        r = args.repeats
        times["floor"], _ = timed(lambda: floor(model, batches, checkpoints), r)
        exact = TracInWE(model, checkpoints_load_func=load_checkpoint, loss_fn=sum_loss, **common)
        times["TracInWE"], scores["TracInWE"] = timed(lambda: exact.influence(test_batch), r)
        top_k = TracInWE(model, loss_fn=sum_loss, top_k_tokens=args.top_k_tokens, **common)
        times[f"TracInWE-Top{args.top_k_tokens}"], _ = timed(lambda: top_k.influence(test_batch), r)
        fast = TracInCPFast(model, "model.classifier", checkpoints_load_func=load_checkpoint, loss_fn=sum_loss, **common)
        times["TracInCPFast (last layer)"], _ = timed(lambda: fast.influence(test_batch), r)
        dense = TracInCP(model, checkpoints_load_func=load_checkpoint, layers=[EMBEDDING], loss_fn=none_loss, **common)
        times["TracInCP (embeddings)"], scores["TracInCP"] = timed(lambda: dense.influence(test_batch), r)

        sweep = {
            size: sweep_batch_size(model, train, test_batch, checkpoints, size, r)
            for size in args.sweep
        }

    difference = (scores["TracInWE"] - scores["TracInCP"]).abs().max() / scores["TracInCP"].abs().max()
    return {
        "settings": vars(args),
        "seconds": times,
        "batch_size_sweep": sweep,
        "max_relative_difference_to_TracInCP": difference.item(),
        "speedup_over_TracInCP": times["TracInCP (embeddings)"] / times["TracInWE"],
        "ratio_to_floor": times["TracInWE"] / times["floor"],
    }


def sweep_batch_size(model, train, test_batch, checkpoints, batch_size, repeats):
    """Seconds of the floor, TracInWE and TracInCP (embeddings) at one batch size."""
    common = dict(train_dataset=train, checkpoints=checkpoints, batch_size=batch_size)
    batches = [test_batch] + list(DataLoader(train, batch_size=batch_size))
    ours = TracInWE(model, loss_fn=nn.CrossEntropyLoss(reduction="sum"), **common)
    dense = TracInCP(
        model, checkpoints_load_func=load_checkpoint, layers=[EMBEDDING],
        loss_fn=nn.CrossEntropyLoss(reduction="none"), **common,
    )
    return {
        "floor": timed(lambda: floor(model, batches, checkpoints), repeats)[0],
        "TracInWE": timed(lambda: ours.influence(test_batch), repeats)[0],
        "TracInCP (embeddings)": timed(lambda: dense.influence(test_batch), repeats)[0],
    }


def report(results):
    times = results["seconds"]
    print(f"{'method':28s} {'seconds':>9s} {'x floor':>9s} {'x TracInWE':>11s}")
    for name, seconds in times.items():
        print(f"{name:28s} {seconds:9.3f} {seconds / times['floor']:9.2f} {seconds / times['TracInWE']:11.2f}")
    print(f"TracInWE is {results['speedup_over_TracInCP']:.1f}x faster than TracInCP on the embeddings, "
          f"{results['ratio_to_floor']:.2f}x the floor; max relative difference "
          f"{results['max_relative_difference_to_TracInCP']:.2e}")
    if results["batch_size_sweep"]:
        print(f"\n{'batch size':>10s} {'floor s':>8s} {'TracInWE s':>11s} {'TracInCP s':>11s} {'speedup':>8s} {'x floor':>8s}")
        for size, t in results["batch_size_sweep"].items():
            print(f"{size:10d} {t['floor']:8.3f} {t['TracInWE']:11.3f} {t['TracInCP (embeddings)']:11.3f} "
                  f"{t['TracInCP (embeddings)'] / t['TracInWE']:8.1f} {t['TracInWE'] / t['floor']:8.2f}")


def run_benchmark(args, run, report):
    """Runs a benchmark, prints its report, and writes its results to `--json` if given."""
    results = run(args)
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


def main(argv=None):
    return run_benchmark(parse_args(argv), run, report)


if __name__ == "__main__":
    main(sys.argv[1:])
