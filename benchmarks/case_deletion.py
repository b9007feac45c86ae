"""
The TracIn-WE paper's evaluation on real data: case deletion (DEL+ and DEL-,
retraining without each method's top-k proponents or opponents of a test
example, several k and seeds, 95% bootstrap intervals, random deletion as the
control), mislabel detection by self-influence, and the cancellation ratio.

Methods: `--methods`, names in `compare_influence_methods`' registry (by default
`default_methods()`, every registered method but two (see `NOT_COMPARED`):
TracInWE raw, cosine and TopK, InfluenceWE with EK-FAC and K-FAC, Captum's
TracInCP on the last layer and TracInCPFast; `evaluate.py` judges the same
ones, and a `register_method` line adds one to both), the cosine similarity of
mean-pooled word embeddings, and random.
Models: a small CNN trained from scratch on the MiniLM WordPiece vocabulary
(`--model cnn`, the default), or the packaged MiniLM fine-tuned (`--model minilm`).
Every retraining keeps the seed and the order of the remaining examples
(`SameOrderSampler`), so a change measures the deletion, not a new shuffle.

    python benchmarks/case_deletion.py --json benchmarks/results/case_deletion_mr_cnn.json --plot benchmarks/results/case_deletion_mr_cnn.png > benchmarks/results/case_deletion_mr_cnn.txt
    python benchmarks/case_deletion.py --quick          # a minute: tiny data, one k, one seed

`--add-to FILE.json` adds the `--methods` an earlier run of the same settings lacks: only their
deletions are retrained, and the run refuses to merge unless it reproduces the stored run, checked
before any new retraining: the held-out accuracy, the check method's (the stored run's first)
cancellation ratio and its and the similarity's mean scores, the check method's changes at the
smallest k and seed, retrained anew (never read from `--cache`), and the mislabel detection by the
loss. That needs the same code and library versions (the thread count, recorded as `threads`, moves a
CPU training's float sums a little, within the checks' tolerance, or sometimes far more: then the check
refuses). The stored settings are kept; what the addition ran with (threads, cache, trainings run and
read) goes into its `additions` entry. `--cache DIR` keeps every retraining, in a folder of DIR per
setting that decides it (data, model, training options, thread count, library versions; see its
`settings.json`), so a run that is interrupted, or rerun with more methods, retrains only what it
lacks, and runs of other settings can share DIR.
"""

import argparse
import functools
import json
import os
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import run_benchmark  # noqa: E402

from captum_tracin_we import InfluenceWE, load_checkpoint  # noqa: E402
from captum_tracin_we._utils.captum_compat import integer_input_warnings_ignored  # noqa: E402
from captum_tracin_we.compare import (  # noqa: E402
    compare_influence_methods, METHOD_BUILDERS, MethodRun, register_method, token_method, TRACINCP_EMBEDDINGS,
    TRACINCP_FAST_RAND_PROJ,
)
from captum_tracin_we.data import (  # noqa: E402
    encode, fine_tune, load_bbc_news, load_minilm_classifier, load_movie_reviews, predict_proba,
)
from captum_tracin_we.data.minilm import minilm_dir  # noqa: E402
from captum_tracin_we.evaluation import (  # noqa: E402
    cancellation_ratio, case_deletion, CaseDeletionResults, datamodel_outputs, embedding_similarity, flip_labels,
    fraction_found, roc_auc, SameOrderSampler, subset_key,
)
from captum_tracin_we.models import TextCNN  # noqa: E402

register_method("InfluenceWE (K-FAC)", lambda run: token_method(run, InfluenceWE, approximation="kfac"))
# Both protocols (this and evaluate.py) compare every method in the registry of compare_influence_methods
# but these: the random projection approximates TracInCPFast's own scores, and Captum's dense TracInCP on
# the embeddings equals TracInWE (tests/test_oracle.py) at many times the cost. So one `register_method`
# line, like the one above, adds a method to both.
NOT_COMPARED = (TRACINCP_FAST_RAND_PROJ, TRACINCP_EMBEDDINGS)


def default_methods():
    """The methods both benchmarks compare unless --methods says otherwise: the registry's, as registered."""
    return [name for name in METHOD_BUILDERS if name not in NOT_COMPARED]

