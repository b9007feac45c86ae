"""
Which attribution to trust: every registered method on the same trained model and data, judged by
the linear datamodeling score (LDS, retraining on seeded random halves of the training set), further
training of the final model without each of a sample of training examples, Quanda's heuristics
(identical class, top-k cardinality, model randomisation), mislabel detection by self influence (ROC
AUC; the final model's loss as a baseline) and time.

Methods: TracInWE (raw, cosine, TopK), InfluenceWE (EK-FAC, K-FAC), Captum's TracInCP on the last layer
and TracInCPFast (all through `compare_influence_methods`' registry: one `register_method` line adds
one), the cosine similarity of mean-pooled word embeddings, and random. Data, models and training are
case_deletion.py's (its options apply: --dataset, --model, --train, --test-examples, --epochs, ...).

    python benchmarks/evaluate.py --dataset mr --test-examples 50 --subsets 64 --json benchmarks/results/evaluate_mr_cnn.json --plot benchmarks/results/evaluate_mr_cnn.png > benchmarks/results/evaluate_mr_cnn.txt
    python benchmarks/evaluate.py --quick          # a minute: tiny data, 4 subsets
"""

import argparse
import functools
import os
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import case_deletion  # noqa: E402
from common import run_benchmark  # noqa: E402

from captum_tracin_we import InfluenceWE, load_checkpoint, save_checkpoint  # noqa: E402
from captum_tracin_we._utils.captum_compat import integer_input_warnings_ignored  # noqa: E402
from captum_tracin_we.compare import (  # noqa: E402
    METHOD_BUILDERS, MethodRun, register_method, token_method,
)
from captum_tracin_we.data import predict_proba  # noqa: E402
from captum_tracin_we.evaluation import (  # noqa: E402
    datamodeling_scores, flip_labels, further_train, further_training_correlation,
    further_training_gold, identical_class, label_margin, randomization_correlation, randomized_model, roc_auc,
    top_k_cardinality,
)

register_method("InfluenceWE (K-FAC)", lambda run: token_method(run, InfluenceWE, approximation="kfac"))
METHODS = ("TracInWE", "TracInWE (cosine)", "TracInWE-TopK", "InfluenceWE (EK-FAC)", "InfluenceWE (K-FAC)",
           "TracInCP (last layer)", "TracInCPFast")
SIMILARITY, RANDOM = case_deletion.SIMILARITY, "random"
QUICK = dict(subsets=4, further_steps=[2], further_sample=4)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--subsets", type=int, default=64, help="LDS: retrainings on random subsets (M)")
    parser.add_argument("--fraction", type=float, default=0.5, help="LDS: the share of the training set kept")
    parser.add_argument("--further-steps", type=int, nargs="+", default=[10, 50], help="further-training steps t")
    parser.add_argument("--further-sample", type=int, default=20, help="training examples removed, one at a time")
    parser.add_argument("--further-learning-rate", type=float, default=None, help="default: the training rate")
    parser.add_argument("--cache", help="a folder that keeps the LDS retrainings for later runs")
    mine, rest = parser.parse_known_args(argv)
    args = case_deletion.parse_args(rest)
    for key, value in vars(mine).items():
        setattr(args, key, value)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    args.further_learning_rate = args.further_learning_rate or args.learning_rate
    return args


def scores_of(setup, model, checkpoints):
    """Every method's (n_test, n_train) scores and seconds, for `model` at `checkpoints`: case deletion's
    (with this benchmark's methods), and random."""
    scores, seconds = case_deletion.influence_scores(setup, model, checkpoints, METHODS)
    generator = torch.Generator().manual_seed(0)
    scores[RANDOM], seconds[RANDOM] = torch.rand(len(setup.test), len(setup.train), generator=generator), 0.0
    return scores, seconds


def mislabel_aucs(args):
    """Flip `--flip-fraction` of the labels, train, and rank the training set by each method's self
    influence (and by the final model's loss, and at random): the ROC AUC of finding the flipped ones."""
    setup = case_deletion.Setup(args, args.mislabel_train)
    noisy, flipped = flip_labels(setup.data.train_labels, args.flip_fraction, setup.num_labels, seed=0)
    train = setup.encode(setup.data.train_texts, noisy)
    with tempfile.TemporaryDirectory() as directory:
        model, checkpoints = setup.trained(0, train, checkpoint_dir=directory)
        run = MethodRun(model, train, checkpoints, load_checkpoint, nn.CrossEntropyLoss(), setup.final_fc_layer,
                        None, args.top_k_tokens, args.batch_size, None)
        rankings = {}
        with integer_input_warnings_ignored():
            for name in METHODS:
                rankings[name] = METHOD_BUILDERS[name](run).self_influence(outer_loop_by_checkpoints=True)
        load_checkpoint(model, checkpoints[-1])
        rankings["loss (final model)"] = -case_deletion.label_probabilities(model, train).log()
    rankings[RANDOM] = torch.rand(len(train), generator=torch.Generator().manual_seed(0))
    return {name: roc_auc(values, flipped) for name, values in rankings.items()}


