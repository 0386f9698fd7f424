"""The import rules of DESIGN.md section 2, checked on the source (AST), not by convention.

import-linter cannot map helora.* onto the top-level folders (it walks the file system from the
package), so the contracts are enforced here instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FOLDERS = {
    "shared": "helora.shared",
    "broker": "helora.broker",
    "aggregator": "helora.aggregator",
    "worker": "helora.worker",
    "helora": "helora",
}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(folder: str) -> list[Path]:
    return sorted((REPO / folder).glob("*.py"))


def offenders(folder: str, forbidden: tuple[str, ...], exempt: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for path in modules(folder):
        if path.name in exempt:
            continue
        for name in imports_of(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                bad.append(f"{folder}/{path.name} imports {name}")
    return bad


def test_every_folder_has_modules():
    for folder in FOLDERS:
        assert modules(folder), folder


def test_shared_is_a_leaf():
    assert not offenders(
        "shared",
        (
            "helora.broker",
            "helora.aggregator",
            "helora.worker",
            "helora.cli",
            "helora.runtime",
            "helora.demo",
            "pika",
        ),
    )


def test_only_broker_imports_pika():
    for folder in ("shared", "aggregator", "worker", "helora"):
        assert not offenders(folder, ("pika",)), folder


# The KD distillation step needs a model: it is the one aggregator module allowed to import
# helora.worker (and transformers/peft); the KD state machine (kd.py) stays pure.
MODEL_BOUND = ("distill.py",)


def test_aggregator_and_worker_are_independent():
    assert not offenders("aggregator", ("helora.worker",), exempt=MODEL_BOUND)
    assert not offenders("worker", ("helora.aggregator",))


def test_aggregator_never_imports_transformers_or_peft():
    assert not offenders("aggregator", ("transformers", "peft"), exempt=MODEL_BOUND)


@pytest.mark.parametrize("module", ["core.py", "strategies.py"])
def test_aggregation_core_is_pure(module):
    names = imports_of(REPO / "aggregator" / module)
    forbidden = (
        "helora.broker",
        "pika",
        "transformers",
        "peft",
        "os",
        "socket",
        "pathlib",
        "structlog",
        "safetensors",
    )
    assert not [n for n in names if n.split(".")[0] in forbidden or n.startswith(forbidden)]