SIMILARITY = "embedding similarity"
RANDOM = "random"
QUICK = dict(train=60, test_examples=2, ks=[3], seeds=[0], epochs=2, max_length=16,
             mislabel_train=60, layers=1, checkpoints=2)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=("mr", "bbc"), default="mr")
    parser.add_argument("--model", choices=("cnn", "minilm"), default="cnn")
    parser.add_argument("--train", type=int, default=3000, help="training examples")
    parser.add_argument("--test-examples", type=int, default=16, help="test examples evaluated")
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=None, help="default: 4 (cnn), 2 (minilm)")
    parser.add_argument("--learning-rate", type=float, default=None, help="default: 3e-3 (cnn), 1e-4 (minilm)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 (cnn), 16 (minilm)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens; default 48 (mr), 128 (bbc)")
    parser.add_argument("--layers", type=int, default=2, help="MiniLM layers kept (--model minilm)")
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=default_methods(),
                        help="names in the registry of compare_influence_methods; default: "
                             f"{', '.join(default_methods())}")
    parser.add_argument("--top-k-tokens", type=int, default=10)
    parser.add_argument("--flip-fraction", type=float, default=0.1)
    parser.add_argument("--mislabel-train", type=int, default=None, help="default: --train")
    parser.add_argument("--quick", action="store_true", help="tiny settings, for the tests")
    parser.add_argument("--cache", help="a folder that keeps each retraining's probabilities (in a folder per "
                        "setting), so that a rerun (or one interrupted) retrains only what it has not")
    parser.add_argument("--add-to", help="the JSON of an earlier run with these settings: run only the "
                        "--methods it lacks, check that it reproduces, and merge")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    cnn = args.model == "cnn"
    args.epochs = args.epochs or (4 if cnn else 2)
    # MiniLM needs more, smaller steps: at batch 64 and 5e-5, 1000 MR sentences left it at chance.
    args.learning_rate = args.learning_rate or (3e-3 if cnn else 1e-4)
    args.batch_size = args.batch_size or (64 if cnn else 16)
    args.max_length = args.max_length or (48 if args.dataset == "mr" else 128)
    args.mislabel_train = args.mislabel_train or args.train
    # CPU float sums depend on the thread count, so a retraining repeats only with as many threads
    args.threads = torch.get_num_threads()
    return args


class Setup:
    """The data, tokenised, and how to make and train a model of the chosen kind."""

    def __init__(self, args, n_train):
        self.args = args
        load = load_movie_reviews if args.dataset == "mr" else load_bbc_news
        self.data = load(n_train=n_train, n_test=max(args.test_examples, 50), seed=0)
        self.num_labels = len(self.data.label_names)
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
        self.encode = lambda texts, labels: encode(tokenizer, texts, labels, args.max_length)
        self.train = self.encode(self.data.train_texts, self.data.train_labels)
        self.test = self.encode(self.data.test_texts[:args.test_examples], self.data.test_labels[:args.test_examples])
        self.held_out = self.encode(self.data.test_texts, self.data.test_labels)
        self.final_fc_layer = "classifier" if args.model == "cnn" else "model.classifier"

    def model(self, seed):
        if self.args.model == "cnn":
            return TextCNN(30522, self.num_labels, seed=seed)
        return load_minilm_classifier(self.num_labels, self.args.layers, seed=seed)[0]

    def trained(self, seed, dataset, kept=None, checkpoint_dir=None):
        model = self.model(seed)
        n = len(dataset)
        paths = fine_tune(
            model, dataset, checkpoint_dir, epochs=self.args.epochs, learning_rate=self.args.learning_rate,
            batch_size=self.args.batch_size, num_checkpoints=self.args.checkpoints, seed=seed,
            show_progress=False, sampler=SameOrderSampler(range(n) if kept is None else kept, n, seed),
        )
        return model, paths


def label_probabilities(model, dataset):
    probabilities = predict_proba(model, dataset)
    return probabilities[torch.arange(len(dataset)), dataset.tensors[-1]]


def influence_scores(setup, model, checkpoints, methods=None):
    """Every method's (n_test, n_train) scores (`methods`, default `--methods`, from
    `compare_influence_methods`' registry, and the embedding similarity at the last checkpoint),
    and seconds per method."""
    comparison = compare_influence_methods(
        model, setup.train, checkpoints, setup.test.tensors, nn.CrossEntropyLoss(), setup.final_fc_layer,
        methods=methods or setup.args.methods, top_k_tokens=setup.args.top_k_tokens,
        batch_size=setup.args.batch_size,
    )
    scores = {name: r.scores for name, r in comparison.results.items()}
    seconds = {name: r.seconds for name, r in comparison.results.items()}
    load_checkpoint(model, checkpoints[-1])
    start = time.perf_counter()
    scores[SIMILARITY] = embedding_similarity(model.get_input_embeddings(), setup.train, setup.test)
    seconds[SIMILARITY] = time.perf_counter() - start
    return scores, seconds