def run(args):
    start = time.perf_counter()
    torch.manual_seed(0)
    setup = case_deletion.Setup(args, args.train)
    labels = setup.test.tensors[-1]
    with tempfile.TemporaryDirectory() as directory:
        model, checkpoints = setup.trained(0, setup.train, checkpoint_dir=directory)
        scores, seconds = scores_of(setup, model, checkpoints)
        # model randomisation: the same methods on the final model with re-initialised weights
        randomized = randomized_model(model, seed=1)
        path = os.path.join(directory, "randomized.pt")
        save_checkpoint(randomized, path)
        randomized_scores, _ = scores_of(setup, randomized, [path])
        load_checkpoint(model, checkpoints[-1])  # further training starts from the final model

    def retrain_and_output(kept, seed):
        retrained = setup.trained(seed, setup.train, kept=kept)[0]
        return label_margin(predict_proba(retrained, setup.test).log(), labels)

    lds = datamodeling_scores(retrain_and_output, scores, args.subsets, args.fraction, cache_dir=args.cache)
    sample = torch.randperm(len(setup.train), generator=torch.Generator().manual_seed(0))[:args.further_sample]
    train_further = functools.partial(
        further_train, model, setup.train, setup.test.tensors, nn.CrossEntropyLoss(),
        learning_rate=args.further_learning_rate, batch_size=args.batch_size,
    )
    gold = further_training_gold(train_further, len(setup.train), sample.tolist(), args.further_steps)
    further = further_training_correlation(scores, gold, sample.tolist(), args.further_steps)
    train_labels, k = setup.train.tensors[-1], min(5, len(setup.train))
    methods = {
        name: {
            "lds": vars(lds[name]) | {"per_test": lds[name].per_test.tolist()},
            "further_training": {str(t): value for t, value in further[name].items()},
            "identical_class": identical_class(matrix, train_labels, labels),
            f"top_{k}_cardinality": top_k_cardinality(matrix, k),
            "randomization_correlation": randomization_correlation(matrix, randomized_scores[name]),
            "seconds": seconds[name],
        }
        for name, matrix in scores.items()
    }
    aucs = mislabel_aucs(args)
    for name, auc in aucs.items():
        methods.setdefault(name, {})["mislabel_auc"] = auc
    return {"settings": vars(args), "top_k": k, "methods": methods, "total_seconds": time.perf_counter() - start}


def report(results):
    s, k = results["settings"], results["top_k"]
    print(f"{s['dataset'].upper()}, {s['model'].upper()}: {s['train']} training and {s['test_examples']} test "
          f"examples; LDS over {s['subsets']} subsets of {s['fraction']:.0%}; further training of the final model "
          f"without each of {s['further_sample']} training examples; {results['total_seconds'] / 60:.1f} minutes\n")
    steps = s["further_steps"]
    print("| method | LDS [95% interval] | " + " | ".join(f"further training, t={t}" for t in steps)
          + f" | identical class | top-{k} cardinality | randomisation corr. | mislabel AUC | seconds |")
    print("|---|---:|" + "---:|" * len(steps) + "---:|---:|---:|---:|---:|")
    for name, r in results["methods"].items():
        if "lds" not in r:  # a ranking for mislabel detection only (the loss)
            print(f"| {name} | |" + " |" * len(steps) + f" | | | {_auc(r)} | |")
            continue
        lds = r["lds"]
        further = " | ".join(f"{r['further_training'][str(t)]['mean']:+.3f}" for t in steps)
        print(f"| {name} | {lds['mean']:+.3f} [{lds['ci_low']:+.3f}, {lds['ci_high']:+.3f}] | {further} | "
              f"{r['identical_class']:.2f} | {r[f'top_{k}_cardinality']:.2f} | "
              f"{r['randomization_correlation']:+.2f} | {_auc(r)} | {r['seconds']:.1f} |")


def _auc(r):
    return f"{r['mislabel_auc']:.3f}" if "mislabel_auc" in r else "n/a"


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, r in results["methods"].items() if "lds" in r]
    lds = [results["methods"][n]["lds"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 1.2))
    means = [r["mean"] for r in lds]
    errors = [[r["mean"] - r["ci_low"] for r in lds], [r["ci_high"] - r["mean"] for r in lds]]
    ax.barh(range(len(names)), means, xerr=errors, capsize=3, color="#4c72b0")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    s = results["settings"]
    ax.set_xlabel(f"linear datamodeling score (Spearman), {s['subsets']} subsets; 95% intervals over test examples")
    fig.suptitle(f"{s['dataset'].upper()} with a {s['model'].upper()}: which attribution predicts retraining")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    case_deletion.quiet_model_loading()
    return run_benchmark(parse_args(argv), run, report, plot)


if __name__ == "__main__":
    main(sys.argv[1:])
