"""
The training-gradient index: how much faster a query is when the training side
is read from an index instead of recomputed, what building it costs, and how
large it is (exact float32, and float16 with a random projection).

Same model and data as `speed.py` (a BERT with MiniLM's embedding size, random
weights, Zipf-like sentences), all measured in one process.

    python benchmarks/index.py --json benchmarks/results/index.json > benchmarks/results/index.txt
    python benchmarks/index.py --train 12 --test 2 --vocab 100 --hidden 16   # smoke run
"""

import os
import sys
import tempfile

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import benchmark_parser, build, index_size, run_benchmark, timed  # noqa: E402

from captum_tracin_we import TracInWE  # noqa: E402


def parse_args(argv):
    parser = benchmark_parser(__doc__.split("\n\n")[0], train=512)
    parser.add_argument("--projection-dim", type=int, default=None,
                        help="dimension of the projected index (default: hidden / 4)")
    return parser.parse_args(argv)


def run(args):
    with tempfile.TemporaryDirectory() as directory:
        model, train, test, checkpoints = build(args, directory)
        test_batch = test.tensors

        def tracin():
            return TracInWE(model, train, checkpoints, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                            batch_size=args.batch_size)

        plain = tracin()
        recompute_s, exact = timed(lambda: plain.influence(test_batch), args.repeats)

        indexed = tracin()
        exact_path = os.path.join(directory, "exact")
        build_s, index = timed(lambda: indexed.build_index(exact_path), 1)
        query_s, from_index = timed(lambda: indexed.influence(test_batch), args.repeats)

        projection = args.projection_dim or max(1, args.hidden // 4)
        small = tracin()
        small_path = os.path.join(directory, "small")
        small.build_index(small_path, dtype=torch.float16, projection_dim=projection)
        small_query_s, approximate = timed(lambda: small.influence(test_batch), args.repeats)

        exact_size = index_size(index, train, args.hidden)
        small_size = index_size(small.index, train, args.hidden)
        scale = exact.abs().max().item()
        return {
            "setting": vars(args) | {"projection_dim": projection},
            "recompute_seconds": recompute_s,
            "build_seconds": build_s,
            "query_seconds": query_s,
            "query_speedup": recompute_s / query_s,
            "index_max_abs_difference_over_max_score":
                (from_index - exact).abs().max().item() / scale,
            "bytes_per_example_per_checkpoint": exact_size["index_bytes_per_example"],
            "grad_bytes_per_example_per_checkpoint": exact_size["index_row_bytes_per_example"],
            "bound_unique_tokens_x_d_x_4": exact_size["index_bound_bytes_per_example"],
            "small_grad_bytes_per_example_per_checkpoint": small_size["index_row_bytes_per_example"],
            "small_size_reduction":
                exact_size["index_row_bytes_per_example"] / small_size["index_row_bytes_per_example"],
            "small_query_seconds": small_query_s,
            "small_max_abs_error_over_max_score": (approximate - exact).abs().max().item() / scale,
        }


def report(r):
    s = r["setting"]
    print(f"{s['train']} training and {s['test']} test sentences of {s['seq_len']} tokens, "
          f"vocab {s['vocab']}, hidden {s['hidden']}, {s['layers']} layers, "
          f"{s['checkpoints']} checkpoints, batch {s['batch_size']}\n")
    print("| step | seconds |\n|---|---:|")
    print(f"| influence, training side recomputed | {r['recompute_seconds']:.2f} |")
    print(f"| build the index (once) | {r['build_seconds']:.2f} |")
    print(f"| influence from the index | {r['query_seconds']:.3f} |")
    print(f"| influence from the float16 + projection index | {r['small_query_seconds']:.3f} |")
    print(f"\nquery speed-up from the index: {r['query_speedup']:.1f}x "
          f"(scores differ by {r['index_max_abs_difference_over_max_score']:.1e} of the largest)")
    print(f"index size per example and checkpoint: {r['bytes_per_example_per_checkpoint']:.0f} B "
          f"(gradient rows {r['grad_bytes_per_example_per_checkpoint']:.0f} B; "
          f"unique tokens x d x 4 = {r['bound_unique_tokens_x_d_x_4']:.0f} B)")
    print(f"float16 + projection to {s['projection_dim']}: rows "
          f"{r['small_grad_bytes_per_example_per_checkpoint']:.0f} B per example, "
          f"{r['small_size_reduction']:.1f}x smaller, max error "
          f"{r['small_max_abs_error_over_max_score']:.1e} of the largest score")


def main(argv=None):
    return run_benchmark(parse_args(argv), run, report)


if __name__ == "__main__":
    main(sys.argv[1:])
