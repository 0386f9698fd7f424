"""The built wheel holds every subpackage under helora.* and no bare top-level package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SUBPACKAGES = ["helora", "helora/shared", "helora/broker", "helora/aggregator", "helora/worker"]


@pytest.mark.slow
def test_wheel_contains_every_subpackage_and_no_bare_top_level(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("helora-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in SUBPACKAGES:
        assert f"{pkg}/__init__.py" in names, pkg
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"helora"}, top
    # every module in the source folders made it into the wheel
    for folder, pkg in [
        ("shared", "helora/shared"),
        ("broker", "helora/broker"),
        ("aggregator", "helora/aggregator"),
        ("worker", "helora/worker"),
    ]:
        for src in (REPO / folder).glob("*.py"):
            assert f"{pkg}/{src.name}" in names, src


def test_no_bare_imports_of_project_folders():
    bad = []
    for path in REPO.glob("*/**/*.py"):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        for line in path.read_text().splitlines():
            s = line.strip()
            for name in ("shared", "broker", "aggregator", "worker"):
                if s.startswith((f"import {name}", f"from {name} ", f"from {name}.")):
                    bad.append(f"{path.relative_to(REPO)}: {s}")
    assert not bad, bad
