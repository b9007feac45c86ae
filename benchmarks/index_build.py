"""
Building an index in many small chunks: its time per chunk should not grow with
the number of chunks (each chunk appends one line to the build's progress log,
and every file is flushed to disk before it is logged). Measured against the
floor (one forward and backward pass per batch and checkpoint) in the same run,
on a small BERT so that writing, not computing, dominates.

    python benchmarks/index_build.py --json benchmarks/results/index_build.json > benchmarks/results/index_build.txt
    python benchmarks/index_build.py --chunks 10 20 --chunk-examples 2   # smoke run
"""

import os
import sys
import tempfile
from argparse import Namespace

from torch import nn
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import benchmark_parser, build, floor, run_benchmark, timed  # noqa: E402

from captum_tracin_we import TracInWE  # noqa: E402


def parse_args(argv):
    parser = benchmark_parser(__doc__.split("\n\n")[0], train=0)
    parser.set_defaults(vocab=1000, hidden=16, layers=1, seq_len=16, checkpoints=1, repeats=3)
    parser.add_argument("--chunks", type=int, nargs="+", default=[200, 400, 800, 1600],
                        help="numbers of chunks to build (each of --chunk-examples examples)")
    parser.add_argument("--chunk-examples", type=int, default=5, help="examples per chunk (one batch)")
    return parser.parse_args(argv)


def run(args):
    most = max(args.chunks) * args.chunk_examples
    with tempfile.TemporaryDirectory() as directory:
        model, train, _, checkpoints = build(Namespace(**{**vars(args), "train": most, "test": 1}), directory)
        rows = []
        for n_chunks in args.chunks:
            data = Subset(train, range(n_chunks * args.chunk_examples))
            tracin = TracInWE(model, data, checkpoints, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                              batch_size=args.chunk_examples)
            paths = iter(os.path.join(directory, f"index-{n_chunks}-{r}") for r in range(args.repeats))
            build_s, _ = timed(lambda: tracin.build_index(next(paths), chunk_size=args.chunk_examples),
                               args.repeats)
            batches = DataLoader(data, batch_size=args.chunk_examples)
            floor_s, _ = timed(lambda: floor(model, batches, checkpoints), args.repeats)
            rows.append({"chunks": n_chunks, "build_seconds": build_s, "floor_seconds": floor_s,
                         "seconds_per_chunk": build_s / (n_chunks * args.checkpoints)})
        first = rows[0]["seconds_per_chunk"]
        for row in rows:
            row["per_chunk_vs_fewest"] = row["seconds_per_chunk"] / first
            row["build_vs_floor"] = row["build_seconds"] / row["floor_seconds"]
        return {"setting": vars(args), "by_chunks": rows}


def report(r):
    s = r["setting"]
    print(f"chunks of {s['chunk_examples']} examples ({s['seq_len']} tokens), vocab {s['vocab']}, "
          f"hidden {s['hidden']}, {s['layers']} layer(s), {s['checkpoints']} checkpoint(s), "
          f"best of {s['repeats']}\n")
    print("| chunks | build s | floor s | build / floor | ms per chunk | per chunk vs fewest |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in r["by_chunks"]:
        print(f"| {row['chunks']} | {row['build_seconds']:.2f} | {row['floor_seconds']:.2f} | "
              f"{row['build_vs_floor']:.2f} | {1000 * row['seconds_per_chunk']:.1f} | "
              f"{row['per_chunk_vs_fewest']:.2f} |")


def main(argv=None):
    return run_benchmark(parse_args(argv), run, report)


if __name__ == "__main__":
    main(sys.argv[1:])
