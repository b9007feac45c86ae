"""
Top-k queries over large indexes: the time and peak memory of a top-10 query
from an index of 1,000 to 1,000,000 training sentences, and for 16 to 4,096 test
sentences; at the largest index, the query against a read of the same bytes
(the stored rows of the tokens the test sentences share, gathered once from the
index's files in the same run).

The model is the package's `TextCNN` with 64-dim word embeddings (the size of a
row of an index projected to 64 dims) and random weights, the sentences are the
Zipf-like 32-token ones of the other benchmarks, built from the model through
`build_index` (float16 rows, one checkpoint). Each build and query runs in a
fresh process; the indexes are kept in `--workdir` for reuse (with the time
their build took).

    python benchmarks/large_index.py --workdir /tmp/large --json benchmarks/results/large_index.json --plot benchmarks/results/large_index.png > benchmarks/results/large_index.txt
    python benchmarks/large_index.py --quick   # smoke run
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import apply_quick, in_subprocess, measure, run_benchmark  # noqa: E402

from captum_tracin_we import save_checkpoint, TracInWE  # noqa: E402
from captum_tracin_we.models import TextCNN  # noqa: E402

QUICK = dict(train_sizes=[200, 400], test_sizes=[2, 4], test_train=400, batch_size=64, chunk_size=64, vocab=300)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[1000, 10000, 100000, 1000000])
    parser.add_argument("--test-sizes", type=int, nargs="+", default=[16, 256, 1024, 4096])
    parser.add_argument("--test-train", type=int, default=100000, help="training sentences of the n_test curve")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--workdir", help="where the indexes are built and kept (default: a temporary folder)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--plot", help="write a PNG of the curves to this file")
    parser.add_argument("--passive-threads", action="store_true",
                        help="queries under OMP_WAIT_POLICY=PASSIVE, as before 2026-12-02 (users run the default, "
                             "under which the join's many small operations take about half as long)")
    parser.add_argument("--quick", action="store_true", help="a tiny setting, for the tests")
    return apply_quick(parser.parse_args(argv), parser, QUICK)


def sentences(n, vocab, seq_len, seed):
    """Zipf-like sentences: [CLS] and [SEP], 7 frequent words of 197, the rest from the long tail."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000 if vocab > 2000 else 3, vocab, (n, seq_len), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2
    ids[:, 1:8] = torch.randint(3, 200 if vocab > 200 else vocab, (n, 7), generator=g)
    return TensorDataset(ids, torch.randint(0, 2, (n,), generator=g))


def tracin_for(settings, n_train, directory):
    args = argparse.Namespace(**settings)
    model = TextCNN(args.vocab, 2, embedding_dim=64, seed=0).eval()
    checkpoint = os.path.join(directory, "checkpoint.pt")
    if not os.path.exists(checkpoint):
        save_checkpoint(model, checkpoint, learning_rate=1e-3)
    return TracInWE(model, sentences(n_train, args.vocab, args.seq_len, seed=1), [checkpoint],
                    loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=args.batch_size)


def build_point(settings, n_train):
    """Builds (once) the index of `n_train` sentences in the work folder; its seconds and size."""
    directory = os.path.join(settings["workdir"], f"train-{n_train}")
    os.makedirs(directory, exist_ok=True)
    path, record = os.path.join(directory, "index"), os.path.join(directory, "build.json")
    if os.path.isdir(path) and os.path.isfile(record):  # built by an earlier run: its time
        with open(record) as handle:
            return json.load(handle)
    tracin = tracin_for(settings, n_train, settings["workdir"])
    start = time.perf_counter()
    tracin.build_index(path, dtype=torch.float16, chunk_size=settings["chunk_size"])
    built = {"build_seconds": time.perf_counter() - start, "index_bytes": folder_bytes(path)}
    with open(record, "w") as handle:
        json.dump(built, handle)
    return built


def folder_bytes(path):
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def query_point(settings, n_train, n_test, with_read):
    """A top-k query of `n_test` sentences from the index of `n_train`: seconds and peak bytes, measured in
    this fresh process; with `with_read`, also the time to gather the shared tokens' stored rows once."""
    args = argparse.Namespace(**settings)
    tracin = tracin_for(settings, n_train, args.workdir)
    index = tracin.load_index(os.path.join(args.workdir, f"train-{n_train}", "index"), verify=False)
    test = sentences(n_test, args.vocab, args.seq_len, seed=2).tensors
    tracin.influence(tuple(t[:1] for t in test), k=args.k)  # warm-up: first-call costs
    result = {}
    if with_read:
        result["read_seconds"] = shared_rows_read(index, test[0])
    queried = measure(lambda: tracin.influence(test, k=args.k))
    result.update(query_seconds=queried.seconds, query_peak_bytes=queried.peak_bytes)
    if with_read:  # once before and once after the query, so that both see the same page cache
        result["read_seconds"] = (result["read_seconds"] + shared_rows_read(index, test[0])) / 2
    return result


