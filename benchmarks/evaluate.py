"""
Which attribution to trust: every registered method on the same trained model and data, judged by
the linear datamodeling score (LDS, retraining on seeded random halves of the training set), further
training of the final model without each of a sample of training examples, Quanda's heuristics
(identical class, top-k cardinality, model randomisation), mislabel detection by self influence (ROC
AUC; the final model's loss as a baseline) and time.

Methods: case_deletion.py's `default_methods()` (TracInWE raw, cosine and TopK, InfluenceWE EK-FAC and K-FAC,
Captum's TracInCP on the last layer and TracInCPFast, all through `compare_influence_methods`'
registry: one `register_method` line adds one), the cosine similarity of mean-pooled word embeddings,
label agreement (+1 for the test example's label, -1 otherwise: what the subsets' class balance alone
predicts), random, and InfluenceWE with ASTRA on the first `--astra-test` test examples (its LDS beside every
other method's on the same examples). Proxy models (MiniLM only), judged by the target's LDS and
further training: `--proxy-layers L` scores with a MiniLM of L layers trained on the same data,
`--proxy-pretrained` with the pretrained MiniLM never trained on it (a new head). Data, models and
training are case_deletion.py's (its options apply: --dataset, --model, --train, --test-examples, ...).

    python benchmarks/evaluate.py --dataset mr --test-examples 50 --subsets 64 --json benchmarks/results/evaluate_mr_cnn.json --plot benchmarks/results/evaluate_mr_cnn.png > benchmarks/results/evaluate_mr_cnn.txt
    python benchmarks/evaluate.py --dataset mr --model minilm --train 1000 --test-examples 30 --subsets 32 --astra-test 0 --proxy-layers 1 --proxy-pretrained --json benchmarks/results/evaluate_mr_minilm.json --plot benchmarks/results/evaluate_mr_minilm.png > benchmarks/results/evaluate_mr_minilm.txt
    python benchmarks/evaluate.py --quick          # a minute: tiny data, 4 subsets
"""

import argparse
import copy
import functools
import json
import os
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import case_deletion  # noqa: E402
from common import apply_quick, run_benchmark  # noqa: E402

from captum_tracin_we import InfluenceWE, load_checkpoint, save_checkpoint  # noqa: E402
from captum_tracin_we._utils.captum_compat import integer_input_warnings_ignored  # noqa: E402
from captum_tracin_we.compare import token_method  # noqa: E402
from captum_tracin_we.data import predict_proba  # noqa: E402
from captum_tracin_we.evaluation import (  # noqa: E402
    datamodel_outputs, draw_subsets, further_train, further_training_correlation, further_training_gold,
    identical_class, label_agreement, label_margin, linear_datamodeling_score, randomization_correlation, randomized_model,
    top_k_cardinality,
)

