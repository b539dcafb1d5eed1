"""The code base stays `ruff check` and `ruff format` clean (part of the suite so CI enforces it)."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    completed = subprocess.run(
        [ruff, "check", "--quiet", "stui_twisted", "tests", "twisted", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_ruff_format_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the [test] extra)")
    completed = subprocess.run(
        [ruff, "format", "--check", "--quiet", "stui_twisted", "tests", "twisted", "benchmarks"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_one_docstring_markup():
    """Docstrings and comments use epytext (Twisted's: C{code}, L{name}, @param), not reST."""
    import re

    rest = re.compile(r"``[^`\n]+``|:(?:class|func|meth|mod|attr|exc|data|obj):`")
    offenders = []
    for path in sorted((ROOT / "stui_twisted").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if rest.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "\n".join(offenders[:20])


def test_every_package_is_installed():
    """A package missing from setup.cfg works from the checkout and breaks every install."""
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "stui_twisted").rglob("__init__.py")
    }
    assert found - listed == set()
