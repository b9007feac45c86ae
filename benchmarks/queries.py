"""
Queries from a built index as the test set grows: the time of a query (the test
gradients, reading the index, the token join) against the time of building the
index, in the same run, with the test examples as one batch and as a DataLoader
of the build's batch size, and the token join alone, by GEMMs ("auto") and by
gathered pairs ("gather", the reference), against a dense matrix product of the
same useful FLOPs (2 d per pair of rows sharing a token), the join by GEMMs and
the GEMM taken in turn, the best of `--repeats` each.

A 1-layer BERT with MiniLM's embedding size (random weights) and Zipf-like
32-token sentences, as in `speed.py`; each point in a fresh process.

    python benchmarks/queries.py --json benchmarks/results/queries.json > benchmarks/results/queries.txt
    python benchmarks/queries.py --quick   # smoke run
"""

import argparse
import os
import sys
import tempfile

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import apply_quick, benchmark_parser, build, in_memory_checkpoints, in_subprocess, measure, run_benchmark  # noqa: E402

from captum_tracin_we import TokenMajorGradients, TokenPostings, TracInWE  # noqa: E402

QUICK = dict(vocab=300, hidden=16, points=["2x12", "6x20"], batch_size=4, seq_len=12, repeats=1)
TOP_K = 10


def parse_args(argv):
    parser = benchmark_parser(__doc__.split("\n\n")[0], train=0)
    parser.set_defaults(layers=1, batch_size=32, repeats=5)
    parser.add_argument("--points", nargs="+", default=["16x2000", "256x2000", "1024x8000"],
                        help="test x train sizes")
    parser.add_argument("--gather-max", type=int, default=10 ** 7,
                        help="time the gather join only up to this many test x train pairs")
    parser.add_argument("--passive-threads", action="store_true",
                        help="OMP_WAIT_POLICY=PASSIVE, as before 2026-12-02 (the join then takes about twice as long)")
    parser.add_argument("--huge-pages", action="store_true",
                        help="THP_MEM_ALLOC_ENABLE=1: torch's large CPU tensors on transparent huge pages")
    parser.add_argument("--quick", action="store_true", help="a tiny setting, for the tests")
    args = apply_quick(parser.parse_args(argv), parser, QUICK)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def run_point(settings):
    """One test x train point, measured in this (fresh) process."""
    args = argparse.Namespace(**settings)
    with tempfile.TemporaryDirectory() as directory:
        model, train, test, checkpoints = build(args, directory)
        load = in_memory_checkpoints(model, checkpoints)
        tracin = TracInWE(model, train, checkpoints, checkpoints_load_func=load,
                          loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=args.batch_size)
        built = measure(lambda: tracin.build_index(os.path.join(directory, "index")))
        # the test set as one batch (run as one forward and backward, as Captum runs a batch) and as
        # batches of the build's size, as a user passes a large test set
        query = measure(lambda: tracin.influence(test.tensors))
        batches = DataLoader(test, batch_size=args.batch_size)
        batched = measure(lambda: tracin.influence(batches))
        top = measure(lambda: tracin.influence(batches, k=TOP_K))
        stable = torch.sort(batched.result, dim=1, descending=True, stable=True).indices[:, :TOP_K]
        result = {
            "build_seconds": built.seconds, "query_seconds": query.seconds, "query_peak_bytes": query.peak_bytes,
            "query_batched_seconds": batched.seconds, "query_batched_peak_bytes": batched.peak_bytes,
            "batched_max_relative_difference": relative_difference(batched.result, query.result),
            "top_k_seconds": top.seconds, "top_k_peak_bytes": top.peak_bytes,
            "top_k_equals_stable_sort": bool(torch.equal(top.result.indices, stable)),
        }
        result.update(joins(built.result, args))
    return result