SIMILARITY, RANDOM, SAME_LABEL = case_deletion.SIMILARITY, "random", "label agreement"
PROXY_METHODS = ("TracInWE", "TracInWE (cosine)", "InfluenceWE (EK-FAC)", "TracInCP (last layer)")
QUICK = dict(subsets=4, further_steps=[2], further_sample=4, astra_test=2, astra_steps=2)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--subsets", type=int, default=64, help="LDS: retrainings on random subsets (M)")
    parser.add_argument("--fraction", type=float, default=0.5, help="LDS: the share of the training set kept")
    parser.add_argument("--further-steps", type=int, nargs="+", default=[10, 50], help="further-training steps t")
    parser.add_argument("--further-sample", type=int, default=20, help="training examples removed, one at a time")
    parser.add_argument("--further-learning-rate", type=float, default=None, help="default: the training rate")
    parser.add_argument("--astra-test", type=int, default=8, help="test examples InfluenceWE with ASTRA scores")
    parser.add_argument("--astra-steps", type=int, default=10, help="ASTRA's refinement steps")
    parser.add_argument("--astra-batches", type=int, default=None,
                        help="training batches drawn for ASTRA's Gauss-Newton matrix; default: all")
    parser.add_argument("--add-astra-to", help="the JSON of an earlier run with these settings: add only the ASTRA "
                        "rows, after checking that every stored LDS is reproduced (with --cache, whose first "
                        "retraining is also run anew and compared)")
    parser.add_argument("--proxy-layers", type=int, default=None, help="MiniLM: scores from a model of this depth")
    parser.add_argument("--proxy-pretrained", action="store_true", help="MiniLM: scores from the pretrained model")
    parser.add_argument("--proxy-methods", nargs="+", default=list(PROXY_METHODS), help="methods of the proxies")
    parser.add_argument("--cache", help="a folder that keeps the LDS retrainings for later runs (in a folder per "
                        "setting: runs of other settings can share it)")
    mine, rest = parser.parse_known_args(argv)
    args = case_deletion.parse_args(rest)
    for key, value in vars(mine).items():
        setattr(args, key, value)
    apply_quick(args, parser, QUICK)  # tiny settings where the command line left the defaults
    args.further_learning_rate = args.further_learning_rate or args.learning_rate
    args.astra_test = min(args.astra_test, args.test_examples)
    if args.model != "minilm" and (args.proxy_layers or args.proxy_pretrained):
        raise SystemExit("--proxy-layers and --proxy-pretrained need --model minilm (the CNN has no depth to vary "
                         "and no pretrained weights).")
    return args


def scores_of(setup, model, checkpoints, methods=None):
    """Every method's (n_test, n_train) scores and seconds, for `model` at `checkpoints`: case deletion's
    (`methods`, default all), label agreement (the control for the subsets' class balance) and random."""
    scores, seconds = case_deletion.influence_scores(setup, model, checkpoints, methods)
    scores[SAME_LABEL], seconds[SAME_LABEL] = label_agreement(setup.train.tensors[-1], setup.test.tensors[-1]), 0.0
    generator = torch.Generator().manual_seed(0)
    scores[RANDOM], seconds[RANDOM] = torch.rand(len(setup.test), len(setup.train), generator=generator), 0.0
    return scores, seconds


def astra_scores(setup, model, checkpoints):
    """InfluenceWE with ASTRA's refinement on the first `--astra-test` test examples, and its seconds."""
    args, start = setup.args, time.perf_counter()
    run = case_deletion.method_run(setup, model, setup.train, checkpoints)
    method = token_method(run, InfluenceWE, refinement_steps=args.astra_steps, refinement_batches=args.astra_batches)
    with integer_input_warnings_ignored():
        scores = method.influence(tuple(t[:args.astra_test] for t in setup.test.tensors), show_progress=True)
    return scores, time.perf_counter() - start


def proxy_scores(setup, directory):
    """Scores of `--proxy-methods` from the proxy models, named "method [proxy: ...]", and seconds."""
    args, scores, seconds = setup.args, {}, {}

    def add(proxy, model, checkpoints, label):
        found, took = case_deletion.influence_scores(proxy, model, checkpoints, args.proxy_methods)
        for name in args.proxy_methods:
            scores[f"{name} [proxy: {label}]"], seconds[f"{name} [proxy: {label}]"] = found[name], took[name]

    if args.proxy_layers:
        proxy = copy.copy(setup)
        proxy.args = argparse.Namespace(**{**vars(args), "layers": args.proxy_layers})
        os.makedirs(os.path.join(directory, "proxy"))
        model, checkpoints = proxy.trained(0, setup.train, checkpoint_dir=os.path.join(directory, "proxy"))
        add(proxy, model, checkpoints, f"{args.proxy_layers} layer" + "s" * (args.proxy_layers > 1))
    if args.proxy_pretrained:
        model, path = setup.model(0), os.path.join(directory, "pretrained.pt")
        save_checkpoint(model, path, learning_rate=args.learning_rate)
        add(setup, model, [path], "pretrained")
    return scores, seconds