def shared_rows_read(index, test_ids):
    """Seconds to read, from the index's files, the stored float16 rows (and their scales) of every token
    the test sentences hold, once."""
    wanted = np.unique(test_ids.numpy())
    files = sorted(index.manifest["files"])
    grads = [name for name in files if name.startswith("c0-k") and name.endswith("-grads.npy")]
    start = time.perf_counter()
    total = 0.0
    for name in grads:
        # the rows lie grouped by token id: token vocab[i]'s are starts[i]:starts[i + 1]
        vocab, starts = (np.load(os.path.join(index.path, name.replace("-grads.npy", f"-by_token_{part}.npy")))
                         for part in ("vocab", "starts"))
        rows = np.nonzero(np.isin(np.repeat(vocab, np.diff(starts)), wanted))[0]
        stored = np.load(os.path.join(index.path, name), mmap_mode="r")[rows]
        scales = np.load(os.path.join(index.path, name.replace("-grads.npy", "-row_scales.npy")), mmap_mode="r")
        total += float(stored[:, 0].astype(np.float32) @ scales[rows])  # use what was read
    return time.perf_counter() - start


def run(args):
    with tempfile.TemporaryDirectory() as scratch:
        settings = dict(vars(args), workdir=args.workdir or scratch)
        os.makedirs(settings["workdir"], exist_ok=True)
        builds, by_train, by_test = {}, [], []
        for n_train in sorted(set(args.train_sizes) | {args.test_train}):
            builds[n_train] = in_subprocess(build_point, settings=settings, n_train=n_train)
            print(f"index of {n_train}: built in {builds[n_train]['build_seconds']} s", file=sys.stderr)
        largest = max(args.train_sizes)
        for n_train in args.train_sizes:
            point = in_subprocess(query_point, passive_threads=args.passive_threads, settings=settings,
                                  n_train=n_train, n_test=args.test_sizes[0], with_read=n_train == largest)
            by_train.append({"train": n_train, "test": args.test_sizes[0], **builds[n_train], **point})
        for n_test in args.test_sizes:
            point = in_subprocess(query_point, passive_threads=args.passive_threads, settings=settings,
                                  n_train=args.test_train, n_test=n_test, with_read=False)
            by_test.append({"train": args.test_train, "test": n_test, **point})
    return {"settings": vars(args), "by_train": by_train, "by_test": by_test}


def report(results):
    s = results["settings"]
    print(f"Top-{s['k']} queries from float16 indexes of a TextCNN with 64-dim embeddings (random weights), "
          f"Zipf-like {s['seq_len']}-token sentences, chunks of {s['chunk_size']}; each point in a fresh process\n")
    print("| training sentences | test | index GB | build s | query s | query peak MB above baseline |")
    print("|---:|---:|---:|---:|---:|---:|")
    for p in results["by_train"] + results["by_test"]:
        built = p.get("build_seconds")
        size = p.get("index_bytes")
        peak = p["query_peak_bytes"]
        print(f"| {p['train']:,} | {p['test']:,} | {'' if size is None else f'{size / 1e9:.2f}'} "
              f"| {'' if built is None else f'{built:.1f}'} | {p['query_seconds']:.2f} "
              f"| {'n/a' if peak is None else f'{peak / 2 ** 20:.0f}'} |")
    largest = results["by_train"][-1]
    print(f"\nAt {largest['train']:,} training sentences: the query took {largest['query_seconds']:.2f} s, "
          f"{largest['query_seconds'] / largest['read_seconds']:.2f}x the {largest['read_seconds']:.2f} s of "
          "reading the shared tokens' stored rows once")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, points, key, label in ((axes[0], results["by_train"], "train", "training sentences"),
                                   (axes[1], results["by_test"], "test", "test sentences")):
        x = [p[key] for p in points]
        lines = ax.plot(x, [p["query_seconds"] for p in points], "o-", label="query seconds (left)")
        peaks = [p["query_peak_bytes"] for p in points]
        if all(peak is not None for peak in peaks):
            twin = ax.twinx()
            lines += twin.plot(x, [peak / 2 ** 20 for peak in peaks], "s--", color="tab:orange",
                               label="peak MB above baseline (right)")
            twin.set_ylabel("peak MB above baseline")
        ax.legend(lines, [line.get_label() for line in lines], loc="upper left", fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("query seconds")
        other = points[0]["test" if key == "train" else "train"]
        ax.set_title(f"top-{results['settings']['k']}, {other:,} {'test' if key == 'train' else 'training'}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main(argv=None):
    return run_benchmark(parse_args(argv), run, report, plot)


if __name__ == "__main__":
    main()