def method_run(setup, model, train, checkpoints):
    """What a registered method is built from (`METHOD_BUILDERS[name](run)`), for `model` trained on `train`."""
    return MethodRun(model, train, checkpoints, load_checkpoint, nn.CrossEntropyLoss(), setup.final_fc_layer,
                     None, setup.args.top_k_tokens, setup.args.batch_size, None)


def mislabel_detection(args, methods):
    """Flips `--flip-fraction` of the labels, trains, and ranks the training set by each method's
    self influence (and by the final model's loss, and at random): the ROC AUC of finding the
    flipped ones and the share of them found in the top 10% and 20%."""
    setup = Setup(args, args.mislabel_train)
    noisy, flipped = flip_labels(setup.data.train_labels, args.flip_fraction, setup.num_labels, seed=0)
    train = setup.encode(setup.data.train_texts, noisy)
    with tempfile.TemporaryDirectory() as directory:
        model, checkpoints = setup.trained(0, train, checkpoint_dir=directory)
        run = method_run(setup, model, train, checkpoints)
        with integer_input_warnings_ignored():
            scores = {name: METHOD_BUILDERS[name](run).self_influence(outer_loop_by_checkpoints=True)
                      for name in methods}
        load_checkpoint(model, checkpoints[-1])
        scores["loss (final model)"] = -label_probabilities(model, train).log()
    scores["random"] = torch.rand(len(train), generator=torch.Generator().manual_seed(0))
    inspected = (0.1, 0.2)
    return {
        "train": len(train), "flipped": len(flipped), "inspected": inspected,
        "methods": {
            name: {"auc": roc_auc(values, flipped), "found": fraction_found(values, flipped, inspected)}
            for name, values in scores.items()
        },
    }


def trained_and_scored(setup, seed, methods=None):
    """Trains on the whole training set with `seed`; returns the held-out accuracy and
    the scores and seconds of `methods` (default `--methods`) and the embedding similarity."""
    with tempfile.TemporaryDirectory() as directory:
        model, checkpoints = setup.trained(seed, setup.train, checkpoint_dir=directory)
        accuracy = (predict_proba(model, setup.held_out).argmax(1) == setup.held_out.tensors[-1]).float().mean()
        scores, seconds = influence_scores(setup, model, checkpoints, methods)
    return accuracy.item(), scores, seconds


def median_cancellation_ratios(scores):
    """Each method's median (torch's: the lower middle value) ratio over the test examples."""
    return {name: cancellation_ratio(values).median().item() for name, values in scores.items()}


def run(args):
    start = time.perf_counter()
    torch.manual_seed(0)
    stored = read_stored_run(args) if args.add_to else None
    methods = args.methods if stored is None else stored["new_methods"]
    check = [] if stored is None else [stored["check_method"]]
    setup = Setup(args, args.train)
    accuracy, scores, seconds = trained_and_scored(setup, 0, methods + check)
    ratios = median_cancellation_ratios(scores)
    summaries = score_summaries(scores)
    retrainings = Retrainings(args, setup)
    if stored is not None:  # the checks first, before the retrainings of the new methods
        check_model(stored["results"], accuracy, ratios, summaries, check[0])
        # retrained anew, not read from --cache: the check is of this run's retrainings
        reproduced = case_deletion(functools.partial(retrainings, fresh=True), {check[0]: scores[check[0]]},
                                   ks=[min(args.ks)], seeds=[min(args.seeds)], random_control=False,
                                   show_progress=False)
        check_changes(stored["results"], reproduced, check[0])
    mislabel = mislabel_detection(args, methods)
    if stored is not None:
        loss = "loss (final model)"
        mine, theirs = mislabel["methods"][loss], stored["results"]["mislabel_detection"]["methods"][loss]
        if mine != theirs:
            refuse_merge("the mislabel detection by the loss", mine, theirs)
    # adding to a stored run: its similarity is stored, and the check method is retrained apart
    new_scores = {name: scores[name] for name in scores if name not in check + ([SIMILARITY] if stored else [])}
    deletion = case_deletion(retrainings, new_scores, ks=args.ks, seeds=args.seeds, random_control=stored is None)
    results = {
        "settings": vars(args),
        "held_out_accuracy": accuracy,
        "influence_seconds": seconds,
        "median_cancellation_ratio": ratios,
        "score_summary": summaries,
        "case_deletion": deletion.to_dict(),
        "case_deletion_table": deletion.table(),
        "mislabel_detection": mislabel,
        "trainings_run": retrainings.trained,
        "trainings_read_from_cache": retrainings.read,
        "retraining_digests": retrainings.digests(),
    }
    if stored is not None:
        return merged(stored["results"], results, time.perf_counter() - start)
    results["total_seconds"] = time.perf_counter() - start
    return results