def target_setup(args):
    """The data and model of `args`, seeded as every run of this benchmark."""
    torch.manual_seed(0)
    return case_deletion.Setup(args, args.train)


def trained_and_scored(setup, directory):
    """The target model trained from seed 0 (checkpoints in `directory`), and every method's scores and seconds."""
    model, checkpoints = setup.trained(0, setup.train, checkpoint_dir=directory)
    return (model, checkpoints, *scores_of(setup, model, checkpoints))


def lds_retrainings(setup, cache=True):
    """The LDS's seeded subsets and the label margins of the models retrained on them (kept in `--cache`,
    in a folder of these settings, and read from it if `cache`)."""
    args, labels = setup.args, setup.test.tensors[-1]

    def retrain_and_output(kept, seed):
        retrained = setup.trained(seed, setup.train, kept=kept)[0]
        return label_margin(predict_proba(retrained, setup.test).log(), labels)

    subsets = draw_subsets(len(setup.train), args.subsets, args.fraction)
    settings = case_deletion.retraining_settings(args, "label margin of the test examples")
    return subsets, datamodel_outputs(retrain_and_output, subsets, cache_dir=args.cache if cache else None,
                                      cache_settings=settings), retrain_and_output


def run(args):
    start = time.perf_counter()
    setup = target_setup(args)
    labels = setup.test.tensors[-1]
    with tempfile.TemporaryDirectory() as directory:
        model, checkpoints, scores, seconds = trained_and_scored(setup, directory)
        astra, astra_seconds = astra_scores(setup, model, checkpoints) if args.astra_test else (None, None)
        proxies, proxy_seconds = proxy_scores(setup, directory)
        # model randomisation: the same methods on the final model with re-initialised weights
        randomized = randomized_model(model, seed=1)
        path = os.path.join(directory, "randomized.pt")
        save_checkpoint(randomized, path)
        randomized_scores, _ = scores_of(setup, randomized, [path])
        load_checkpoint(model, checkpoints[-1])  # further training starts from the final model

    subsets, outputs, _ = lds_retrainings(setup)
    judged, judged_seconds = scores | proxies, seconds | proxy_seconds  # proxies: by the target's LDS too
    lds = {name: linear_datamodeling_score(matrix, subsets, outputs) for name, matrix in judged.items()}
    sample = torch.randperm(len(setup.train), generator=torch.Generator().manual_seed(0))[:args.further_sample]
    sample = sample.tolist()
    train_further = functools.partial(
        further_train, model, setup.train, setup.test.tensors, nn.CrossEntropyLoss(),
        learning_rate=args.further_learning_rate, batch_size=args.batch_size, first=sample,
    )
    gold = further_training_gold(train_further, len(setup.train), sample, args.further_steps)
    further = further_training_correlation(judged, gold, sample, args.further_steps)
    train_labels, k = setup.train.tensors[-1], min(5, len(setup.train))
    methods = {
        name: {
            "lds": vars(lds[name]) | {"per_test": lds[name].per_test.tolist()},
            "further_training": {str(t): value for t, value in further[name].items()},
            "identical_class": identical_class(matrix, train_labels, labels),
            f"top_{k}_cardinality": top_k_cardinality(matrix, k),
            "seconds": judged_seconds[name],
        }
        for name, matrix in judged.items()
    }
    for name in scores:
        methods[name]["randomization_correlation"] = randomization_correlation(scores[name], randomized_scores[name])
    if astra is not None:
        add_astra_rows(methods, args, astra, astra_seconds, scores, subsets, outputs, train_labels, labels, k)
    for name, r in case_deletion.mislabel_detection(args, args.methods)["methods"].items():
        methods.setdefault(name, {})["mislabel_auc"] = r["auc"]
    return {"settings": vars(args), "top_k": k, "methods": methods, "total_seconds": time.perf_counter() - start}


