"""
How time, peak memory and index size grow with the training set (1k to 20k
sentences) and with the sentence length, for TracInWE (exact, TopK, from an
index), Captum's TracInCPFast, the dense TracInCP on the embeddings (stopped past
`--dense-max` training examples, where it takes minutes per point) and the floor.

Same model and data as `methods.py` (MiniLM-sized BERT, random weights, Zipf-like
sentences), one checkpoint, each point in a fresh process.

    python benchmarks/scaling.py --json benchmarks/results/scaling.json --plot benchmarks/results/scaling.png > benchmarks/results/scaling.txt
    python benchmarks/scaling.py --vocab 60 --hidden 16 --train-sizes 6 12 --seq-lens 8 12 --seq-train 6 --test 2 --batch-size 3 --dense-max 6   # smoke run
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import benchmark_parser, in_subprocess, run_benchmark  # noqa: E402
from methods import DENSE, EXACT, FLOOR, INDEXED, TOPK, run_method  # noqa: E402

METHODS = (FLOOR, EXACT, TOPK, INDEXED, "TracInCPFast", DENSE)


def parse_args(argv):
    parser = benchmark_parser(__doc__.split("\n\n")[0], train=0, repeats=False)
    parser.set_defaults(checkpoints=1, batch_size=32)
    parser.add_argument("--train-sizes", type=int, nargs="+", default=[1000, 2000, 5000, 10000, 20000])
    parser.add_argument("--dense-max", type=int, default=1000,
                        help="run the dense TracInCP only up to this many training examples")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--seq-train", type=int, default=128,
                        help="training examples of the sequence-length curve")
    parser.add_argument("--top-k-tokens", type=int, default=10)
    parser.add_argument("--projection-dim", type=int, default=None)
    parser.add_argument("--plot", help="write a PNG of the curves to this file")
    return parser.parse_args(argv)


def curve(args, name, values, train_of, seq_len_of):
    """Every method at every point of one curve; the dense TracInCP only while it is practical."""
    points = []
    for value in values:
        settings = dict(vars(args), train=train_of(value), seq_len=seq_len_of(value))
        methods = [m for m in METHODS if m != DENSE or settings["train"] <= args.dense_max]
        results = {m: in_subprocess(run_method, settings=settings, method=m) for m in methods}
        for r in results.values():
            r.pop("scores")
        points.append({name: value, "methods": results})
        print(f"{name} {value}: " + ", ".join(f"{m} {r['seconds']:.1f} s" for m, r in results.items()),
              file=sys.stderr)
    return points


def run(args):
    return {
        "settings": vars(args),
        "by_train_size": curve(args, "train", args.train_sizes, lambda n: n, lambda n: args.seq_len),
        "by_seq_len": curve(args, "seq_len", args.seq_lens, lambda n: args.seq_train, lambda n: n),
    }


def report(results):
    s = results["settings"]
    print(f"vocab {s['vocab']}, hidden {s['hidden']}, {s['layers']} layers, {s['checkpoints']} checkpoint, "
          f"batch {s['batch_size']}, {s['test']} test sentences; the dense TracInCP runs up to "
          f"{s['dense_max']} training examples\n")
    for key, label in (("by_train_size", "train"), ("by_seq_len", "seq_len")):
        points = results[key]
        methods = [m for m in METHODS if m in points[0]["methods"]]
        print(f"| {label} | " + " | ".join(f"{m} s" for m in methods) + " | TracInWE x floor |")
        print("|---:|" + "---:|" * (len(methods) + 1))
        for p in points:
            r = p["methods"]
            cells = [f"{r[m]['seconds']:.2f}" if m in r else "stopped" for m in methods]
            print(f"| {p[label]} | " + " | ".join(cells) + f" | {r[EXACT]['seconds'] / r[FLOOR]['seconds']:.2f} |")
        print("\n| " + label + " | " + " | ".join(f"{m} peak MB" for m in methods) + " |")
        print("|---:|" + "---:|" * len(methods))
        for p in points:
            r = p["methods"]
            cells = [_mb(r[m]["peak_bytes"]) if m in r else "stopped" for m in methods]
            print(f"| {p[label]} | " + " | ".join(cells) + " |")
        print()
    print("| train | index bytes per example | gradient rows | unique tokens x d x 4 | build s | query s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for p in results["by_train_size"]:
        r = p["methods"][INDEXED]
        print(f"| {p['train']} | {r['index_bytes_per_example']:.0f} | {r['index_row_bytes_per_example']:.0f} "
              f"| {r['index_bound_bytes_per_example']:.0f} | {r['build_seconds']:.1f} | {r['seconds']:.2f} |")


def _mb(peak_bytes):
    return "n/a" if peak_bytes is None else f"{peak_bytes / 2**20:.0f}"


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5))
    panels = [
        (axes[0, 0], "by_train_size", "train", "seconds", "time (s)"),
        (axes[0, 1], "by_train_size", "train", "peak_bytes", "peak memory above start (MB)"),
        (axes[1, 0], "by_seq_len", "seq_len", "seconds", "time (s)"),
    ]
    for ax, key, x, field, ylabel in panels:
        points = results[key]
        scale = 2**20 if field == "peak_bytes" else 1
        for method in METHODS:
            pairs = [(p[x], p["methods"][method][field] / scale) for p in points
                     if p["methods"].get(method, {}).get(field) is not None]
            if pairs:
                ax.plot(*zip(*pairs), marker="o", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training examples" if x == "train" else
                      f"tokens per sentence ({results['settings']['seq_train']} training examples)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    dense = [p for p in results["by_train_size"] if DENSE in p["methods"]]
    if dense:
        last = max(dense, key=lambda p: p["train"])
        axes[0, 0].annotate(f"dense TracInCP stopped\nafter {last['train']} examples",
                            (last["train"], last["methods"][DENSE]["seconds"]), xytext=(12, -4),
                            textcoords="offset points", fontsize=8, va="top")
    ax = axes[1, 1]
    points = results["by_train_size"]
    xs = [p["train"] for p in points]
    for field, label in (("index_bytes_per_example", "index, all files"),
                         ("index_bound_bytes_per_example", "unique tokens x d x 4")):
        ax.plot(xs, [p["methods"][INDEXED][field] / 1024 for p in points], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.2 * max(p["methods"][INDEXED]["index_bytes_per_example"] for p in points) / 1024)
    ax.set_xlabel("training examples")
    ax.set_ylabel("KiB per training example (float32)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.suptitle("Scaling: time, memory and index size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    return run_benchmark(parse_args(argv), run, report, plot)


if __name__ == "__main__":
    main(sys.argv[1:])
