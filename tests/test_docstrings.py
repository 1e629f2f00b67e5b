"""Every module and class docstring of the package fits on a screen (at most 30 lines): detail goes to the
function it describes."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "recbole_llm"
MAX_LINES = 30


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_and_class_docstrings_fit_on_a_screen(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    long = [f"{getattr(node, 'name', 'module')} ({len(doc.splitlines())} lines)"
            for node in [tree, *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef))]
            if (doc := ast.get_docstring(node, clean=False)) and len(doc.splitlines()) > MAX_LINES]
    assert not long, f"{path.name}: docstrings longer than {MAX_LINES} lines: {', '.join(long)}"