def astra_name(args):
    batches = getattr(args, "astra_batches", None)
    batches = "" if batches is None else f", Gauss-Newton of {batches} batch{'es' * (batches != 1)}"
    return f"InfluenceWE (ASTRA, {args.astra_steps} steps{batches})"


def add_astra_rows(methods, args, astra, seconds, scores, subsets, outputs, train_labels, labels, k):
    """ASTRA's row, and every method's LDS on the test examples that ASTRA scored, into `methods`."""
    n, name = args.astra_test, astra_name(args)
    methods[name] = {"seconds": seconds, "identical_class": identical_class(astra, train_labels, labels[:n]),
                     f"top_{k}_cardinality": top_k_cardinality(astra, k)}
    for method, matrix in ({name: astra} | {method: scores[method][:n] for method in scores}).items():
        same = linear_datamodeling_score(matrix, subsets, outputs[:, :n])
        methods[method]["lds_astra_examples"] = {"mean": same.mean, "ci_low": same.ci_low, "ci_high": same.ci_high}


# settings in which a run adding the ASTRA rows may differ from the stored one (those of the rows themselves first)
ASTRA_ROW_SETTINGS = ("astra_test", "astra_steps", "astra_batches")
ASTRA_SETTINGS = (*ASTRA_ROW_SETTINGS, "json", "plot", "cache", "add_astra_to", "threads")


def add_astra(args):
    """`--add-astra-to`: the stored run with ASTRA's rows, refused unless this run reproduces its LDS."""
    start = time.perf_counter()
    with open(args.add_astra_to) as f:
        stored = json.load(f)
    case_deletion.check_same_settings(args, stored["settings"], ASTRA_SETTINGS, f"--add-astra-to {args.add_astra_to}")
    if not args.astra_test:
        raise SystemExit("--add-astra-to adds ASTRA's rows: give --astra-test > 0.")
    if stored["settings"]["astra_test"] not in (0, args.astra_test):
        raise SystemExit(f"--add-astra-to {args.add_astra_to}: its ASTRA rows are on {stored['settings']['astra_test']} "
                         "test examples; give the same --astra-test, so every method's LDS on them stays one set.")
    setup = target_setup(args)
    labels = setup.test.tensors[-1]
    methods = {name: dict(r) for name, r in stored["methods"].items()}
    with tempfile.TemporaryDirectory() as directory:
        model, checkpoints, scores, _ = trained_and_scored(setup, directory)
        subsets, outputs, retrain_and_output = lds_retrainings(setup)
        # the cheap checks first (ASTRA's refinement may take hours): the scores of this run's model
        for name, matrix in scores.items():
            mine, theirs = linear_datamodeling_score(matrix, subsets, outputs).mean, methods[name]["lds"]["mean"]
            if abs(mine - theirs) > 1e-6:
                raise SystemExit(f"--add-astra-to: {name}'s LDS is {mine:.6f} here and {theirs:.6f} in the stored "
                                 "run, so this run does not reproduce its models or retrainings; run it anew.")
        if args.cache:  # and, where the retrainings came from --cache, the first one retrained anew
            first = subsets[0].nonzero().flatten().tolist()
            again = torch.as_tensor(retrain_and_output(first, 0)).double()
            if not torch.allclose(again, outputs[0], rtol=0, atol=1e-4):
                raise SystemExit("--add-astra-to: the first subset's retraining gives other label margins here "
                                 f"({again.tolist()}) than in --cache {args.cache} ({outputs[0].tolist()}), so "
                                 "this run does not reproduce the stored retrainings; run it anew.")
        astra, seconds = astra_scores(setup, model, checkpoints)
    k = stored["top_k"]
    add_astra_rows(methods, args, astra, seconds, scores, subsets, outputs, setup.train.tensors[-1], labels, k)
    # the stored settings, with ASTRA's; what this addition ran with goes into "astra_addition"
    settings = {**stored["settings"], **{name: vars(args)[name] for name in ASTRA_ROW_SETTINGS}}
    methods = dict(sorted(methods.items(), key=lambda item: item[0] == "loss (final model)"))  # the baseline last
    addition = {"seconds": time.perf_counter() - start,
                **{name: vars(args)[name] for name in ASTRA_SETTINGS if name not in ASTRA_ROW_SETTINGS}}
    return {**stored, "settings": settings, "methods": methods, "astra_addition": addition}