def score_summaries(scores):
    """Each method's mean score and mean |score|: a stored run's scores are checked against them."""
    return {name: {"mean": values.double().mean().item(), "mean_abs": values.double().abs().mean().item()}
            for name, values in scores.items()}


def retraining_settings(args, output):
    """What decides a retraining's `output` besides its subset and seed: the key of its `--cache` folder."""
    import transformers

    import captum_tracin_we
    names = ("dataset", "model", "train", "test_examples", "epochs", "learning_rate", "batch_size", "max_length",
             "layers", "threads")
    return {"output": output, **{name: getattr(args, name) for name in names},
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "captum_tracin_we": captum_tracin_we.__version__}}


class Retrainings:
    """The probabilities of the test labels after training on `kept` from `seed` (`retrain_and_predict`),
    each trained once per run and kept in `--cache` (read from it unless `fresh`); counts what it
    trained and what it read."""

    def __init__(self, args, setup):
        self.args, self.setup, self.done = args, setup, {}
        self.trained = self.read = 0

    def __call__(self, kept, seed, fresh=False):
        key = (tuple(kept), seed)  # the full model of every seed is retrained once, also for the check
        if key not in self.done:
            self.done[key] = self.train(kept, seed) if fresh or self.args.cache is None else self.cached(kept, seed)
        return self.done[key]

    def digests(self):
        """A short digest of every (kept, seed) retrained: what a merged run counts once."""
        return sorted(subset_key(list(kept), seed)[:16] for kept, seed in self.done)

    def train(self, kept, seed):
        self.trained += 1
        return label_probabilities(self.setup.trained(seed, self.setup.train, kept=kept)[0], self.setup.test)

    def cached(self, kept, seed):
        subset = torch.zeros(len(self.setup.train), dtype=torch.bool)
        subset[list(kept)] = True
        before = self.trained
        found = datamodel_outputs(self.train, subset.unsqueeze(0), seed, self.args.cache, show_progress=False,
                                  cache_settings=retraining_settings(self.args, "p(label) of the test examples"))
        self.read += self.trained == before
        return found[0]


# settings that may differ between a stored run and the one adding methods to it
# (the thread count is recorded, not compared: the checks of `check_model` and `check_changes` decide)
UNCOMPARED_SETTINGS = ("methods", "json", "plot", "add_to", "cache", "threads")


def check_same_settings(args, stored, ignored, where):
    """Refuses settings that differ from a `stored` run's but in `ignored` (an option it predates counts as None)."""
    mine = {k: v for k, v in vars(args).items() if k not in ignored}
    theirs = {k: v for k, v in stored.items() if k not in ignored}
    differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if differing:
        raise SystemExit(f"{where}: its settings differ in {', '.join(differing)}; pass the same options as "
                         "that run, or run it anew.")


def read_stored_run(args):
    """The run of `--add-to`, the `--methods` it lacks, and the stored method re-run as a check."""
    with open(args.add_to) as f:
        results = json.load(f)
    check_same_settings(args, results["settings"], UNCOMPARED_SETTINGS, f"--add-to {args.add_to}")
    stored = [m for m in CaseDeletionResults.from_dict(results["case_deletion"]).methods
              if m not in (SIMILARITY, RANDOM)]
    new = [m for m in args.methods if m not in stored]
    if not new or not stored:
        raise SystemExit(f"--add-to {args.add_to}: it already has every one of --methods (it has "
                         f"{', '.join(stored)}); name a method it lacks." if not new
                         else f"--add-to {args.add_to}: it has no method to check against.")
    return {"results": results, "new_methods": new, "check_method": stored[0]}


