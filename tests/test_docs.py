"""The code blocks of the README and of docs/ run as written.

Every fenced ``python`` block of a page runs, in page order, in one fresh interpreter per page
(a later block may use an earlier one's names), in a temporary working directory. A block
fenced as ``python notest`` is shown but not run (say why next to it).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)


def blocks(page: Path) -> list[str]:
    return [code for info, code in FENCE.findall(page.read_text()) if "notest" not in info.split()]


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(page, tmp_path):
    code = "\n".join(blocks(page))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=None)
    assert proc.returncode == 0, f"{page.name}:\n{proc.stderr[-3000:]}"


def test_readme_tables_are_the_generated_ones():
    """The README's methods and results tables are what docs/readme_tables.py makes of the
    registry and the committed results (rerun it after either changes)."""
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "readme_tables.py"), "--check"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