def report(results):
    s, k = results["settings"], results["top_k"]
    print(f"{s['dataset'].upper()}, {s['model'].upper()}: {s['train']} training and {s['test_examples']} test "
          f"examples; LDS over {s['subsets']} subsets of {s['fraction']:.0%}; further training of the final model "
          f"without each of {s['further_sample']} training examples; {results['total_seconds'] / 60:.1f} minutes\n")
    if "astra_addition" in results:
        added = results["astra_addition"]
        retrained = (", and retrained the first subset anew to check --cache's retrainings" if added["cache"]
                     else "")
        print(f"(ASTRA's rows added to the stored run by --add-astra-to, which reproduced every stored LDS"
              f"{retrained}: {added['seconds'] / 60:.1f} minutes)\n")
    elif "astra_added_seconds" in results:  # added before the check of --cache's retrainings
        print(f"(ASTRA's rows added to the stored run by --add-astra-to, which reproduced every stored LDS, "
              f"with the retrainings of --cache: {results['astra_added_seconds'] / 60:.1f} minutes)\n")
    steps = s["further_steps"]
    print("| method | LDS [95% interval] | " + " | ".join(f"further training, t={t}" for t in steps)
          + f" | identical class | top-{k} cardinality | randomisation corr. | mislabel AUC | seconds |")
    print("|---|---:|" + "---:|" * len(steps) + "---:|---:|---:|---:|---:|")
    for name, r in results["methods"].items():
        further = [_cell(r.get("further_training", {}).get(str(t), {}).get("mean"), "+.3f") for t in steps]
        cells = [_interval(r.get("lds")), *further, _cell(r.get("identical_class"), ".2f"),
                 _cell(r.get(f"top_{k}_cardinality"), ".2f"), _cell(r.get("randomization_correlation"), "+.2f"),
                 _cell(r.get("mislabel_auc"), ".3f"), _cell(r.get("seconds"), ".1f")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    same_rows = {name: r["lds_astra_examples"] for name, r in results["methods"].items() if "lds_astra_examples" in r}
    if same_rows:
        print(f"\nLDS on the {s['astra_test']} test examples that {astra_name(argparse.Namespace(**s))} scored:\n")
        print("| method | LDS [95% interval] |\n|---|---:|")
        for name, lds in same_rows.items():
            print(f"| {name} | {_interval(lds)} |")


def _cell(value, spec):
    return "" if value is None else format(value, spec)


def _interval(r):
    return "" if r is None else f"{r['mean']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]"


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [name for name, r in results["methods"].items() if "lds" in r]
    lds = [results["methods"][n]["lds"] for n in names]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.2))
    means = [r["mean"] for r in lds]
    errors = [[r["mean"] - r["ci_low"] for r in lds], [r["ci_high"] - r["mean"] for r in lds]]
    ax.barh(range(len(names)), means, xerr=errors, capsize=3, color="#4c72b0")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    s = results["settings"]
    ax.set_xlabel(f"LDS (Spearman), {s['subsets']} subsets; 95% intervals over test examples")
    model = "a CNN" if s["model"] == "cnn" else f"MiniLM ({s['layers']} layers)"
    fig.suptitle(f"{s['dataset'].upper()} with {model}: which attribution predicts retraining")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    case_deletion.quiet_model_loading()
    args = parse_args(argv)
    return run_benchmark(args, add_astra if args.add_astra_to else run, report, plot)


if __name__ == "__main__":
    main(sys.argv[1:])