def refuse_merge(what, mine, theirs):
    raise SystemExit(f"--add-to: {what} is {mine} here and {theirs} in the stored run, so this run does not "
                     "reproduce it and the methods would be judged on other models (the same code, library "
                     "versions and thread count, OMP_NUM_THREADS, reproduce a run); run every method anew.")


def check_model(stored, accuracy, ratios, summaries, check):
    """Refuses to add to a stored run whose model this run did not train again, or whose scores differ:
    the held-out accuracy, the check method's median cancellation ratio, and the check method's and the
    embedding similarity's mean score and mean |score| (where the stored run has them; the similarity's
    ratio is 1 wherever its scores are all positive, so it tells nothing)."""
    if accuracy != stored["held_out_accuracy"]:
        refuse_merge("the held-out accuracy", accuracy, stored["held_out_accuracy"])
    mine, theirs = ratios[check], stored["median_cancellation_ratio"][check]
    if abs(mine - theirs) > 1e-4 * abs(theirs):
        refuse_merge(f"{check}'s median cancellation ratio", mine, theirs)
    for name in (check, SIMILARITY):
        for statistic, value in stored.get("score_summary", {}).get(name, {}).items():
            # relative to the scores' size: their mean may nearly cancel
            if abs(summaries[name][statistic] - value) > 1e-4 * stored["score_summary"][name]["mean_abs"]:
                refuse_merge(f"{name}'s {statistic.replace('_', ' ')} score", summaries[name][statistic], value)


def check_changes(stored, reproduced, check):
    """Refuses to add to a stored run whose retrainings of `check`'s deletions this run did not reproduce."""
    stored_deletion = CaseDeletionResults.from_dict(stored["case_deletion"])
    column = stored_deletion.seeds.index(reproduced.seeds[0])
    for effect in reproduced.effects:
        theirs = stored_deletion.effect(check, effect.k, effect.deleted).changes[:, column]
        # float rounding (another thread count) moves a probability by about 1e-6, another model by far more
        if not torch.allclose(effect.changes[:, 0], theirs, rtol=0, atol=1e-4):
            refuse_merge(f"the change of p(label) after deleting {check}'s top {effect.k} {effect.deleted} "
                         f"(seed {reproduced.seeds[0]})", effect.changes[:, 0].tolist(), theirs.tolist())


def merged(stored, added, seconds):
    """The stored results with the added methods' (in `--methods` order, the controls last); the stored
    settings are kept, and what the addition ran with goes into its `additions` entry."""
    stored_deletion = CaseDeletionResults.from_dict(stored["case_deletion"])
    added_deletion = CaseDeletionResults.from_dict(added["case_deletion"])
    methods = list(dict.fromkeys(added["settings"]["methods"] + stored_deletion.methods))
    methods = [m for m in methods if m not in (SIMILARITY, RANDOM)]
    effects = [e for method in methods + [SIMILARITY, RANDOM]
               for e in stored_deletion.effects + added_deletion.effects if e.method == method]
    digests = sorted(set(stored.get("retraining_digests", [])) | set(added["retraining_digests"]))
    if "retraining_digests" in stored:
        retrains = len(digests)
    else:  # a run stored before the digests: the full models are its, the added methods' deletions counted anew
        retrains = stored_deletion.retrains + added_deletion.retrains - len(added_deletion.seeds)
    deletion = CaseDeletionResults(effects, stored_deletion.test_indices, stored_deletion.ks, stored_deletion.seeds,
                                   retrains=retrains)

    def in_order(old, new, names):
        both = {**new, **old}  # what both have is the stored run's
        return {name: both[name] for name in dict.fromkeys([*names, *both]) if name in both}

    mislabel = {**stored["mislabel_detection"], "methods": in_order(
        stored["mislabel_detection"]["methods"], added["mislabel_detection"]["methods"],
        methods + ["loss (final model)", RANDOM])}
    addition = {"methods": added_deletion.methods, "trainings_run": added["trainings_run"],
                "trainings_read_from_cache": added["trainings_read_from_cache"], "seconds": seconds,
                **{name: added["settings"][name] for name in UNCOMPARED_SETTINGS if name != "methods"}}
    return {
        **stored,
        "settings": {**stored["settings"], "methods": methods},
        "influence_seconds": in_order(stored["influence_seconds"], added["influence_seconds"], methods),
        "median_cancellation_ratio": in_order(stored["median_cancellation_ratio"],
                                              added["median_cancellation_ratio"], methods),
        "score_summary": in_order(stored.get("score_summary", {}), added["score_summary"], methods),
        "case_deletion": deletion.to_dict(),
        "case_deletion_table": deletion.table(),
        "mislabel_detection": mislabel,
        "total_seconds": stored["total_seconds"] + seconds,
        "additions": stored.get("additions", []) + [addition],
        # only where the stored run had them: else they would seem to be all of the merged run's
        **({"retraining_digests": digests} if "retraining_digests" in stored else {}),
    }


