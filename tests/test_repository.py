"""Repository hygiene: no machine-specific paths in sources, tests, docs or benchmarks (shared data is
``../shared/...`` relative to the repository root)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MACHINE_PATH = re.compile(r"/(work|tmp|home|root)/[A-Za-z]")
TEXT = {".py", ".md", ".toml", ".txt", ".cfg", ".ini", ".yml", ".yaml", ".json", ".sh", ""}


def _files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
        return [ROOT / p for p in out.stdout.splitlines()]
    except (OSError, subprocess.SubprocessError):  # not a git checkout: walk the usual folders
        return [p for d in ("src", "tests", "docs", "bench", "examples", "scripts", ".ci") for p in (ROOT / d).rglob("*")
                if ".venv" not in p.parts and "__pycache__" not in p.parts] + [ROOT / "README.md"]


def test_no_machine_paths_anywhere():
    hits = []
    for p in _files():
        if not p.is_file() or p.suffix not in TEXT or p.stat().st_size > 2_000_000:
            continue
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{i}: {line.strip()[:120]}")
    assert not hits, "machine paths (use ../shared/... or a path relative to the repository):\n" + "\n".join(hits)
