r"""
The main job: TracIn-WE on a real model and real data, offline.

Fine-tunes the packaged MiniLM on a subset of the MR movie-review sentences (or
BBC News), saving a few checkpoints with their learning rates; explains a few
test sentences by their top proponents and opponents with the shared words
highlighted (terminal, HTML report, PNG figures); and runs TracInWE side by side
with Captum's last-layer TracInCP and TracInCPFast on the same model and data.

Run it with ``python -m captum_tracin_we demo [options]``; ``--help`` lists them.
"""

import argparse
import html
import os
import sys
import time
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn

from captum_tracin_we._core.tracin_we import TracInWE
from captum_tracin_we.compare import (
    Comparison,
    compare_influence_methods,
    DEFAULT_METHODS,
    TRACIN_WE,
)
from captum_tracin_we.data import (
    DataUnavailableError,
    encode,
    fine_tune,
    load_bbc_news,
    load_minilm_classifier,
    load_movie_reviews,
    predict_proba,
)
from captum_tracin_we.visualization import explain, InfluenceExplanation, save_html

DATASETS = {"mr": load_movie_reviews, "bbc": load_bbc_news}
FINAL_LAYER = "model.classifier"  # the head of a HuggingFaceClassifier around BERT


@dataclass
class DemoConfig:
    r"""
    The demo's settings; the defaults finish in a few minutes on 2 CPU cores.

    Attributes:
        dataset (str): "mr" (movie-review polarity) or "bbc" (BBC News topics).
        train_size (int): training examples fine-tuned on and attributed to.
        test_size (int): test sentences explained.
        eval_size (int): held-out examples the accuracy is measured on.
        epochs (int): fine-tuning epochs.
        layers (int): MiniLM transformer layers kept (1-6).
        max_length (int): tokens per example (longer texts are truncated).
        learning_rate (float): AdamW learning rate, stored with each checkpoint.
        batch_size (int): fine-tuning and influence batch size.
        checkpoints (int): checkpoints saved and summed over by TracIn.
        k (int): proponents and opponents shown per test sentence.
        top_k_tokens (int): token budget of TracInWE-TopK in the comparison.
        compare (bool): also run Captum's last-layer methods side by side.
        output (str): folder the report, figures and checkpoints are written to.
        seed (int): seed of the split, the head's initialisation and the shuffling.
    """

    dataset: str = "mr"
    train_size: int = 600
    test_size: int = 3
    eval_size: int = 200
    epochs: int = 2
    layers: int = 6
    max_length: int = 48
    learning_rate: float = 1e-4
    batch_size: int = 16
    checkpoints: int = 3
    k: int = 3
    top_k_tokens: int = 10
    compare: bool = True
    output: str = "tracin_we_demo"
    seed: int = 0


@dataclass
class DemoResult:
    r"""What the demo computed and wrote."""

    accuracy: float
    explanations: List[InfluenceExplanation]
    comparison: Optional[Comparison]
    files: List[str]


def run(config: Optional[DemoConfig] = None, color: Optional[bool] = None) -> DemoResult:
    r"""
    Runs the demo with `config`, printing its progress and explanations, and
    writing `report.html`, `explanation-<i>.png`, `comparison-<i>.png` and
    `comparison.md` to `config.output`.

    Args:
        config (DemoConfig, optional): the settings; None uses the defaults.
                Default: None
        color (bool, optional): ANSI colours in the terminal; None uses them
                when standard output is a terminal. Default: None
    """
    config = DemoConfig() if config is None else config
    _check(config)
    os.makedirs(config.output, exist_ok=True)
    color = sys.stdout.isatty() if color is None else color
    start = time.perf_counter()

    print(f"Loading the {config.dataset.upper()} data and MiniLM ({config.layers} layers)...")
    data = DATASETS[config.dataset](
        n_train=config.train_size, n_test=config.eval_size, seed=config.seed
    )
    model, tokenizer = load_minilm_classifier(
        len(data.label_names), num_hidden_layers=config.layers, seed=config.seed
    )
    train = encode(tokenizer, data.train_texts, data.train_labels, config.max_length)
    held_out = encode(tokenizer, data.test_texts, data.test_labels, config.max_length)

    checkpoints = fine_tune(
        model, train, os.path.join(config.output, "checkpoints"), epochs=config.epochs,
        learning_rate=config.learning_rate, batch_size=config.batch_size,
        num_checkpoints=config.checkpoints, seed=config.seed,
    )
    probabilities = predict_proba(model, held_out)
    accuracy = (probabilities.argmax(1) == held_out.tensors[-1]).float().mean().item()
    print(f"Accuracy on {len(held_out)} held-out examples: {accuracy:.3f}")

    chosen = _pick_test_examples(data.test_labels, config.test_size)
    inputs = tuple(tensor[chosen] for tensor in held_out.tensors)
    predictions = [_prediction(probabilities[i], data.label_names) for i in chosen]

    tracin = TracInWE(
        model, train, checkpoints, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=config.batch_size,
    )
    comparison, scores = None, None
    if config.compare:
        print(f"Influence of {len(train)} training examples over {len(checkpoints)} checkpoints "
              f"on {len(chosen)} test sentences: TracInWE, TracInWE-Top{config.top_k_tokens}, "
              "and Captum's TracInCP and TracInCPFast on the last layer...")
        comparison = compare_influence_methods(
            model, train, checkpoints, inputs, nn.CrossEntropyLoss(), FINAL_LAYER,
            methods=DEFAULT_METHODS, k=config.k, top_k_tokens=config.top_k_tokens,
            batch_size=config.batch_size, show_progress=True,
        )
        scores = comparison.results[TRACIN_WE].scores
    else:
        print(f"TracInWE: influence of {len(train)} training examples over "
              f"{len(checkpoints)} checkpoints on {len(chosen)} test sentences...")
    explanations = explain(
        tracin, inputs, tokenizer, k=config.k, label_names=data.label_names,
        predictions=predictions, show_progress=True, scores=scores,
    )
    for explanation in explanations:
        print("\n" + explanation.to_text(color=color))

    files = []
    for i, explanation in enumerate(explanations):
        files.append(os.path.join(config.output, f"explanation-{i}.png"))
        explanation.save_figure(files[-1])

    sections = []
    if comparison is not None:
        files += _write_comparison(comparison, data.train_texts, inputs, tokenizer, config)
        sections = _comparison_sections(comparison, files)
        print("\n" + _timings(comparison))

    report = os.path.join(config.output, "report.html")
    save_html(
        explanations, report,
        title=f"TracIn-WE: MiniLM fine-tuned on {config.dataset.upper()} "
        f"({len(train)} examples, accuracy {accuracy:.3f})",
        sections=sections,
    )
    files.insert(0, report)
    print(f"\nDone in {time.perf_counter() - start:.0f} s. Wrote to "
          f"{os.path.abspath(config.output)}:")
    for path in files:
        print(f"  {os.path.relpath(path, config.output)}")
    return DemoResult(accuracy, explanations, comparison, files)