def report(results):
    s = results["settings"]
    deletion = results["case_deletion"]
    print(f"{s['dataset'].upper()}, {s['model'].upper()}: {s['train']} training examples, "
          f"{len(deletion['test_indices'])} test examples, k in {deletion['ks']}, seeds {deletion['seeds']}, "
          f"{deletion['retrains']} trainings; held-out accuracy {results['held_out_accuracy']:.3f}; "
          f"{results['total_seconds'] / 60:.1f} minutes in all\n")
    for added in results.get("additions", []):
        if "trainings_run" in added:
            trainings = (f"{added['trainings_run']} trainings run (the check's anew), "
                         f"{added['trainings_read_from_cache']} read from --cache")
        else:  # an addition before the counts were split
            trainings = f"{added['trainings']} trainings run or read from --cache"
        print(f"({', '.join(added['methods'])} added to the stored run by --add-to: {trainings}, "
              f"{added['seconds'] / 60:.1f} minutes; the stored model, scores and the check method's retrainings "
              "reproduced)\n")
    print("Case deletion: mean change of the probability of the test example's label over test examples "
          "(each the mean over seeds), 95% bootstrap interval over test examples:\n")
    print(results["case_deletion_table"])
    print("\n| method | median cancellation ratio | seconds for the scores |\n|---|---:|---:|")
    for name, ratio in results["median_cancellation_ratio"].items():
        print(f"| {name} | {ratio:.2f} | {results['influence_seconds'].get(name, 0):.1f} |")
    m = results["mislabel_detection"]
    shares = " | ".join(f"found in top {share:.0%}" for share in m["inspected"])
    print(f"\nMislabel detection: {m['flipped']} of {m['train']} training labels flipped, ranked by self-influence\n")
    print(f"| ranking | AUC | {shares} |\n|---|---:|" + "---:|" * len(m["inspected"]))
    for name, r in m["methods"].items():
        print(f"| {name} | {r['auc']:.3f} | " + " | ".join(f"{f:.2f}" for f in r["found"]) + " |")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    effects = results["case_deletion"]["effects"]
    methods = list(dict.fromkeys(e["method"] for e in effects))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, kind, title in zip(axes, ("proponents", "opponents"),
                               ("DEL+: drop after deleting proponents", "DEL-: rise after deleting opponents")):
        for i, method in enumerate(methods):
            rows = [e for e in effects if e["method"] == method and e["deleted"] == kind]
            ks = [e["k"] * (1 + 0.03 * (i - len(methods) / 2)) for e in rows]  # spread the bars
            means = [e["mean"] for e in rows]
            errors = [[e["mean"] - e["ci_low"] for e in rows], [e["ci_high"] - e["mean"] for e in rows]]
            ax.errorbar(ks, means, yerr=errors, marker="o", capsize=3, label=method,
                        linestyle=":" if method == "random" else "-")
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.set_xscale("log")
        ax.set_xticks(results["case_deletion"]["ks"], [str(k) for k in results["case_deletion"]["ks"]])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("training examples deleted (k)")
        ax.set_ylabel("change of p(label), higher is better")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    s = results["settings"]
    model = "a CNN" if s["model"] == "cnn" else f"MiniLM ({s['layers']} layers) fine-tuned"
    fig.suptitle(f"Case deletion, {s['dataset'].upper()} with {model} "
                 "(means and 95% intervals over test examples)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def quiet_model_loading():
    """One "Loading weights" bar per MiniLM retraining is noise."""
    from transformers.utils import logging
    logging.disable_progress_bar()


def main(argv=None):
    quiet_model_loading()
    return run_benchmark(parse_args(argv), run, report, plot)


if __name__ == "__main__":
    main(sys.argv[1:])
