"""The code's shape: imports run one way (the layers contract in .importlinter) and every function of the
package stays short enough to read on one screen."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60


def test_imports_follow_the_layers() -> None:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    proc = subprocess.run([lint, str(REPO / ".importlinter"), "--no-cache", "--no-logo"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def _functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


@pytest.mark.parametrize("path", sorted((REPO / "dcama").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_functions_fit_on_a_screen(path: Path) -> None:
    long = [f"{f.name} (line {f.lineno}): {f.end_lineno - f.lineno + 1} lines" for f in _functions(path)
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{path.relative_to(REPO)}: split {', '.join(long)}"


MAX_LINE = 120
PYTHON_FILES = sorted(p for folder in ("bench", "dcama", "eval", "kernels", "tests", "train")
                      for p in (REPO / folder).rglob("*.py"))


def test_lines_fit_the_style_width() -> None:
    long = [f"{p.relative_to(REPO)}:{n}" for p in PYTHON_FILES
            for n, line in enumerate(p.read_text().splitlines(), 1) if len(line) > MAX_LINE]
    assert not long, f"lines over {MAX_LINE} characters: {', '.join(long)}"