def _check(config: DemoConfig) -> None:
    if config.dataset not in DATASETS:
        raise ValueError(f"`dataset` must be one of {sorted(DATASETS)}, got {config.dataset!r}.")
    if not 1 <= config.layers <= 6:
        raise ValueError(f"`layers` must be between 1 and 6 (MiniLM has 6), got {config.layers}.")
    for name in ("train_size", "test_size", "eval_size", "epochs", "checkpoints", "k"):
        if getattr(config, name) < 1:
            raise ValueError(f"`{name}` must be at least 1, got {getattr(config, name)}.")
    if config.test_size > config.eval_size:
        raise ValueError("`test_size` must be at most `eval_size`: the test sentences "
                         "are taken from the held-out examples.")


def _pick_test_examples(labels: Sequence[int], n: int) -> List[int]:
    r"""The first `n` held-out examples taken in turn from each label."""
    by_label = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    queues = [by_label[label] for label in sorted(by_label)]
    chosen = []
    while len(chosen) < n:
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen


def _prediction(probabilities: torch.Tensor, label_names: Sequence[str]) -> str:
    label = int(probabilities.argmax())
    return f"{label_names[label]} ({probabilities[label]:.2f})"


def _decode(tokenizer, ids: torch.Tensor) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def _write_comparison(comparison, train_texts, inputs, tokenizer, config) -> List[str]:
    files = []
    tables = []
    for i in range(inputs[0].shape[0]):
        text = _decode(tokenizer, inputs[0][i])
        files.append(os.path.join(config.output, f"comparison-{i}.png"))
        comparison.figure(train_texts, i, text, path=files[-1])
        tables.append(f"## Test example {i}: {text}\n\n{comparison.table(train_texts, i)}")
    files.append(os.path.join(config.output, "comparison.md"))
    with open(files[-1], "w", encoding="utf-8") as handle:
        handle.write("\n".join(tables))
    return files


def _comparison_sections(comparison: Comparison, files: List[str]) -> List[str]:
    r"""HTML sections of the report: the comparison figures and the timings."""
    sections = ["<h2>TracInWE next to Captum's last-layer methods</h2>",
                f"<pre>{html.escape(_timings(comparison))}</pre>"]
    for path in files:
        if os.path.basename(path).startswith("comparison-"):
            name = html.escape(os.path.basename(path))
            sections.append(f'<p><img src="{name}" style="max-width:100%"></p>')
    return sections


def _timings(comparison: Comparison) -> str:
    overlap = comparison.overlap(proponents=True)
    lines = [f"{'method':24s} {'seconds':>8s}  top-k proponents shared with TracInWE"]
    for name, result in comparison.results.items():
        shared = overlap.get(("TracInWE", name))
        shared_text = "" if shared is None else f"{shared:.0%}"
        lines.append(f"{name:24s} {result.seconds:8.1f}  {shared_text}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> DemoConfig:
    r"""The `DemoConfig` given by command-line options."""
    defaults = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="python -m captum_tracin_we demo",
        description="Fine-tune MiniLM on movie reviews (or BBC News) and explain test "
        "predictions by their most influential training sentences and words (TracIn-WE), "
        "next to Captum's TracInCP and TracInCPFast.",
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default=defaults.dataset)
    parser.add_argument("--train-size", type=int, default=defaults.train_size)
    parser.add_argument("--test-size", type=int, default=defaults.test_size,
                        help="test sentences explained")
    parser.add_argument("--eval-size", type=int, default=defaults.eval_size,
                        help="held-out examples for the accuracy")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--layers", type=int, default=defaults.layers,
                        help="MiniLM layers kept (1-6)")
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--checkpoints", type=int, default=defaults.checkpoints)
    parser.add_argument("-k", type=int, default=defaults.k,
                        help="proponents and opponents per test sentence")
    parser.add_argument("--top-k-tokens", type=int, default=defaults.top_k_tokens,
                        help="token budget of TracInWE-TopK in the comparison")
    parser.add_argument("--no-compare", dest="compare", action="store_false",
                        help="skip the comparison with Captum's last-layer methods")
    parser.add_argument("--output", default=defaults.output, help="output folder")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    config = DemoConfig(**vars(parser.parse_args(argv)))
    try:
        _check(config)
    except ValueError as error:
        parser.error(str(error))
    return config


def main(argv: Optional[Sequence[str]] = None) -> None:
    config = parse_args(argv)
    try:
        run(config)
    except DataUnavailableError as error:
        sys.exit(f"error: {error}")
