"""
Every TracIn method side by side, on MiniLM- and BERT-base-sized embeddings:
time and peak memory of TracInWE (exact, TopK, and queried from a built index)
and InfluenceWE (EK-FAC and K-FAC: fitting the factors, then a query; ASTRA's
cost per test example and step) against Captum's TracInCP on the word embeddings
(the same scores as TracInWE, computed densely), TracInCP on the last layer,
TracInCPFast, TracInCPFastRandProj and the floor (one forward and one backward
pass over the same batches and checkpoints).

Each method runs in a fresh process on the same model, data and checkpoints
(built from the same seed), so its peak memory is its own; times and memory are
reported as ratios to the floor measured in the same run. Every method restores
the checkpoints from memory (read once before it is measured), and Captum's run
through `compare_influence_methods` (construction included in the time).

    python benchmarks/methods.py --json benchmarks/results/methods.json --plot benchmarks/results/methods.png > benchmarks/results/methods.txt
    python benchmarks/methods.py --sizes 16 --vocab 60 --train 6 --test 2 --seq-len 8 --batch-size 3   # smoke run
"""

import argparse
import os
import sys
import tempfile

from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    LAST_LAYER, benchmark_parser, build, floor, in_memory_checkpoints, in_subprocess, index_size, measure,
    run_benchmark,
)

from captum_tracin_we import InfluenceWE, TracInWE  # noqa: E402
from captum_tracin_we.compare import compare_influence_methods  # noqa: E402

FLOOR = "floor"
EXACT = "TracInWE"
TOPK = "TracInWE-TopK"
INDEXED = "TracInWE (from index)"
DENSE = "TracInCP (embeddings)"
EKFAC = "InfluenceWE (EK-FAC)"
KFAC = "InfluenceWE (K-FAC)"
ASTRA = "InfluenceWE (EK-FAC, ASTRA)"
METHODS = (
    FLOOR, EXACT, TOPK, INDEXED, EKFAC, KFAC, ASTRA, DENSE,
    "TracInCP (last layer)", "TracInCPFast", "TracInCPFastRandProj",
)
SIZES = {384: "MiniLM-sized (d 384)", 768: "BERT-base-sized (d 768)"}


def parse_args(argv):
    parser = benchmark_parser(__doc__.split("\n\n")[0], train=256, repeats=False)
    parser.set_defaults(batch_size=32)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES),
                        help="embedding dimensions to run (384: MiniLM, 768: BERT-base)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--top-k-tokens", type=int, default=10)
    parser.add_argument("--projection-dim", type=int, default=16,
                        help="TracInCPFastRandProj's projection dimension")
    parser.add_argument("--astra-steps", type=int, default=2, help="ASTRA iterations timed")
    parser.add_argument("--astra-test", type=int, default=1, help="test examples ASTRA refines")
    parser.add_argument("--plot", help="write a PNG of the ratios to this file")
    return parser.parse_args(argv)


