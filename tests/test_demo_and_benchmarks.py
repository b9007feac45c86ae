"""The demo, the benchmark script and the README's commands keep working."""

import pathlib
import re
import runpy
import sys

import pytest

from captum_tracin_we import demo
from captum_tracin_we.__main__ import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_prints_proponents_and_opponents_with_shared_words(capsys):
    results = demo.run(epochs=6, k=2)
    out = capsys.readouterr().out
    assert out.count("Top proponents:") == len(demo.TEST_SENTENCES)
    assert out.count("Top opponents:") == len(demo.TEST_SENTENCES)
    (proponents, _), (opponents, _) = results
    assert (proponents.influence_scores[:, 0] >= proponents.influence_scores[:, 1]).all()
    assert (opponents.influence_scores[:, 0] <= opponents.influence_scores[:, 1]).all()
    assert "shared words:" in out


def test_command_line_dispatch(capsys):
    main(["demo", "--epochs", "3", "-k", "1"])
    assert "Test sentence:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["nonsense"])
    assert exit_info.value.code == 2


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


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert len(commands) == 2, "the quick start has exactly two commands"
    assert "python -m captum_tracin_we demo" in commands[0]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
