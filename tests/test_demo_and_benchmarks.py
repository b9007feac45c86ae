"""The demo, the benchmark script and the README's commands keep working."""

import html
import importlib.util
import json
import math
import os
import pathlib
import re
import runpy
import sys

import pytest
from conftest import load_benchmark

from captum_tracin_we import compare, demo, toy
from captum_tracin_we.__main__ import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_toy_prints_proponents_and_opponents_with_shared_words(capsys):
    explanations = toy.run(epochs=6, k=2)
    out = capsys.readouterr().out
    assert len(explanations) == len(toy.TEST_SENTENCES)
    assert out.count("Proponents by TracInWE:") == out.count("Opponents by TracInWE:") == len(toy.TEST_SENTENCES)
    for explanation in explanations:
        proponent_scores = [view.influence for view in explanation.proponents]
        opponent_scores = [view.influence for view in explanation.opponents]
        assert proponent_scores == sorted(proponent_scores, reverse=True)
        assert opponent_scores == sorted(opponent_scores)
        assert f'"{explanation.test.text}"' in out
    assert "shared words:" in out


def test_command_line_dispatch(capsys):
    main(["toy", "--epochs", "3", "-k", "1"])
    assert "Test example 0" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["nonsense"])
    assert exit_info.value.code == 2


def test_demo_runs_end_to_end_in_a_tiny_setting(tmp_path, capsys):
    config = demo.DemoConfig(
        train_size=24, test_size=2, eval_size=8, epochs=1, layers=1, max_length=16,
        batch_size=8, checkpoints=2, k=2, top_k_tokens=4, output=str(tmp_path),
    )
    result = demo.run(config, color=False)
    out = capsys.readouterr().out
    names = sorted(os.path.basename(path) for path in result.files)
    assert names == sorted([
        "report.html", "explanation-0.png", "explanation-1.png",
        "comparison-0.png", "comparison-1.png", "comparison.md",
    ])
    for path in result.files:
        assert os.path.getsize(path) > 0
    assert sorted(os.listdir(tmp_path / "checkpoints")) == [
        "checkpoint-000002.pt", "checkpoint-000003.pt",
    ]
    report = (tmp_path / "report.html").read_text()
    assert set(result.comparison.methods) == set(compare.DEFAULT_METHODS)
    for explanation in result.explanations:
        assert len(explanation.proponents) == len(explanation.opponents) == 2
        assert html.escape(explanation.test.words[0].text) in report
        assert explanation.test.text in out
    assert 0.0 <= result.accuracy <= 1.0
    assert str(tmp_path) in out


def test_demo_options_are_checked():
    assert demo.parse_args(["--dataset", "bbc", "--train-size", "50"]) == demo.DemoConfig(
        dataset="bbc", train_size=50
    )
    with pytest.raises(SystemExit):
        demo.parse_args(["--layers", "7"])
    with pytest.raises(ValueError, match=r"`test_size` must be at most `eval_size`"):
        demo.run(demo.DemoConfig(test_size=5, eval_size=4))


def test_speed_benchmark_runs_in_a_tiny_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [
        "speed.py", "--vocab", "60", "--hidden", "16", "--train", "6", "--test", "2",
        "--seq-len", "8", "--batch-size", "3", "--repeats", "1", "--sweep", "2",
        "--json", str(tmp_path / "speed.json"),
    ])
    runpy.run_path(str(ROOT / "benchmarks" / "speed.py"), run_name="__main__")
    results = (tmp_path / "speed.json").read_text()
    difference = float(re.search(r'"max_relative_difference_to_TracInCP": ([^,\n]+)', results).group(1))
    assert difference < 1e-4  # float32: TracInWE and TracInCP compute the same scores


def test_index_benchmark_runs_in_a_tiny_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", [
        "index.py", "--vocab", "60", "--hidden", "16", "--train", "6", "--test", "2",
        "--seq-len", "8", "--batch-size", "3", "--repeats", "1",
        "--json", str(tmp_path / "index.json"),
    ])
    runpy.run_path(str(ROOT / "benchmarks" / "index.py"), run_name="__main__")
    results = json.loads((tmp_path / "index.json").read_text())
    assert results["index_max_abs_difference_over_max_score"] < 1e-6  # exact index
    assert results["small_size_reduction"] > 1


def test_index_build_benchmark_runs_in_a_tiny_setting(tmp_path):
    index_build = load_benchmark("index_build")
    results = index_build.main([
        "--vocab", "60", "--seq-len", "8", "--chunks", "3", "6", "--chunk-examples", "2", "--repeats", "1",
        "--json", str(tmp_path / "build.json"),
    ])
    rows = results["by_chunks"]
    assert [row["chunks"] for row in rows] == [3, 6]
    assert rows[0]["per_chunk_vs_fewest"] == 1.0
    for row in rows:  # the ratios are those of the times measured
        assert row["seconds_per_chunk"] == pytest.approx(row["build_seconds"] / row["chunks"])
        assert row["build_vs_floor"] == pytest.approx(row["build_seconds"] / row["floor_seconds"])
    assert json.loads((tmp_path / "build.json").read_text()) == results


