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

import os
import sys
import tempfile

from captum.influence import TracInCP, TracInCPFast
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import EMBEDDING, LAST_LAYER, benchmark_parser, build, floor, run_benchmark, timed  # noqa: E402

from captum_tracin_we import load_checkpoint, TracInWE  # noqa: E402


def parse_args(argv):
    parser = benchmark_parser(__doc__.split("\n\n")[0], train=128)
    parser.add_argument("--top-k-tokens", type=int, default=10)
    parser.add_argument(
        "--sweep", type=int, nargs="*", default=[],
        help="also time TracInWE and TracInCP (embeddings) at these batch sizes",
    )
    return parser.parse_args(argv)


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
        fast = TracInCPFast(model, LAST_LAYER, checkpoints_load_func=load_checkpoint, loss_fn=sum_loss, **common)
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


def main(argv=None):
    return run_benchmark(parse_args(argv), run, report)


if __name__ == "__main__":
    main(sys.argv[1:])
