"""The notebooks: committed without outputs, opened in Colab by their badge, and run top to bottom.

Each notebook runs in a fresh ``python3`` kernel (ipykernel's, on this interpreter) in a temporary
directory, on the CPU, as a Colab CPU runtime would run it; any error fails the test with the cell
that raised it. About a minute each on a 2-core machine.
"""

import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_retention_three_forms", "02_train_and_generate", "03_sharding_and_scale"]
KERNEL = "python3"
CELL_TIMEOUT_S = 300
COLAB_URL = "https://colab.research.google.com/github/retnet-jax/retnet-jax/blob/main/notebooks/"
INSTALL = '"retnet-jax @ git+https://github.com/retnet-jax/retnet-jax"'
# The kernel's XLA flags. No fake devices: one CPU device as in Colab (03 asks for 8 itself). The
# notebooks' programs are bigger than the unit tests', so they keep optimization level 1 (level 0
# doubles the training and decoding time) and skip the fusion emitters (which slow compiles down).
KERNEL_XLA_FLAGS = "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false"
# Smaller values of a notebook's parameters (its first cell that sets them), set by a cell the test runs
# after it: every cell still runs, on fewer steps, shorter sequences and fewer points.
TEST_PARAMETERS = {
    "01_retention_three_forms": {"LENGTHS": [128, 256], "REPEATS": 1},
    "02_train_and_generate": {"STEPS": 12, "SEQ_LEN": 32, "BATCH": 4, "CONTEXTS": [32], "BLOCK": 8},
}


def _read(path: Path):
    return nbformat.read(path, as_version=nbformat.NO_CONVERT)


def test_the_notebooks_are_all_here():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    notebook = _read(path)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{path.name}: cell {index} holds outputs; commit notebooks cleared "
                f"(jupyter nbconvert --clear-output --inplace {path.relative_to(NOTEBOOK_DIR.parent)})."
            )
    assert "widgets" not in notebook.metadata, f"{path.name}: drop the saved widget state from its metadata."


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_opens_in_colab_and_installs_the_package(path):
    cells = _read(path).cells
    assert cells[0].cell_type == "markdown" and f"]({COLAB_URL}{path.name})" in cells[0].source, (
        f"{path.name}: the first cell must be the Open-in-Colab badge linking to {COLAB_URL}{path.name}."
    )
    install = next(cell for cell in cells if cell.cell_type == "code")
    assert 'find_spec("retnet_jax")' in install.source and INSTALL in install.source, (
        f"{path.name}: the first code cell must install {INSTALL} when retnet_jax is not importable."
    )


@pytest.fixture(scope="module")
def kernel_name():
    """The kernel must run this interpreter, which has retnet_jax installed."""
    argv = KernelSpecManager().get_kernel_spec(KERNEL).argv
    # jupyter_client starts a spec's "python" / "python3" as sys.executable (ipykernel's own spec).
    same = argv[0] in ("python", "python3") or Path(argv[0]).resolve() == Path(sys.executable).resolve()
    assert same, (
        f"The '{KERNEL}' kernel runs {argv[0]}, not this interpreter ({sys.executable}). Install this "
        f"environment's kernel: {sys.executable} -m ipykernel install --sys-prefix"
    )
    return KERNEL


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom(path, tmp_path, monkeypatch, kernel_name):
    monkeypatch.setenv("XLA_FLAGS", KERNEL_XLA_FLAGS)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebooks' temporary workdirs
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws the plots
    notebook = _read(path)
    _set_parameters(notebook, TEST_PARAMETERS.get(path.stem, {}))
    client = NotebookClient(
        notebook,
        kernel_name=kernel_name,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    print(f"{path.name} ran in {time.perf_counter() - start:.0f}s")

    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code" and "plt.show()" in cell.source:
            assert any("image/png" in output.get("data", {}) for output in cell.outputs), (
                f"{path.name}: cell {index} shows a plot but no image came out; did something switch "
                f"matplotlib's backend away from the inline one?"
            )


def _set_parameters(notebook, values):
    """A cell setting ``values`` right after the first code cell that assigns all of their names."""
    if not values:
        return
    for index, cell in enumerate(notebook.cells):
        assigned = {line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line}
        if cell.cell_type == "code" and set(values) <= assigned:
            source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
            notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
            return
    raise AssertionError(f"no cell of the notebook assigns {sorted(values)}")