def run_method(settings, method):
    """One method, measured in this (fresh) process: seconds, peak bytes, scores."""
    args = argparse.Namespace(**settings)
    with tempfile.TemporaryDirectory() as directory:
        model, train, test, checkpoints = build(args, directory)
        test_batch = test.tensors
        batches = [test_batch] + list(DataLoader(train, batch_size=args.batch_size))
        load = in_memory_checkpoints(model, checkpoints)
        floor(model, batches[:1], checkpoints[:1], load)  # warm-up: first-call allocations
        extra = {}
        if method == FLOOR:
            measured = measure(lambda: floor(model, batches, checkpoints, load))
        elif method in (EKFAC, KFAC):
            influence = InfluenceWE(model, train, checkpoints, checkpoints_load_func=load,
                                    loss_fn=nn.CrossEntropyLoss(), batch_size=args.batch_size,
                                    approximation="ekfac" if method == EKFAC else "kfac")
            fitted = measure(influence.fit_factors)
            extra = {"fit_seconds": fitted.seconds, "fit_peak_bytes": fitted.peak_bytes,
                     "factor_bytes": sum(a.numel() * a.element_size()
                                         for curvature in fitted.result for a in curvature.arrays().values())}
            measured = measure(lambda: influence.influence(test_batch))
            extra["query_seconds"] = measured.seconds
            measured.seconds += fitted.seconds  # the method's time includes its fitting
        elif method == ASTRA:
            extra = astra_costs(args, model, train, test_batch, checkpoints, load)
            measured = extra.pop("measured")
        elif method == INDEXED:
            tracin = TracInWE(model, train, checkpoints, checkpoints_load_func=load,
                              loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=args.batch_size)
            built = measure(lambda: tracin.build_index(os.path.join(directory, "index")))
            extra = {"build_seconds": built.seconds, "build_peak_bytes": built.peak_bytes,
                     **index_size(built.result, train, args.hidden)}
            measured = measure(lambda: tracin.influence(test_batch))
        else:
            measured = measure(lambda: compare_influence_methods(
                model, train, checkpoints, test_batch, nn.CrossEntropyLoss(), LAST_LAYER,
                methods=[method], top_k_tokens=args.top_k_tokens,
                batch_size=args.batch_size, projection_dim=args.projection_dim,
                checkpoints_load_func=load, cache_checkpoints=False,
            ).results[method].scores)
    scores = None if method == FLOOR else measured.result
    return {"seconds": measured.seconds, "peak_bytes": measured.peak_bytes, "scores": scores, **extra}


def astra_costs(args, model, train, test_batch, checkpoints, load):
    """ASTRA's cost: seconds per test example and step, and the one-time power iterations that estimate
    the step, from the differences of timed runs with 0, s and 2s steps (the factors fitted beforehand)."""
    first = tuple(tensor[:args.astra_test] for tensor in test_batch)

    def timed(steps):
        influence = InfluenceWE(model, train, checkpoints, checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(),
                                batch_size=args.batch_size, refinement_steps=steps)
        influence.fit_factors()
        return measure(lambda: influence.influence(first))

    steps = args.astra_steps
    plain, single, double = timed(0), timed(steps), timed(2 * steps)
    per_step = (double.seconds - single.seconds) / (steps * args.astra_test)
    return {
        "measured": single, "astra_steps": steps, "astra_test": args.astra_test,
        "seconds_per_test_example_and_step": per_step,
        "step_estimate_seconds": single.seconds - plain.seconds - per_step * steps * args.astra_test,
    }


def run(args):
    results = {}
    for hidden in args.sizes:
        settings = dict(vars(args), hidden=hidden)
        per_method = {method: in_subprocess(run_method, settings=settings, method=method)
                      for method in args.methods}
        results[str(hidden)] = summarise(per_method)
    return {"settings": vars(args), "by_size": results}


def summarise(per_method):
    """Ratios to the floor, and the agreement of TracInWE with the dense TracInCP."""
    base = per_method.get(FLOOR)
    summary = {"methods": {}}
    for method, r in per_method.items():
        entry = {key: value for key, value in r.items() if key != "scores"}
        if base:
            entry["time_x_floor"] = r["seconds"] / base["seconds"]
            if r["peak_bytes"] and base["peak_bytes"]:
                entry["memory_x_floor"] = r["peak_bytes"] / base["peak_bytes"]
        summary["methods"][method] = entry
    if EXACT in per_method and DENSE in per_method:
        ours, dense = per_method[EXACT], per_method[DENSE]
        summary["speedup_over_dense_TracInCP"] = dense["seconds"] / ours["seconds"]
        summary["max_relative_difference_to_dense_TracInCP"] = (
            (ours["scores"] - dense["scores"]).abs().max() / dense["scores"].abs().max()
        ).item()
    for method in (EKFAC, KFAC):
        if EXACT in per_method and method in per_method:
            r, tracin = summary["methods"][method], per_method[EXACT]["seconds"]
            r["fit_x_tracin"], r["query_x_tracin"] = r["fit_seconds"] / tracin, r["query_seconds"] / tracin
            if base:
                r["fit_x_floor"], r["query_x_floor"] = (r["fit_seconds"] / base["seconds"],
                                                        r["query_seconds"] / base["seconds"])
    if ASTRA in per_method and EXACT in per_method:
        r = summary["methods"][ASTRA]
        r["step_x_tracin"] = r["seconds_per_test_example_and_step"] / per_method[EXACT]["seconds"]
    if EXACT in per_method and INDEXED in per_method:
        summary["index_query_speedup"] = per_method[EXACT]["seconds"] / per_method[INDEXED]["seconds"]
    return summary


