"""The Python examples of the README and of the documentation run as written (doctests, in a temporary folder)."""

import doctest
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.slow
def test_the_documented_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    attempted = 0
    for page in PAGES:
        result = doctest.testfile(str(page), module_relative=False, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        assert result.failed == 0, f"{page.name}: {result.failed} example(s) failed"
        attempted += result.attempted
    assert attempted >= 6, "the documentation lost its doctest examples"
