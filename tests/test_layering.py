"""Packages import downwards only (docs: /work/shared/STYLE.md, "Packages import downwards only").

Read from the source with ``ast`` (nothing is imported): every ``import`` / ``from ... import`` node, at module
level, inside functions and methods, and under ``if TYPE_CHECKING:``, resolved to an absolute module name
(``from ..eval.stats import x`` in ``diffalign/rewards/training.py`` is ``diffalign.eval.stats``).

- ``diffalign/rewards/**`` never imports ``diffalign.eval`` (evaluation sits above the rewards it uses) nor
  ``diffalign.training`` (a reward model's fitting loop is a loop of ``training/``, not hidden in ``rewards/``);
- ``diffalign/data/**`` never imports ``diffalign.eval`` nor ``diffalign.training`` (dataset resolution lives in
  ``data/``; the loops and the evaluation read data, not the other way round);
- no module of ``diffalign/`` is longer than :data:`MAX_LINES` lines, except those in :data:`KNOWN_LONG` (waiting
  for their split; an entry that has come under the limit must be removed, so the list only shrinks).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "diffalign"

MAX_LINES = 700
"""A file past ~600 lines is usually two responsibilities (STYLE.md); 700 leaves room for a docstring."""

KNOWN_LONG: dict[str, str] = {}
"""Modules over :data:`MAX_LINES` that predate this test, with what they hold (candidates for a split)."""

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "rewards": ("diffalign.eval", "diffalign.training"),
    "data": ("diffalign.eval", "diffalign.training"),
}
"""Subpackage of ``diffalign`` -> module prefixes its files must never import."""


def module_name(path: Path, root: Path = REPO) -> str:
    """``diffalign/rewards/catalog.py`` -> ``diffalign.rewards.catalog``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` for every import node of the file, wherever it stands.

    ``from X import a, b`` yields ``X`` and ``X.a``, ``X.b`` (an imported name may be a submodule:
    ``from diffalign import eval`` is an import of ``diffalign.eval``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]  # a module's relative imports start from its package
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names if alias.name != "*"]
    return out


def is_under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_imported_modules_resolves_relative_and_nested_imports(tmp_path):
    pkg = tmp_path / "diffalign" / "rewards"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text(
        "import os\n"
        "from ..eval.stats import wilson_interval\n"
        "from . import base\n"
        "def g():\n"
        "    from diffalign.training import reward_model\n"
    )
    found = {m for _, m in imported_modules(f, root=tmp_path)}
    assert {
        "os",
        "diffalign.eval.stats",
        "diffalign.rewards.base",
        "diffalign.training.reward_model",
    } <= found
    assert "diffalign.rewards.eval.stats" not in found  # ".." climbs out of rewards/, "." stays in it


@pytest.mark.parametrize("subpackage", sorted(FORBIDDEN))
def test_packages_import_downwards_only(subpackage):
    bad: dict[str, str] = {}  # "path:line" -> the first forbidden module that line imports
    for path in sorted((PACKAGE / subpackage).rglob("*.py")):
        for line, module in imported_modules(path):
            if any(is_under(module, prefix) for prefix in FORBIDDEN[subpackage]):
                bad.setdefault(f"{path.relative_to(REPO)}:{line}", module)
    assert not bad, (
        f"diffalign/{subpackage}/ must not import {', '.join(FORBIDDEN[subpackage])} (packages import downwards "
        "only; move the shared piece below both):\n  "
        + "\n  ".join(f"{k} imports {m}" for k, m in bad.items())
    )


def test_no_module_over_the_line_limit():
    lengths = {
        str(p.relative_to(REPO)): len(p.read_text(encoding="utf-8").splitlines())
        for p in sorted(PACKAGE.rglob("*.py"))
    }
    offenders = [f"{p} ({n} lines)" for p, n in lengths.items() if n > MAX_LINES and p not in KNOWN_LONG]
    assert not offenders, (
        f"modules over {MAX_LINES} lines (split each by what it does, not by size):\n  "
        + "\n  ".join(offenders)
    )
    stale = [p for p in KNOWN_LONG if lengths.get(p, 0) <= MAX_LINES]
    assert not stale, f"remove from KNOWN_LONG (now under {MAX_LINES} lines, or gone): {stale}"