def report(results):
    s = results["settings"]
    print(f"{s['train']} training and {s['test']} test sentences of {s['seq_len']} tokens, vocab {s['vocab']}, "
          f"{s['layers']} layers, {s['checkpoints']} checkpoints, batch {s['batch_size']}; "
          "each method in its own process\n")
    for hidden, summary in results["by_size"].items():
        print(f"## {SIZES.get(int(hidden), f'd {hidden}')}\n")
        print("| method | seconds | x floor | peak MB | memory x floor |\n|---|---:|---:|---:|---:|")
        for method, r in summary["methods"].items():
            mb = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**20:.0f}"
            print(f"| {method} | {r['seconds']:.2f} | {r.get('time_x_floor', float('nan')):.2f} | {mb} "
                  f"| {r.get('memory_x_floor', float('nan')):.2f} |")
        if "speedup_over_dense_TracInCP" in summary:
            print(f"\nTracInWE is {summary['speedup_over_dense_TracInCP']:.1f}x faster than TracInCP on the "
                  f"embeddings; max relative difference {summary['max_relative_difference_to_dense_TracInCP']:.1e}")
        for method in (EKFAC, KFAC):
            r = summary["methods"].get(method)
            if r and "fit_x_tracin" in r:
                print(f"{method}: fitting {r['fit_seconds']:.2f} s = {r['fit_x_tracin']:.2f} TracInWE runs "
                      f"({r.get('fit_x_floor', float('nan')):.2f} x floor), a query {r['query_seconds']:.2f} s = "
                      f"{r['query_x_tracin']:.2f} x TracInWE's; factors {r['factor_bytes'] / 2**20:.2f} MB")
        r = summary["methods"].get(ASTRA)
        if r:
            print(f"ASTRA: {r['seconds_per_test_example_and_step']:.2f} s per test example and step "
                  f"({r.get('step_x_tracin', float('nan')):.2f} x a TracInWE run over {s['test']} test examples); "
                  f"estimating the step once costs {r['step_estimate_seconds']:.2f} s")
        if "index_query_speedup" in summary:
            build_s = summary["methods"][INDEXED]["build_seconds"]
            print(f"A query from the index is {summary['index_query_speedup']:.1f}x faster than TracInWE "
                  f"recomputing the training side (the index took {build_s:.2f} s to build, once)")
        print()


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results["by_size"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(METHODS) + 1.5))
    for ax, key, title in zip(axes, ("time_x_floor", "memory_x_floor"), ("time", "peak memory")):
        for i, hidden in enumerate(sizes):
            methods = results["by_size"][hidden]["methods"]
            names = [m for m in METHODS if m in methods and m != FLOOR and key in methods[m]]
            positions = [j + 0.4 * i for j in range(len(names))]
            ax.barh(positions, [methods[m][key] for m in names], height=0.4,
                    label=SIZES.get(int(hidden), f"d {hidden}"))
            ax.set_yticks([j + 0.2 for j in range(len(names))], [_label(results, m) for m in names])
        ax.axvline(1.0, color="black", linewidth=1, linestyle="--")
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel(f"{title}, x the floor (forward + backward; dashed line)")
    axes[0].legend(loc="lower right")
    axes[1].set_yticklabels([])
    fig.suptitle("TracIn methods on the same model and data (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _label(results, method):
    """A method's name, with what ASTRA's row measured (it refines fewer test examples)."""
    s = results["settings"]
    if method != ASTRA:
        return method
    return f"{method}\n({s['astra_test']} test example(s), {s['astra_steps']} steps)"


def main(argv=None):
    return run_benchmark(parse_args(argv), run, report, plot)


if __name__ == "__main__":
    main(sys.argv[1:])
