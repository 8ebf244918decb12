"""A plugin imports only qo's public API (docs/plugins.md): every module of every
distribution under ``plugins/`` (its package, not its tests or tools) is read with
``ast``, and every import of a ``qo`` module must name one of ``PUBLIC``.

Every import counts: at module level, inside a function, under ``if TYPE_CHECKING:``,
and ``from qo import keys`` (a module imported by name from the package) as much as
``import qo.keys``. Attributes reached through ``qo.`` at run time are not seen here;
the rule is the same for them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "plugins"

#: the modules a plugin may import (docs/plugins.md, "A plugin imports only qo's public API")
PUBLIC = {"qo", "qo.storage", "qo.backend_kit", "qo.counting", "qo.cli.common"}
#: and everything under these
PUBLIC_TREES = {"qo.testing"}


def is_public(module: str) -> bool:
    return module in PUBLIC or any(module == t or module.startswith(t + ".") for t in PUBLIC_TREES)


def is_qo_module(name: str) -> bool:
    """Whether ``name`` (``qo.x.y``) is a module or package of qo's source tree."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def qo_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for each qo module the file at ``path`` imports."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "qo" or alias.name.startswith("qo."):
                    found.append((node.lineno, alias.name))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            if node.module != "qo" and not node.module.startswith("qo."):
                continue
            found.append((node.lineno, node.module))
            for alias in node.names:  # ``from qo import keys``: the module qo.keys
                if is_qo_module(f"{node.module}.{alias.name}"):
                    found.append((node.lineno, f"{node.module}.{alias.name}"))
    return found


def plugin_packages() -> list[Path]:
    """Each plugin distribution's importable packages (not ``tests``, ``tools``)."""
    out = []
    for dist in sorted(p for p in PLUGINS.iterdir() if (p / "pyproject.toml").is_file()):
        out += sorted(p for p in dist.iterdir() if (p / "__init__.py").is_file() and p.name != "tests")
    return out


def test_every_plugin_distribution_has_a_package():
    names = {p.parent.name for p in plugin_packages()}
    assert {"qo-azure", "qo-dashboard", "qo-fairshare", "qo-memory", "qo-metrics"} <= names, names


@pytest.mark.parametrize("package", plugin_packages(), ids=lambda p: p.parent.name)
def test_plugin_imports_only_the_public_api(package):
    bad = [f"{path.relative_to(ROOT)}:{line}: imports {module}"
           for path in sorted(package.rglob("*.py")) for line, module in qo_imports(path) if not is_public(module)]
    assert not bad, ("a plugin imports qo's internals (allowed: " + ", ".join(sorted(PUBLIC | PUBLIC_TREES))
                     + "; see docs/plugins.md):\n" + "\n".join(bad))


def test_the_checker_sees_every_form(tmp_path):
    sample = tmp_path / "m.py"
    sample.write_text("import qo\nimport qo.keys\nfrom qo import keys, Task\nfrom qo.listing import live_records\n"
                      "from qo.cli.common import run\nfrom qo.testing.moto import MotoServer\n"
                      "def f():\n    from qo.model import STATUSES\n")
    assert [m for _, m in qo_imports(sample) if not is_public(m)] == ["qo.keys", "qo.keys", "qo.listing", "qo.model"]
