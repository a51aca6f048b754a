"""scripts/check_layers.py: the package's import layering holds, and a break of it fails the check
with the offending import's file:line."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_layers.py"


def check(root: Path | None = None) -> subprocess.CompletedProcess:
    args = [sys.executable, str(SCRIPT)] + ([str(root)] if root else [])
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / "densessl" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


TINY = {
    "__init__.py": "from densessl.workflows.run import run\n",
    "errors.py": "class Error(Exception):\n    pass\n",
    "data/__init__.py": "",
    "data/loader.py": "from densessl.errors import Error\n",
    "pairs/__init__.py": "from densessl.pairs.builder import build\n",
    "pairs/builder.py": "from densessl.data import loader\n\n\ndef build():\n    return loader\n",
    "eval/__init__.py": "",
    "eval/metrics.py": "from ..pairs.builder import build\n",
    "workflows/__init__.py": "",
    "workflows/run.py": "from densessl.eval import metrics\n\n\ndef run():\n    return metrics\n",
    "cli.py": "import densessl\n",
}


def test_the_repository_passes():
    result = check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no cycles, no upward imports" in result.stdout


def test_a_tiny_package_that_follows_the_rule_passes(tmp_path):
    write(tmp_path, TINY)
    result = check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_upward_import_fails_with_its_file_and_line(tmp_path):
    write(tmp_path, TINY | {
        "data/loader.py": "from densessl.errors import Error\n\n\ndef lazy():\n"
                          "    from densessl.eval.metrics import build  # upward, lazy\n",
        "pairs/builder.py": "from ..workflows import run\n",  # upward, relative
    })
    result = check(tmp_path)
    assert result.returncode == 1
    assert ("densessl/data/loader.py:5: upward import: densessl.data.loader (data) imports "
            "densessl.eval.metrics (eval, above it)") in result.stdout
    assert ("densessl/pairs/builder.py:1: upward import: densessl.pairs.builder (pairs) imports "
            "densessl.workflows.run (workflows, above it)") in result.stdout
    assert result.stdout.count("upward import") == 2  # (the two also close cycles, listed too)


def test_a_cycle_fails_even_through_a_lazy_import(tmp_path):
    write(tmp_path, TINY | {
        "data/cache.py": "def get():\n    from densessl.data.loader import Error\n",
        "data/loader.py": "from densessl.data.cache import get\n"
                          "from densessl.errors import Error\n",
    })
    result = check(tmp_path)
    assert result.returncode == 1
    assert "densessl/data/cache.py:2: import cycle" in result.stdout
    assert "densessl/data/loader.py:1: import cycle" in result.stdout


def test_a_module_in_no_layer_fails(tmp_path):
    write(tmp_path, TINY | {"plugins/__init__.py": ""})
    result = check(tmp_path)
    assert result.returncode == 1
    assert "densessl.plugins is in no layer" in result.stdout


def test_the_package_root_imported_from_a_workflow_fails(tmp_path):
    """The upward import the check found first: workflows/export.py read ``densessl.__version__``
    from the package root, which imports the workflows (now densessl/version.py)."""
    shutil.copytree(ROOT / "densessl", tmp_path / "densessl",
                    ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    export = tmp_path / "densessl" / "workflows" / "export.py"
    lines = export.read_text().splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("from densessl."))
    lines.insert(at, "import densessl\n")
    export.write_text("".join(lines))
    result = check(tmp_path)
    assert result.returncode == 1
    assert (f"densessl/workflows/export.py:{at + 1}: upward import: densessl.workflows.export "
            "(workflows) imports densessl (api, above it)") in result.stdout