def test_methods_benchmark_runs_every_method_in_a_tiny_setting(tmp_path):
    """Each method in its own process, as in the full run (about 5 s each here)."""
    methods = load_benchmark("methods")
    results = methods.main([
        "--sizes", "16", "--vocab", "60", "--train", "6", "--test", "2", "--seq-len", "8",
        "--batch-size", "3", "--projection-dim", "4", "--json", str(tmp_path / "m.json"),
        "--plot", str(tmp_path / "m.png"),
    ])
    summary = json.loads((tmp_path / "m.json").read_text())["by_size"]["16"]
    assert list(summary["methods"]) == list(methods.METHODS)
    assert all(r["seconds"] > 0 for r in summary["methods"].values())
    assert summary["max_relative_difference_to_dense_TracInCP"] < 1e-4  # the same scores
    indexed = summary["methods"][methods.INDEXED]
    assert indexed["index_row_bytes_per_example"] == indexed["index_bound_bytes_per_example"]
    ekfac, tracin = summary["methods"][methods.EKFAC], summary["methods"][methods.EXACT]
    assert ekfac["fit_x_tracin"] == pytest.approx(ekfac["fit_seconds"] / tracin["seconds"])
    assert ekfac["seconds"] == pytest.approx(ekfac["fit_seconds"] + ekfac["query_seconds"])
    assert ekfac["factor_bytes"] > summary["methods"][methods.KFAC]["factor_bytes"] > 0  # K-FAC has no table
    astra = summary["methods"][methods.ASTRA]  # differences of timed runs: noise can make them negative here
    assert math.isfinite(astra["seconds_per_test_example_and_step"]) and math.isfinite(astra["step_estimate_seconds"])
    assert astra["astra_steps"] == 2 and astra["astra_test"] == 1
    assert (tmp_path / "m.png").stat().st_size > 0
    assert results["by_size"]["16"] == summary


def test_scaling_benchmark_stops_the_dense_method_and_plots(tmp_path, monkeypatch):
    scaling = load_benchmark("scaling")
    # in this process: the subprocess path is exercised by the methods benchmark's test
    monkeypatch.setattr(scaling, "in_subprocess", lambda function, **kwargs: function(**kwargs))
    results = scaling.main([
        "--vocab", "60", "--hidden", "16", "--train-sizes", "6", "12", "--seq-lens", "8",
        "--seq-train", "6", "--test", "2", "--batch-size", "3", "--dense-max", "6",
        "--json", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"),
    ])
    small, large = results["by_train_size"]
    assert scaling.DENSE in small["methods"] and scaling.DENSE not in large["methods"]
    assert set(large["methods"]) == set(scaling.METHODS) - {scaling.DENSE}
    assert [p["seq_len"] for p in results["by_seq_len"]] == [8]
    assert (tmp_path / "s.png").stat().st_size > 0


def test_queries_benchmark_runs_quick(tmp_path, monkeypatch, capsys):
    queries = load_benchmark("queries")
    policies = []

    def in_this_process(function, passive_threads=True, huge_pages=False, **kwargs):
        policies.append((passive_threads, huge_pages))
        return function(**kwargs)

    monkeypatch.setattr(queries, "in_subprocess", in_this_process)
    results = queries.main(["--quick", "--gather-max", "50", "--json", str(tmp_path / "q.json")])
    # the threads' default wait policy, unless --passive-threads; huge pages only with --huge-pages
    assert policies == [(False, False)] * 2
    small, large = results["points"]
    assert (small["test"], small["train"], large["test"], large["train"]) == (2, 12, 6, 20)
    assert small["join_max_relative_difference"] < 1e-5  # GEMM join = gather join
    assert "join_gather_seconds" not in large  # 6 x 20 pairs > --gather-max
    for point in results["points"]:
        assert point["top_k_equals_stable_sort"]
        assert point["pairs"] > 0 and point["flops"] == 2 * 16 * point["pairs"]
        assert point["query_seconds"] > 0 and point["build_seconds"] > 0 and point["query_batched_seconds"] > 0
        # the test set in batches of 4 (6 tests: two batches) scores as the one batch does
        assert point["batched_max_relative_difference"] < 1e-5
    out = capsys.readouterr().out
    assert "| 2 x 12 |" in out and "query, batches of 4, s" in out
    assert json.loads((tmp_path / "q.json").read_text()) == results


