r"""
Re-executes the tutorial notebooks in place, in the full setting, so that the
committed notebooks show real outputs.

    python tutorials/execute.py                                   # every notebook
    python tutorials/execute.py tutorials/01_quick_start.ipynb    # some of them

Each notebook runs top to bottom in a fresh `python3` kernel (nbclient), from a
temporary working folder, without `TRACIN_WE_TUTORIAL_SMALL` (which the test
suite sets to shrink them), and is saved over its source file. The run time of
each is printed. Outputs that mention the temporary folder or the home folder
are reported, since they should not be committed.
"""

import argparse
import os
import pathlib
import sys
import tempfile
import time
from typing import List, Optional, Sequence

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent


def execute(path: pathlib.Path, timeout: int) -> float:
    r"""Runs the notebook at `path` and saves it with its outputs; returns the seconds taken."""
    notebook = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory(prefix="tracin-we-tutorial-") as workdir:
        client = NotebookClient(
            notebook,
            timeout=timeout,
            kernel_name="python3",
            record_timing=False,  # no timestamps in the saved cells, so diffs stay small
            resources={"metadata": {"path": workdir}},
        )
        start = time.perf_counter()
        client.execute()
        seconds = time.perf_counter() - start
    nbformat.write(notebook, path)
    return seconds


def output_text(output: dict) -> str:
    r"""The text of an output: streams, errors and text/* data (not images)."""
    texts = [output.get("text", ""), "\n".join(output.get("traceback", []))]
    for mime, value in output.get("data", {}).items():
        if mime.startswith("text/"):
            texts.append(value if isinstance(value, str) else "".join(value))
    return "".join(texts)


def private_paths(path: pathlib.Path) -> List[str]:
    r"""The code cells of a saved notebook whose outputs mention the temp or home folder."""
    notebook = nbformat.read(path, as_version=4)
    needles = {tempfile.gettempdir(), os.path.expanduser("~")} - {"", "/"}
    found = []
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            continue
        text = "".join(output_text(output) for output in cell.outputs)
        for needle in sorted(needles):
            if needle in text:
                found.append(f"cell {index} mentions {needle}")
    return found


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("notebooks", nargs="*", type=pathlib.Path,
                        help="notebooks to run (default: every tutorials/*.ipynb)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds allowed per cell")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(HERE.glob("*.ipynb"))

    os.environ.pop("TRACIN_WE_TUTORIAL_SMALL", None)  # the full setting
    # PyTorch's OpenMP threads busy-wait by default, which makes a run many times
    # slower when another process shares the CPU cores; waiting passively costs
    # nothing measurable otherwise. The kernels inherit this environment.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    problems = 0
    for path in paths:
        print(f"Running {path.name} ...", flush=True)
        seconds = execute(path, args.timeout)
        print(f"  done in {seconds:.0f} s, saved with its outputs", flush=True)
        for finding in private_paths(path):
            problems += 1
            print(f"  warning: {finding}; do not commit this output", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
