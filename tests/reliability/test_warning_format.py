"""The CLI prints densessl's own warnings as one line, and leaves other libraries' alone."""

import warnings
from pathlib import Path

import densessl
from densessl import cli


def test_own_warning_is_one_line_without_source():
    inside = str(Path(densessl.__file__).parent / "workflows" / "export.py")
    text = cli._one_line_warning("export: no encoder.json next to e.pt", UserWarning, inside, 12)
    assert text == "warning: export: no encoder.json next to e.pt\n"


def test_foreign_warning_keeps_its_location(tmp_path):
    other = str(tmp_path / "somelib.py")
    text = cli._one_line_warning("deprecated", UserWarning, other, 7, line="x = 1")
    assert text == warnings.formatwarning("deprecated", UserWarning, other, 7, line="x = 1")
    assert "somelib.py:7" in text
