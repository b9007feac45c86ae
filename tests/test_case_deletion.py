"""Case deletion, the CNN it runs on, the similarity baseline, and the --quick runs of the
case-deletion and cancellation benchmarks."""

import json
import os

import numpy

import pytest
import torch
from conftest import load_benchmark
from torch.utils.data import TensorDataset

from captum_tracin_we import TracInWE
from captum_tracin_we.data import fine_tune, predict_proba
from captum_tracin_we.evaluation import (
    case_deletion,
    embedding_similarity,
    label_agreement,
    SameOrderSampler,
    top_k_training_indices,
)
from captum_tracin_we.models import TextCNN

N_TRAIN = 12


def additive_retrain(values):
    """A fake retraining: test example i's probability is 0.5 + the mean of
    values[i, j] over the kept training examples j; records every call."""
    calls = []

    def retrain(kept, seed):
        calls.append((tuple(kept), seed))
        return 0.5 + values[:, kept].sum(dim=1) / N_TRAIN + 0.001 * seed

    return retrain, calls


def test_deletion_removes_exactly_the_top_k_and_retrains_each_set_once_per_seed():
    values = torch.randn(3, N_TRAIN, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    retrain, calls = additive_retrain(values)
    scores = {"oracle": values, "reversed": -values}
    results = case_deletion(retrain, scores, ks=[2, 4], seeds=[0, 5], random_control=True,
                            show_progress=False)
    kept_sets = {kept for kept, _ in calls}
    for method, matrix in [("oracle", values), ("reversed", -values)]:
        for k in (2, 4):
            for proponents in (True, False):
                top = top_k_training_indices(matrix, k, proponents)
                for row in range(3):
                    deleted = set(top[row].tolist())
                    assert tuple(i for i in range(N_TRAIN) if i not in deleted) in kept_sets
    assert tuple(range(N_TRAIN)) in kept_sets  # the full model
    assert len(calls) == len(set(calls)) == results.retrains  # nothing trained twice
    assert {seed for _, seed in calls} == {0, 5}
    assert results.methods == ["oracle", "reversed", "random"]

    # DEL+ of the oracle is exactly the sum of the deleted values / N_TRAIN
    effect = results.effect("oracle", 2, "proponents")
    top = top_k_training_indices(values, 2)
    expected = torch.stack([values[row, top[row]].sum() / N_TRAIN for row in range(3)])
    torch.testing.assert_close(effect.changes, expected[:, None].expand(3, 2), rtol=0, atol=1e-12)
    assert effect.ci_low <= effect.mean <= effect.ci_high
    # the oracle beats the reversed ranking on both sides
    for kind in ("proponents", "opponents"):
        assert results.effect("oracle", 4, kind).mean > 0 > results.effect("reversed", 4, kind).mean
    assert "| oracle | 2 |" in results.table()
    assert json.loads(json.dumps(results.to_dict()))["ks"] == [2, 4]


def test_case_deletion_rejects_bad_arguments():
    retrain, _ = additive_retrain(torch.zeros(2, N_TRAIN))
    scores = {"a": torch.zeros(2, N_TRAIN)}
    with pytest.raises(ValueError, match=r"`scores` is empty"):
        case_deletion(retrain, {})
    with pytest.raises(ValueError, match=r"of the same shape"):
        case_deletion(retrain, {"a": torch.zeros(2, N_TRAIN), "b": torch.zeros(3, N_TRAIN)})
    with pytest.raises(ValueError, match=r"`ks` must be below the 12 training examples"):
        case_deletion(retrain, scores, ks=[12], show_progress=False)
    with pytest.raises(ValueError, match=r"`seeds` must be a non-empty list"):
        case_deletion(retrain, scores, ks=[1], seeds=[], show_progress=False)
    with pytest.raises(ValueError, match=r"`ks` must be a non-empty list of ints >= 1, got \['a'\]"):
        case_deletion(retrain, scores, ks=["a"], show_progress=False)
    with pytest.raises(ValueError, match=r"`test_indices` must be distinct rows of `scores` \(below 2\), got \[1, 1\]"):
        case_deletion(retrain, scores, ks=[1], test_indices=[1, 1], show_progress=False)
    with pytest.raises(ValueError, match=r'already has a method named "random"'):
        case_deletion(retrain, {"random": torch.zeros(2, N_TRAIN)}, ks=[1], show_progress=False)
    with pytest.raises(ValueError, match=r"returned 1 probabilities; it must return one per test example \(2\)"):
        case_deletion(lambda kept, seed: torch.zeros(1), scores, ks=[1], seeds=[0], show_progress=False)


def test_same_order_sampler_keeps_the_full_order_of_the_remaining_examples():
    full = SameOrderSampler(range(10), 10, seed=3)
    subset = SameOrderSampler([0, 2, 3, 7, 9], 10, seed=3)
    for _ in range(2):  # every epoch: a new permutation, filtered alike
        order = list(full)
        assert list(subset) == [i for i in order if i in {0, 2, 3, 7, 9}]
    assert len(subset) == 5 and sorted(order) == list(range(10))


def duplicate_data(seed=0):
    """Noise sentences with random labels; test sentence 0 duplicates training
    sentence 0, whose tokens 40-45 occur nowhere else."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 40, (30, 8), generator=g)
    ids[0] = torch.tensor([1, 40, 41, 42, 43, 44, 45, 2])
    labels = torch.randint(0, 2, (30,), generator=g)
    labels[0] = 1
    train = TensorDataset(ids, torch.ones_like(ids), labels)
    test = TensorDataset(ids[:1].clone(), torch.ones_like(ids[:1]), labels[:1].clone())
    return train, test


def train_cnn(train, kept, seed):
    model = TextCNN(50, 2, embedding_dim=16, channels=16, seed=seed)
    fine_tune(model, train, None, epochs=15, learning_rate=1e-2, batch_size=8, seed=seed,
              show_progress=False, sampler=SameOrderSampler(kept, len(train), seed))
    return model


def test_retraining_is_deterministic_and_deleting_the_duplicate_drops_its_probability():
    train, test = duplicate_data()
    first = train_cnn(train, list(range(1, 30)), seed=1)
    again = train_cnn(train, list(range(1, 30)), seed=1)
    for a, b in zip(first.parameters(), again.parameters()):
        assert torch.equal(a, b)

    def retrain(kept, seed):
        return predict_proba(train_cnn(train, kept, seed), test)[:, 1]

    oracle = torch.zeros(1, 30)
    oracle[0, 0] = 1.0  # the duplicate is the top proponent
    results = case_deletion(retrain, {"duplicate oracle": oracle}, ks=[1], seeds=[0, 1],
                            show_progress=False)
    assert results.full_probabilities[0][0] > 0.9  # the duplicate was learnt
    assert results.effect("duplicate oracle", 1, "proponents").mean > 0.3
    assert abs(results.effect("random", 1, "proponents").mean) < 0.1


def test_text_cnn_ignores_padding_and_works_with_tracin_we():
    model = TextCNN(50, 3, embedding_dim=8, channels=8, seed=0).double()
    ids = torch.tensor([[1, 7, 9, 2]])
    padded = torch.tensor([[1, 7, 9, 2, 0, 0]])
    torch.testing.assert_close(model(ids, torch.ones_like(ids)),
                               model(padded, (padded != 0).long()))
    assert model.get_input_embeddings() is model.embedding
    with pytest.raises(ValueError, match=r"`kernel_size` must be an odd int"):
        TextCNN(50, 2, kernel_size=2)
    train, _ = duplicate_data()
    tracin = TracInWE(model.float().eval(), train, [model.state_dict()],
                      checkpoints_load_func=lambda m, c: (m.load_state_dict(c), 0.1)[1],
                      loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"), batch_size=8)
    assert tracin.influence(train[:2]).shape == (2, 30)


def test_embedding_similarity_is_the_cosine_of_mean_pooled_embeddings():
    embedding = torch.nn.Embedding(20, 4)
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [1, 2, 3, 3]])
    data = TensorDataset(ids, (ids != 0).long(), torch.zeros(3, dtype=torch.long))
    scores = embedding_similarity(embedding, data, data)
    with torch.no_grad():
        pooled = torch.stack([embedding(row[row != 0]).mean(0) for row in ids])
    expected = torch.nn.functional.cosine_similarity(pooled[:, None], pooled[None], dim=-1)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(scores.diagonal(), torch.ones(3))


def test_label_agreement_is_plus_one_for_the_same_label_and_minus_one_elsewhere():
    scores = label_agreement(torch.tensor([0, 2, 1, 2]), torch.tensor([2, 0]))
    assert torch.equal(scores, torch.tensor([[-1.0, 1.0, -1.0, 1.0], [1.0, -1.0, -1.0, -1.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"`train_labels` and `test_labels` must be 1-d .* shapes \(2, 2\) and \(1,\)"):
        label_agreement(torch.zeros(2, 2), torch.zeros(1))


@pytest.mark.parametrize("model", ["cnn", "minilm"])
def test_case_deletion_benchmark_runs_quick_end_to_end(tmp_path, model):
    benchmark = load_benchmark("case_deletion")
    results = benchmark.main(["--quick", "--model", model, "--json", str(tmp_path / "r.json"),
                              "--plot", str(tmp_path / "r.png")])
    methods = list(benchmark.default_methods()) + [benchmark.SIMILARITY, "random"]
    effects = results["case_deletion"]["effects"]
    assert [e["method"] for e in effects if e["deleted"] == "proponents"] == methods
    assert set(results["mislabel_detection"]["methods"]) == {
        *benchmark.default_methods(), "loss (final model)", "random"}
    settings = json.loads((tmp_path / "r.json").read_text())["settings"]
    assert settings["quick"] is True and settings["model"] == model
    assert (tmp_path / "r.png").stat().st_size > 0


def test_one_registration_adds_a_method_to_both_protocols(monkeypatch):
    """`register_method` alone puts a method among case deletion's and evaluate.py's default methods."""
    from captum_tracin_we.compare import METHOD_BUILDERS, register_method, token_method

    case_deletion, evaluate = load_benchmark("case_deletion"), load_benchmark("evaluate")
    name = "TracInWE (TopK 3)"
    monkeypatch.setitem(METHOD_BUILDERS, name, None)  # removed again after the test
    register_method(name, lambda run: token_method(run, top_k_tokens=3))
    for protocol in (case_deletion, evaluate):
        methods = protocol.parse_args([]).methods
        assert methods[-1] == name and "TracInWE" in methods and "InfluenceWE (K-FAC)" in methods
        assert not set(methods) & set(case_deletion.NOT_COMPARED)


def test_case_deletion_benchmark_adds_methods_to_a_stored_run(tmp_path):
    """--add-to runs only the methods a stored run lacks and merges them: the same results as one run of
    them all (a retraining is deterministic), and refused where the stored run is not reproduced."""
    benchmark = load_benchmark("case_deletion")
    quick = ["--quick", "--methods"]
    all_three = ["TracInWE", "TracInWE (cosine)", "TracInCPFast"]
    cache = ["--cache", str(tmp_path / "cache")]
    whole = benchmark.main(quick + all_three + cache)
    folder, = (tmp_path / "cache").iterdir()  # one folder per setting of the retrainings
    assert json.loads((folder / "settings.json").read_text())["dataset"] == "mr"
    cached = list(folder.glob("*.npy"))
    retrains = whole["case_deletion"]["retrains"]
    assert len(cached) == retrains == whole["trainings_run"] and whole["trainings_read_from_cache"] == 0
    again = benchmark.main(quick + all_three + cache)  # from the cache
    assert again["case_deletion"] == whole["case_deletion"]
    assert again["trainings_run"] == 0 and again["trainings_read_from_cache"] == retrains
    assert sorted(os.stat(path).st_mtime_ns for path in cached) == sorted(
        path.stat().st_mtime_ns for path in folder.glob("*.npy"))  # none rewritten
    other = benchmark.main(quick + all_three + cache + ["--learning-rate", "2e-3"])  # other retrainings: not read
    assert other["trainings_run"] == other["case_deletion"]["retrains"] and len(list(folder.glob("*.npy"))) == retrains
    benchmark.main(quick + ["TracInWE", "TracInCPFast", "--json", str(tmp_path / "r.json")] + cache)
    added = benchmark.main(quick + all_three + ["--add-to", str(tmp_path / "r.json")] + cache)
    for key in ("case_deletion_table", "mislabel_detection", "held_out_accuracy"):
        assert added[key] == json.loads(json.dumps(whole[key])), key  # the stored part went through JSON
    assert [e["method"] for e in added["case_deletion"]["effects"]] == [
        e["method"] for e in whole["case_deletion"]["effects"]]
    assert added["case_deletion"]["retrains"] == retrains  # each deletion counted once
    assert added["median_cancellation_ratio"] == pytest.approx(whole["median_cancellation_ratio"], rel=1e-4)
    addition, = added["additions"]
    assert addition["methods"] == ["TracInWE (cosine)"] and addition["add_to"] == str(tmp_path / "r.json")
    assert added["settings"]["add_to"] is None and added["settings"]["methods"] == all_three
    # the check's retrainings (the full model and TracInWE's top 3 proponents and opponents of 2 test examples)
    # are run anew, the cosine's other deletions read from the cache
    assert 2 <= addition["trainings_run"] <= 5 and addition["trainings_read_from_cache"] >= 1
    # a run stored before the digests: its merged run has none, so a second addition counts from the stored counts
    saved = json.loads((tmp_path / "r.json").read_text())
    del saved["retraining_digests"]
    (tmp_path / "old.json").write_text(json.dumps(saved))
    older = benchmark.main(quick + all_three + ["--add-to", str(tmp_path / "old.json")] + cache)
    assert "retraining_digests" not in older
    assert older["case_deletion"]["retrains"] == saved["case_deletion"]["retrains"] + 4  # the cosine's 4 deletions
    with pytest.raises(SystemExit, match=r"already has every one of --methods \(it has TracInWE, TracInCPFast\); "
                                         r"name a method it lacks"):
        benchmark.main(quick + ["TracInWE", "--add-to", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match=r"its settings differ in top_k_tokens; pass the same options"):
        benchmark.main(quick + all_three + ["--top-k-tokens", "5", "--add-to", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    first = saved["case_deletion"]["effects"][0]  # TracInWE's, the method re-run as the check
    first["changes"][0][0] += 0.01  # far above float rounding
    (tmp_path / "r.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"^--add-to: the change of p\(label\) after deleting TracInWE's top 3 "
                                         r"proponents \(seed 0\) is .* here and .* in the stored run, so this run "
                                         r"does not reproduce it"):
        benchmark.main(quick + all_three + ["--add-to", str(tmp_path / "r.json")])
    saved["held_out_accuracy"] += 0.01  # refused before any retraining
    (tmp_path / "r.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"^--add-to: the held-out accuracy is .* here and .* in the stored run"):
        benchmark.main(quick + all_three + ["--add-to", str(tmp_path / "r.json")])


def test_adding_to_a_stored_run_checks_this_runs_retrainings_not_the_cache(tmp_path, monkeypatch):
    """A cache and a stored run that agree, but retrainings that no longer give their results (another code
    version): the check retrains anew, so it refuses; and a stored model that fails a check is refused before
    any of the new methods' retrainings."""
    benchmark = load_benchmark("case_deletion")
    quick, cache = ["--quick", "--methods", "TracInWE", "TracInCPFast"], ["--cache", str(tmp_path / "cache")]
    benchmark.main(quick + cache + ["--json", str(tmp_path / "r.json")])
    trained = benchmark.Setup.trained

    def other_retrainings(self, seed, dataset, kept=None, checkpoint_dir=None):
        return trained(self, seed + 100 * (kept is not None), dataset, kept, checkpoint_dir)

    with monkeypatch.context() as patch:
        patch.setattr(benchmark.Setup, "trained", other_retrainings)
        with pytest.raises(SystemExit, match=r"^--add-to: the change of p\(label\) after deleting TracInWE's top 3 "):
            benchmark.main(quick + ["TracInWE (cosine)"] + cache + ["--add-to", str(tmp_path / "r.json")])
    saved = json.loads((tmp_path / "r.json").read_text())
    saved["mislabel_detection"]["methods"]["loss (final model)"]["auc"] += 0.01
    (tmp_path / "r.json").write_text(json.dumps(saved))
    fresh = ["--cache", str(tmp_path / "fresh")]  # the check's own retrainings are not kept: it stays empty
    with pytest.raises(SystemExit, match=r"^--add-to: the mislabel detection by the loss is .* here and .* in the "
                                         r"stored run"):
        benchmark.main(quick + ["TracInWE (cosine)"] + fresh + ["--add-to", str(tmp_path / "r.json")])
    assert not list((tmp_path / "fresh").glob("*/*.npy"))  # no new method's deletion was retrained
    saved["mislabel_detection"]["methods"]["loss (final model)"]["auc"] -= 0.01
    saved["score_summary"]["embedding similarity"]["mean_abs"] *= 1.01
    (tmp_path / "r.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"^--add-to: embedding similarity's mean abs score is .* here and .* in "
                                         r"the stored run"):
        benchmark.main(quick + ["TracInWE (cosine)"] + ["--add-to", str(tmp_path / "r.json")])


def test_cancellation_benchmark_reports_a_ratio_per_method_and_training_run(tmp_path, capsys):
    benchmark = load_benchmark("cancellation")
    results = benchmark.main(["--quick", "--json", str(tmp_path / "c.json")])
    runs = results["runs"]
    assert [(r["layers"], r["seed"]) for r in runs] == [(1, 0), (1, 1)]
    for r in runs:
        assert list(r["median_ratio"]) == list(benchmark.METHODS)
        assert all(ratio >= 1 for ratio in r["median_ratio"].values())  # sum |I| >= |sum I|
    assert runs[0]["median_ratio"] != runs[1]["median_ratio"]  # another seed, another training run
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved["runs"] == runs
    assert saved["settings"]["epochs"] == 2 and saved["settings"]["learning_rate"] == 1e-4  # case_deletion's
    assert "median ratio is below TracInCP (last layer)'s in" in capsys.readouterr().out


def test_evaluate_benchmark_runs_quick_end_to_end(tmp_path):
    benchmark = load_benchmark("evaluate")
    results = benchmark.main(["--quick", "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "e.png"),
                              "--cache", str(tmp_path / "cache"), "--batch-size", "16"])  # 4 training batches
    methods = dict(results["methods"])
    astra = "InfluenceWE (ASTRA, 2 steps)"
    assert list(methods) == list(benchmark.case_deletion.default_methods()) + [benchmark.SIMILARITY, benchmark.SAME_LABEL, benchmark.RANDOM,
                                                       astra, "loss (final model)"]
    assert set(methods.pop("loss (final model)")) == {"mislabel_auc"}
    assert all(0 <= methods[name]["mislabel_auc"] <= 1 for name in list(benchmark.case_deletion.default_methods()) + [benchmark.RANDOM])
    # ASTRA scores the first --astra-test examples: its LDS sits beside every method's on the same ones
    astra_row = methods.pop(astra)
    assert set(astra_row) == {"seconds", "identical_class", "top_5_cardinality", "lds_astra_examples"}
    for name, r in methods.items():
        assert -1 <= r["lds"]["mean"] <= 1 and r["lds"]["ci_low"] <= r["lds"]["mean"] <= r["lds"]["ci_high"], name
        assert list(r["further_training"]) == ["2"] and 0 <= r["identical_class"] <= 1
        assert 0 < r["top_5_cardinality"] <= 1
        assert -1 <= r["lds_astra_examples"]["mean"] <= 1
    for name in (benchmark.RANDOM, benchmark.SAME_LABEL):  # they ignore the model
        assert methods[name]["randomization_correlation"] == pytest.approx(1.0)
    assert methods[benchmark.SAME_LABEL]["identical_class"] == 1.0
    assert len(list((tmp_path / "cache").glob("*/*.npy"))) == 4  # one cached retraining per subset
    assert json.loads((tmp_path / "e.json").read_text())["methods"].keys() == results["methods"].keys()
    assert (tmp_path / "e.png").stat().st_size > 0

    # stochastic ASTRA added to the stored run: its retrainings come from the cache, its LDS are reproduced
    added_run = benchmark.main(["--quick", "--add-astra-to", str(tmp_path / "e.json"), "--astra-batches", "1",
                                "--cache", str(tmp_path / "cache"), "--batch-size", "16"])
    added = added_run["methods"]
    # the stored settings with ASTRA's; what the addition ran with is apart
    assert added_run["settings"]["add_astra_to"] is None and added_run["settings"]["astra_batches"] == 1
    assert added_run["astra_addition"]["add_astra_to"] == str(tmp_path / "e.json")
    stochastic = "InfluenceWE (ASTRA, 2 steps, Gauss-Newton of 1 batch)"
    assert list(added) == list(results["methods"])[:-1] + [stochastic, "loss (final model)"]
    assert {name: r for name, r in added.items() if name != stochastic} == results["methods"]
    assert set(added[stochastic]) == set(astra_row)
    assert added[stochastic]["lds_astra_examples"] != astra_row["lds_astra_examples"]  # one batch of 4
    assert len(list((tmp_path / "cache").glob("*/*.npy"))) == 4
    saved = json.loads((tmp_path / "e.json").read_text())
    # cached retrainings that this run's do not give (shifted alike: every LDS, a rank statistic, is the same)
    for path in (tmp_path / "cache").glob("*/*.npy"):
        numpy.save(path, numpy.load(path) + 1.0)
    with pytest.raises(SystemExit, match=r"^--add-astra-to: the first subset's retraining gives other label margins "
                                         r"here \(.*\) than in --cache .*, so this run does not reproduce the stored "
                                         r"retrainings"):
        benchmark.main(["--quick", "--add-astra-to", str(tmp_path / "e.json"), "--cache", str(tmp_path / "cache"),
                        "--batch-size", "16"])
    saved["methods"]["TracInWE"]["lds"]["mean"] += 0.01
    (tmp_path / "e.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match=r"^--add-astra-to: TracInWE's LDS is .* here and .* in the stored run, so "
                                         r"this run does not reproduce"):
        benchmark.main(["--quick", "--add-astra-to", str(tmp_path / "e.json"), "--cache", str(tmp_path / "cache"),
                        "--batch-size", "16"])
    with pytest.raises(SystemExit, match=r"its settings differ in subsets; pass the same options"):
        benchmark.main(["--quick", "--subsets", "5", "--batch-size", "16", "--add-astra-to", str(tmp_path / "e.json")])


def test_evaluate_benchmark_proxies_are_judged_by_the_targets_lds(tmp_path):
    benchmark = load_benchmark("evaluate")
    argv = ["--quick", "--model", "minilm", "--astra-test", "0", "--proxy-layers", "1", "--proxy-pretrained",
            "--proxy-methods", "TracInWE", "TracInCP (last layer)"]
    # --quick keeps 1 MiniLM layer: a 1-layer proxy, trained from the same seed on the same data, is the
    # target itself, so its scores equal the target's; the pretrained model's do not
    args = benchmark.parse_args(argv)
    setup = benchmark.case_deletion.Setup(args, args.train)
    model, checkpoints = setup.trained(0, setup.train, checkpoint_dir=str(tmp_path))
    target, _ = benchmark.scores_of(setup, model, checkpoints, args.proxy_methods)
    proxies, seconds = benchmark.proxy_scores(setup, str(tmp_path))
    assert list(proxies) == list(seconds) == [f"{name} [proxy: {label}]" for label in ("1 layer", "pretrained")
                                              for name in args.proxy_methods]
    for name in args.proxy_methods:
        assert torch.equal(proxies[f"{name} [proxy: 1 layer]"], target[name])
        assert not torch.allclose(proxies[f"{name} [proxy: pretrained]"], target[name])
    methods = benchmark.main(argv)["methods"]  # end to end: the proxies' rows, judged by the target's LDS
    assert not any("ASTRA" in name for name in methods)  # --astra-test 0
    for name in proxies:
        assert set(methods[name]) == {"lds", "further_training", "identical_class", "top_5_cardinality", "seconds"}
    assert methods["TracInWE [proxy: 1 layer]"]["lds"] == methods["TracInWE"]["lds"]
    with pytest.raises(SystemExit, match="--proxy-layers and --proxy-pretrained need --model minilm"):
        benchmark.parse_args(["--quick", "--proxy-pretrained"])
