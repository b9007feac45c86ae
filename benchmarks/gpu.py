"""
One GPU, a BERT-base-sized model (random weights, vocabulary 30522, d 768, 12
layers) and 2,000 Zipf-like training sentences: TracInWE, a query from its index
(and the build), Captum's dense TracInCP on the embeddings, TracInCPFast on the
last layer and the floor (one forward and backward pass per batch and
checkpoint), with absolute times, ratios to the floor, peak device memory, and
whether TracInWE's scores equal the dense TracInCP's and the index's. Sized to
finish in under 5 minutes on one GPU.

    python benchmarks/gpu.py --json benchmarks/results/gpu.json > benchmarks/results/gpu.txt
    python benchmarks/gpu.py --quick   # a tiny setting on the CPU, for the tests
"""

import os
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import apply_quick, benchmark_parser, build, floor, in_memory_checkpoints, LAST_LAYER, run_benchmark  # noqa: E402

from captum_tracin_we import TracInWE  # noqa: E402
from captum_tracin_we.compare import compare_influence_methods  # noqa: E402

FLOOR, EXACT, BUILD, INDEXED = "floor", "TracInWE", "build the index", "TracInWE (from index)"
DENSE, FAST = "TracInCP (embeddings)", "TracInCPFast"
QUICK = dict(vocab=300, hidden=16, layers=1, train=24, test=2, batch_size=8, seq_len=12)


def parse_args(argv):
    parser = benchmark_parser(__doc__.split("\n\n")[0], train=2000, repeats=False)
    parser.set_defaults(hidden=768, layers=12, batch_size=64, checkpoints=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="a tiny setting, for the tests")
    return apply_quick(parser.parse_args(argv), parser, QUICK)


def device_timed(device, fn):
    """Seconds (the device synchronised), peak device bytes (None on the CPU), result."""
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = fn()
    if on_gpu:
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) if on_gpu else None
    return time.perf_counter() - start, peak, result


def run(args):
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as directory:
        model, train, test, checkpoints = build(args, directory)
        model.to(device)
        train = torch.utils.data.TensorDataset(*(t.to(device) for t in train.tensors))
        test_batch = tuple(t.to(device) for t in test.tensors)
        load = in_memory_checkpoints(model, checkpoints)
        batches = [tuple(t[i:i + args.batch_size] for t in train.tensors) for i in range(0, len(train), args.batch_size)]
        floor(model, batches[:1], checkpoints[:1], load)  # warm-up
        loss = nn.CrossEntropyLoss(reduction="sum")
        results = {FLOOR: device_timed(device, lambda: floor(model, batches, checkpoints, load))}
        tracin = TracInWE(model, train, checkpoints, checkpoints_load_func=load, loss_fn=loss,
                          batch_size=args.batch_size)
        results[EXACT] = device_timed(device, lambda: tracin.influence(test_batch))
        results[BUILD] = device_timed(device, lambda: tracin.build_index(os.path.join(directory, "index")))
        results[INDEXED] = device_timed(device, lambda: tracin.influence(test_batch))
        for method in (DENSE, FAST):
            results[method] = device_timed(device, lambda: compare_influence_methods(
                model, train, checkpoints, test_batch, nn.CrossEntropyLoss(), LAST_LAYER, methods=[method],
                batch_size=args.batch_size, checkpoints_load_func=load, cache_checkpoints=False,
            ).results[method].scores)
    exact, dense, indexed = results[EXACT][2], results[DENSE][2], results[INDEXED][2]
    scale = dense.abs().max()
    floor_seconds = results[FLOOR][0]
    return {
        "settings": {**vars(args), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                     else "cpu"},
        "methods": {name: {"seconds": seconds, "x_floor": seconds / floor_seconds, "peak_device_bytes": peak}
                    for name, (seconds, peak, _) in results.items()},
        "max_relative_difference_to_dense": float((exact - dense).abs().max() / scale),
        "index_max_relative_difference": float((indexed - exact).abs().max() / exact.abs().max()),
        "speedup_over_dense": results[DENSE][0] / results[EXACT][0],
    }


def report(results):
    s = results["settings"]
    print(f"{s['device_name']}: {s['train']} training and {s['test']} test sentences of {s['seq_len']} tokens, "
          f"BERT with vocabulary {s['vocab']}, d {s['hidden']}, {s['layers']} layers (random weights), "
          f"{s['checkpoints']} checkpoints, batch {s['batch_size']}\n")
    print("| step | seconds | x floor | peak device MB |\n|---|---:|---:|---:|")
    for name, r in results["methods"].items():
        peak = "n/a" if r["peak_device_bytes"] is None else f"{r['peak_device_bytes'] / 2 ** 20:.0f}"
        print(f"| {name} | {r['seconds']:.2f} | {r['x_floor']:.2f} | {peak} |")
    print(f"\nTracInWE is {results['speedup_over_dense']:.1f}x faster than the dense TracInCP on the embeddings; "
          f"their scores differ by at most {results['max_relative_difference_to_dense']:.1e} (relative), "
          f"the index's from TracInWE's by {results['index_max_relative_difference']:.1e}")


def main(argv=None):
    return run_benchmark(parse_args(argv), run, report)


if __name__ == "__main__":
    main()