def joins(index, args):
    """The token join alone over every chunk and checkpoint, with the first `test` training examples as
    the test rows (the same token statistics), by both joins and by a dense GEMM of the same FLOPs."""
    # as a query meets them: the chunks as stored, and the test rows, grouped by token id
    chunks = [[index.chunk_by_token(c, k) for k in range(index.num_chunks(c))] for c in range(index.num_checkpoints)]
    queries = [TokenMajorGradients.of(index.select(c, list(range(args.test)))) for c in range(index.num_checkpoints)]
    pairs = sum(shared_pairs(q, chunk) for q, per_c in zip(queries, chunks) for chunk in per_c)
    flops = 2 * args.hidden * pairs

    def join(how):
        # the blocks as the join gives them (a query sums them over checkpoints): concatenating is no join
        return [q.products(chunk, how) for q, per_c in zip(queries, chunks) for chunk in per_c]

    # the same FLOPs as one (test x K) @ (K x train) product
    inner = max(1, round(flops / (2 * args.test * args.train)))
    a, b = torch.randn(args.test, inner), torch.randn(inner, args.train)
    a @ b  # warm-up
    # the join and the GEMM taken in turn, the best of --repeats each: a noisy machine slows both alike
    auto, gemm = [], []
    for _ in range(args.repeats):
        auto.append(measure(lambda: join("auto")))
        gemm.append(measure(lambda: a @ b))
    out = {"pairs": pairs, "flops": flops, "join_auto_seconds": min(m.seconds for m in auto),
           "dense_gemm_seconds": min(m.seconds for m in gemm)}
    if args.test * args.train <= args.gather_max:
        gather = measure(lambda: join("gather"))
        out["join_gather_seconds"] = gather.seconds
        by_gemms, by_gathers = (torch.cat([block.view(-1) for block in m.result]) for m in (auto[0], gather))
        out["join_max_relative_difference"] = relative_difference(by_gemms, by_gathers)
    return out


def relative_difference(a, b):
    """The largest difference of `a` from `b`, relative to `b`'s largest magnitude."""
    return float((a - b).abs().max() / b.abs().max())


def shared_pairs(test, train):
    """Pairs of a test row and a training row holding the same token."""
    mine, theirs = TokenPostings.of(test.token_ids), train.postings()
    _, counts = theirs.lookup(mine.vocab)
    return int(((mine.starts[1:] - mine.starts[:-1]) * counts).sum())


def run(args):
    points = []
    for point in args.points:
        n_test, n_train = (int(n) for n in point.split("x"))
        settings = dict(vars(args), test=n_test, train=n_train)
        # the threads' default wait policy, as users run: the join is thousands of small parallel operations
        result = in_subprocess(run_point, passive_threads=args.passive_threads,
                              huge_pages=args.huge_pages, settings=settings)
        points.append({"test": n_test, "train": n_train, **result})
        print(f"{point}: build {result['build_seconds']:.1f} s, query {result['query_seconds']:.2f} s",
              file=sys.stderr)
    return {"settings": vars(args), "points": points}


def report(results):
    s = results["settings"]
    policy = "PASSIVE" if s.get("passive_threads", True) else "the default"
    print(f"Queries from an index: {s['layers']}-layer BERT, d {s['hidden']}, vocabulary {s['vocab']}, "
          f"{s['seq_len']}-token Zipf-like sentences, {s['checkpoints']} checkpoints, batch {s['batch_size']}; "
          f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY {policy}, "
          f"huge pages (THP_MEM_ALLOC_ENABLE) {'on' if s.get('huge_pages') else 'off'}\n")
    b = s["batch_size"]
    print(f"| test x train | build s | query, one batch, s | that / build | query, batches of {b}, s | that / build "
          "| top-10 s | top-10 peak MB | join (auto) s | join (gather) s | gather / auto "
          "| dense GEMM, same FLOPs, s | join / GEMM |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in results["points"]:
        gather = p.get("join_gather_seconds")
        auto = p["join_auto_seconds"]
        gather_cells = ("", "") if gather is None else (f"{gather:.3f}", f"{gather / auto:.1f}x")
        peak = "n/a" if p["top_k_peak_bytes"] is None else f"{p['top_k_peak_bytes'] / 2 ** 20:.0f}"
        print(f"| {p['test']:,} x {p['train']:,} | {p['build_seconds']:.2f} | {p['query_seconds']:.2f} "
              f"| {p['query_seconds'] / p['build_seconds']:.3f} | {p['query_batched_seconds']:.2f} "
              f"| {p['query_batched_seconds'] / p['build_seconds']:.3f} | {p['top_k_seconds']:.2f} | {peak} "
              f"| {auto:.3f} | {gather_cells[0]} | {gather_cells[1]} "
              f"| {p['dense_gemm_seconds']:.3f} | {auto / p['dense_gemm_seconds']:.2f} |")
    for p in results["points"]:
        joins_differ = "" if "join_max_relative_difference" not in p else \
            f"the joins differ by at most {p['join_max_relative_difference']:.1e} (relative); "
        print(f"\n{p['test']} x {p['train']}: {joins_differ}the query in batches differs from the one batch's by at most "
              f"{p['batched_max_relative_difference']:.1e} (relative); top-10 (in batches) equals a stable sort "
              f"of the matrix: {p['top_k_equals_stable_sort']}", end="")
    print()


def main(argv=None):
    return run_benchmark(parse_args(argv), run, report)


if __name__ == "__main__":
    main()
