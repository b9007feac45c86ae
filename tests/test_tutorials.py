"""The tutorial notebooks run top to bottom, in a small setting, and show their outputs."""

import pathlib
import tempfile

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = pathlib.Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))

# A code cell tagged with one of these must display an output of that MIME type.
EXPECTED_OUTPUTS = {
    "expect-html": "text/html",
    "expect-image": "image/png",
    "expect-markdown": "text/markdown",
}


def code_cells(notebook):
    return [(i, cell) for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"]


def displayed_types(cell):
    return {
        mime
        for output in cell.outputs
        if output.output_type in ("display_data", "execute_result")
        for mime in output.data
    }


def output_text(output):
    r"""The text of an output (streams and text/* data; not images)."""
    texts = [output.get("text", "")]
    for mime, value in output.get("data", {}).items():
        if mime.startswith("text/"):
            texts.append(value if isinstance(value, str) else "".join(value))
    return "".join(texts)


def test_the_tutorials_are_found():
    names = [path.name for path in NOTEBOOKS]
    assert len(NOTEBOOKS) >= 3, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_notebook_runs_in_the_small_setting_and_shows_its_outputs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACIN_WE_TUTORIAL_SMALL", "1")  # the kernel inherits os.environ
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's checkpoints go here
    # PyTorch's OpenMP threads would otherwise busy-wait, which is many times
    # slower when another process shares the CPU cores.
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    notebook = nbformat.read(path, as_version=4)
    for _, cell in code_cells(notebook):
        cell.outputs = []  # the committed outputs must not count
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError if a cell fails

    for index, cell in code_cells(notebook):
        where = f"{path.name}, cell {index} ({cell.get('id')})"
        assert cell.outputs, f"{where} shows no output"
        assert not [o for o in cell.outputs if o.output_type == "error"], where
        shown = displayed_types(cell)
        for tag in cell.metadata.get("tags", []):
            if tag in EXPECTED_OUTPUTS:
                assert EXPECTED_OUTPUTS[tag] in shown, f"{where} shows no {EXPECTED_OUTPUTS[tag]}"
    settings = "".join(o.get("text", "") for o in code_cells(notebook)[0][1].outputs)
    assert settings.startswith("small setting"), settings
    assert not list(tmp_path.glob("tracin-we-*")), "the notebook left its checkpoints behind"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.name for path in NOTEBOOKS])
def test_committed_notebook_shows_full_setting_outputs(path):
    r"""Re-run `python tutorials/execute.py` after editing a notebook."""
    notebook = nbformat.read(path, as_version=4)
    cells = code_cells(notebook)
    assert all(cell.outputs for _, cell in cells), f"{path.name} was saved without outputs"
    assert "full setting" in "".join(o.get("text", "") for o in cells[0][1].outputs)
    for index, cell in cells:
        for output in cell.outputs:
            assert output.output_type != "error", f"{path.name}, cell {index}"
            assert tempfile.gettempdir() + "/" not in output_text(output), (
                f"{path.name}, cell {index}: an output shows a temporary path"
            )