def test_in_subprocess_sets_the_environment_it_is_asked_for(tmp_path):
    common = load_benchmark("common")
    script = tmp_path / "environment.py"
    script.write_text("import os\n\n\ndef environment():\n"
                      "    return {k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'THP_MEM_ALLOC_ENABLE')}\n")
    spec = importlib.util.spec_from_file_location("environment", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert common.in_subprocess(module.environment, huge_pages=True) == {
        "OMP_WAIT_POLICY": "PASSIVE", "THP_MEM_ALLOC_ENABLE": "1"}
    assert common.in_subprocess(module.environment, passive_threads=False)["THP_MEM_ALLOC_ENABLE"] == \
        os.environ.get("THP_MEM_ALLOC_ENABLE")


def test_padding_benchmark_runs_quick(tmp_path, capsys):
    padding = load_benchmark("padding")
    results = padding.main(["--quick", "--json", str(tmp_path / "p.json")])
    assert list(results["methods"]) == ["floor", "TracInWE", "TracInCPFast"]
    assert results["padded_length"] > results["mean_length"] > 0
    for method, r in results["methods"].items():
        assert r["speedup"] == pytest.approx(r["longest"]["seconds"] / r["batch"]["seconds"])
        if method != "floor":
            assert r["max_relative_difference"] < 1e-5  # MiniLM masks padding: the same scores
    assert "| TracInWE |" in capsys.readouterr().out
    assert json.loads((tmp_path / "p.json").read_text()) == results


def test_sharded_benchmark_runs_quick_under_torchrun(tmp_path, capsys):
    """The script starts itself under torchrun (2 gloo processes) and compares with one process."""
    sharded = load_benchmark("sharded")
    results = sharded.main(["--quick", "--json", str(tmp_path / "s.json")])
    assert results["top_k_equal"] and results["max_relative_difference"] < 1e-5
    assert results["build_speedup"] == pytest.approx(
        results["single"]["build_seconds"] / results["sharded"]["build_seconds"])
    assert "Build speed-up" in capsys.readouterr().out


def test_gpu_benchmark_runs_quick_on_the_cpu(tmp_path, capsys):
    gpu = load_benchmark("gpu")
    results = gpu.main(["--quick", "--device", "cpu", "--json", str(tmp_path / "g.json")])
    assert list(results["methods"]) == [gpu.FLOOR, gpu.EXACT, gpu.BUILD, gpu.INDEXED, gpu.DENSE, gpu.FAST]
    assert results["max_relative_difference_to_dense"] < 1e-4  # the same scores as the dense oracle
    assert results["index_max_relative_difference"] < 1e-6
    for r in results["methods"].values():
        assert r["x_floor"] == pytest.approx(r["seconds"] / results["methods"][gpu.FLOOR]["seconds"])
        assert r["peak_device_bytes"] is None  # no device memory on the CPU
    assert "faster than the dense TracInCP" in capsys.readouterr().out


def test_large_index_benchmark_runs_quick(tmp_path, monkeypatch, capsys):
    large = load_benchmark("large_index")
    policies = []

    def in_this_process(function, passive_threads=True, **kwargs):
        policies.append((function.__name__, passive_threads))
        return function(**kwargs)

    monkeypatch.setattr(large, "in_subprocess", in_this_process)
    results = large.main(["--quick", "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "l.json"),
                          "--plot", str(tmp_path / "l.png")])
    # queries under the threads' default wait policy, as users run them
    assert {passive for name, passive in policies if name == "query_point"} == {False}
    assert [p["train"] for p in results["by_train"]] == [200, 400]
    assert [p["test"] for p in results["by_test"]] == [2, 4]
    largest = results["by_train"][-1]
    assert largest["read_seconds"] > 0 and largest["query_seconds"] > 0 and largest["index_bytes"] > 0
    assert all(p["build_seconds"] > 0 for p in results["by_train"])  # built once each
    assert (tmp_path / "l.png").stat().st_size > 0
    assert "reading the shared tokens' stored rows once" in capsys.readouterr().out


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert len(commands) == 2, "the quick start has exactly two commands"
    assert "python -m captum_tracin_we demo" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("model", ["cnn", "minilm"])
def test_the_readme_shows_the_stored_evaluation_tables(model):
    """The README's LDS tables are evaluate_table.py's output for the stored runs, cell for cell."""
    runs = [str(ROOT / "benchmarks" / "results" / f"evaluate_{dataset}_{model}.json") for dataset in ("mr", "bbc")]
    lines = load_benchmark("evaluate_table").main(runs)
    readme = (ROOT / "README.md").read_text()
    assert "\n".join(lines) in readme
    assert lines[0].endswith("| mislabel AUC MR / BBC | seconds MR / BBC |") and len(lines) > 10
