"""
A sharded index built by several processes under torchrun against one process:
the same script, the same model, data and checkpoints; the build's speed-up and
the query's time, and whether the scores and the top-10 are the same.

    python benchmarks/sharded.py --json benchmarks/results/sharded.json > benchmarks/results/sharded.txt
    python benchmarks/sharded.py --quick   # smoke run

On a machine with N GPUs or cores, `--processes N`; on 2 cores expect little
speed-up (each process then has one core): what this checks is that the sharded
build and its queries give the scores of one process.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import apply_quick, benchmark_parser, build, run_benchmark  # noqa: E402

from captum_tracin_we import TracInWE  # noqa: E402

QUICK = dict(vocab=300, hidden=16, train=24, test=2, batch_size=4, seq_len=12)
TOP_K = 10


def parse_args(argv):
    parser = benchmark_parser(__doc__.split("\n\n")[0], train=2000, repeats=False)
    parser.set_defaults(layers=1, batch_size=32)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny setting, for the tests")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a torchrun process: its settings file
    return apply_quick(parser.parse_args(argv), parser, QUICK)


def build_and_query(args, directory, checkpoints, threads):
    """Builds the index at `directory`/index and queries it; seconds and scores (this process's view)."""
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as own:
        model, train, test, _ = build(args, own)  # the same seeded model and data in every process
    tracin = TracInWE(model, train, checkpoints, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                      batch_size=args.batch_size)
    start = time.perf_counter()
    tracin.build_index(os.path.join(directory, "index"))
    built = time.perf_counter() - start
    start = time.perf_counter()
    scores = tracin.influence(test.tensors)
    queried = time.perf_counter() - start
    top = tracin.influence(test.tensors, k=TOP_K)
    return {"build_seconds": built, "query_seconds": queried, "scores": scores, "top": top.indices}


def worker(settings_file):
    """One torchrun process: the same code as one process runs, under torchrun's environment."""
    with open(settings_file) as handle:
        settings = json.load(handle)
    args = argparse.Namespace(**settings["args"])
    result = build_and_query(args, settings["directory"], settings["checkpoints"], settings["threads"])
    torch.save(result, os.path.join(settings["directory"], f"rank-{os.environ['RANK']}.pt"))
    torch.distributed.destroy_process_group()


def run(args):
    with tempfile.TemporaryDirectory() as directory:
        _, _, _, checkpoints = build(args, directory)
        threads = torch.get_num_threads()
        alone = os.path.join(directory, "alone")
        os.makedirs(alone)
        single = build_and_query(args, alone, checkpoints, threads)
        sharded = os.path.join(directory, "sharded")
        os.makedirs(sharded)
        settings = os.path.join(directory, "settings.json")
        with open(settings, "w") as handle:
            json.dump({"args": vars(args), "directory": sharded, "checkpoints": checkpoints,
                       "threads": max(1, threads // args.processes)}, handle)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.processes}",
                        f"--master-port={port}", os.path.abspath(__file__), "--worker", settings],
                       check=True, env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
        wall = time.perf_counter() - start
        ranks = [torch.load(os.path.join(sharded, f"rank-{r}.pt"), weights_only=False)
                 for r in range(args.processes)]
    difference = max(float((r["scores"] - single["scores"]).abs().max() / single["scores"].abs().max())
                     for r in ranks)
    return {
        "settings": vars(args),
        "single": {key: single[key] for key in ("build_seconds", "query_seconds")},
        "sharded": {
            "build_seconds": max(r["build_seconds"] for r in ranks),
            "query_seconds": max(r["query_seconds"] for r in ranks),
            "torchrun_wall_seconds": wall,
        },
        "build_speedup": single["build_seconds"] / max(r["build_seconds"] for r in ranks),
        "max_relative_difference": difference,
        "top_k_equal": all(torch.equal(r["top"], single["top"]) for r in ranks),
    }


def report(results):
    s, one, many = results["settings"], results["single"], results["sharded"]
    print(f"{s['train']} training and {s['test']} test sentences, {s['layers']}-layer BERT, d {s['hidden']}, "
          f"{s['checkpoints']} checkpoints; 1 process against {s['processes']} under torchrun (gloo)\n")
    print("| | 1 process | " + f"{s['processes']} processes |\n|---|---:|---:|")
    print(f"| build the index, s | {one['build_seconds']:.2f} | {many['build_seconds']:.2f} |")
    print(f"| query, s | {one['query_seconds']:.2f} | {many['query_seconds']:.2f} |")
    print(f"\nBuild speed-up {results['build_speedup']:.2f}x; scores differ by at most "
          f"{results['max_relative_difference']:.1e} (relative); top-{TOP_K} equal: {results['top_k_equal']}; "
          f"torchrun's whole run (start-up included) {many['torchrun_wall_seconds']:.1f} s")


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    return run_benchmark(args, run, report)


if __name__ == "__main__":
    main()
