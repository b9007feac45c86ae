"""
What the benchmarks share: the model and data they time (a BERT classifier with
MiniLM's or BERT-base's embedding size, random weights, Zipf-like sentences,
checkpoints on disk), the floor (one forward and one backward pass over the same
batches), and the measurement of time and peak memory, in this process or in a
fresh one per method so that one method's memory never counts against another.

Not a benchmark itself: `speed.py`, `index.py`, `index_build.py`, `methods.py` and `scaling.py`
import it, and `case_deletion.py` and `cancellation.py` use its `run_benchmark`.
"""

import argparse
import ctypes
import gc
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from captum_tracin_we import HuggingFaceClassifier, load_checkpoint, save_checkpoint

EMBEDDING = "model.bert.embeddings.word_embeddings"
LAST_LAYER = "model.classifier"


def apply_quick(args, parser, quick):
    """With `args.quick`, the tiny settings of `quick` replace those the command line left at `parser`'s
    defaults (an option given explicitly is kept); returns `args`."""
    if args.quick:
        for name, value in quick.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    return args


def benchmark_parser(description, train, repeats=True):
    """Options of the model and data that `build` makes, shared by the benchmarks
    (and `--repeats` for those that time a method several times)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--train", type=int, default=train)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--checkpoints", type=int, default=2)
    if repeats:
        parser.add_argument("--repeats", type=int, default=2, help="time each method this many times, keep the best")
    parser.add_argument("--json", help="write the results to this file")
    return parser


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


def floor(model, batches, checkpoints, load=load_checkpoint):
    """One forward and one full backward pass per batch and checkpoint."""
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for checkpoint in checkpoints:
        load(model, checkpoint)
        for ids, mask, labels in batches:
            loss_fn(model(ids, mask), labels).backward()
            model.zero_grad(set_to_none=True)


def run_benchmark(args, run, report, plot=None):
    """Runs a benchmark, prints its report, writes its results to `--json` and its
    figure to `--plot` if given."""
    results = run(args)
    report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if plot is not None and args.plot:
        plot(results, args.plot)
    return results



def in_memory_checkpoints(model, checkpoints):
    """Reads every checkpoint once and returns a `checkpoints_load_func` that
    restores them from memory: Captum's methods load every checkpoint again for
    every training batch, and with this every method pays the same (nothing) for
    loading, and holds the same copies in memory before it is measured."""
    states = {}
    for checkpoint in checkpoints:
        learning_rate = load_checkpoint(model, checkpoint)
        states[checkpoint] = ({k: v.clone() for k, v in model.state_dict().items()}, learning_rate)

    def load(model, checkpoint):
        state, learning_rate = states[checkpoint]
        model.load_state_dict(state)
        return learning_rate

    return load


def index_size(index, train, hidden):
    """Bytes per training example and checkpoint: all files, gradient rows' data
    (with the scales of float16 rows; the probe gradients that loading recomputes
    aside), and the bound unique tokens x d x 4 (float32 rows)."""
    per_example = index.num_checkpoints * index.num_examples
    files = index.manifest["files"]
    unique_tokens = sum(len(set(row.tolist())) for row in train.tensors[0])
    return {
        "index_bytes_per_example": sum(f["bytes"] for f in files.values()) / per_example,
        "index_row_bytes_per_example": sum(  # the rows' data, without the .npy headers
            math.prod(f["shape"]) * np.dtype(f["dtype"]).itemsize
            for name, f in files.items()
            if name.endswith(("-grads.npy", "-row_scales.npy")) and "-probe-" not in name
        ) / per_example,
        "index_bound_bytes_per_example": unique_tokens * hidden * 4 / index.num_examples,
    }


@dataclass
class Measured:
    """Wall-clock seconds, peak resident memory above the start (bytes; None where
    the platform cannot tell), and the result of one call."""

    seconds: float
    peak_bytes: Optional[int]
    result: Any = None


def measure(fn):
    """Runs `fn()` once, timing it and tracking the peak of the resident set
    (Linux: the high-water mark is reset first, then read back)."""
    before = _reset_peak_memory()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    return Measured(seconds, None if before is None or peak is None else (peak - before) * 1024, result)


def _reset_peak_memory():
    """Returns freed heap to the system (so a call cannot reuse memory an earlier
    step freed without it counting), resets the process's peak resident set to
    its current size, and returns that size in kB; None where this cannot be done."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except (OSError, AttributeError):
        return None
    current, peak = _status_kb("VmRSS"), _status_kb("VmHWM")
    if current is None or peak is None or peak > current + 1024:
        return None  # the reset was ignored
    return current


def _status_kb(field):
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def in_subprocess(function, passive_threads=True, huge_pages=False, **kwargs):
    """Calls `function(**kwargs)` (a module-level function of a benchmark script,
    with JSON-able arguments) in a fresh Python process and returns its result,
    so that its time and memory are measured apart from every other method's.
    `passive_threads` sets OMP_WAIT_POLICY=PASSIVE (no busy-waiting threads):
    then every parallel operation wakes the threads anew, which costs code of
    many small operations (the token join: twice its time) far more than the
    default policy, under which threads wait briefly for the next one.
    `huge_pages` sets THP_MEM_ALLOC_ENABLE=1: torch then asks for transparent
    huge pages for its large CPU tensors (fewer TLB misses and page faults)."""
    with tempfile.TemporaryDirectory() as directory:
        out = os.path.join(directory, "result.pt")
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE") if passive_threads else dict(os.environ)
        if huge_pages:
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), os.path.abspath(function.__code__.co_filename),
             function.__name__, json.dumps(kwargs), out],
            check=True, env=env,
        )
        return torch.load(out, weights_only=False)


def _worker(script, name, kwargs, out):
    spec = importlib.util.spec_from_file_location("benchmark_worker", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(getattr(module, name)(**json.loads(kwargs)), out)


if __name__ == "__main__":
    _worker(*sys.argv[1:])
