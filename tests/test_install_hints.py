"""Every install line qo prints or documents names a distribution this repository builds
(issue 18, item 1: `qo` on the package index is another project), or a path in it."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = [*ROOT.glob("qo/**/*.py"), *ROOT.glob("qo_*/**/*.py"), *ROOT.glob("plugins/*/qo_*/**/*.py"), ROOT / "dev.py"]
DOCS = [ROOT / "README.md", *ROOT.glob("plugins/*/README.md"), *ROOT.glob("docs/*.md")]
INSTALL = re.compile(r"pip3? install\s+((?:-[-\w]+\s+)*)(['\"]?)([^\s'\"()`,;]+)\2")


def built_here() -> dict[str, Path]:
    """Distribution name -> its folder, for every pyproject.toml of the repository."""
    out = {}
    for pyproject in [ROOT / "pyproject.toml", *ROOT.glob("plugins/*/pyproject.toml")]:
        out[tomllib.loads(pyproject.read_text())["project"]["name"]] = pyproject.parent
    return out


def targets(text: str) -> list[str]:
    return [m.group(3) for m in INSTALL.finditer(text)]


def check(target: str, names: dict[str, Path]) -> str | None:
    """None if ``target`` (a name, name[extra], or a path[extra]) is built here."""
    base = target.split("[", 1)[0]
    if base.startswith((".", "/")):
        folder = (ROOT / base).resolve()
        return None if (folder / "pyproject.toml").exists() and folder in {p.resolve() for p in names.values()} \
            else f"{target}: no distribution of this repository at {base}"
    return None if base in names else f"{target}: not a distribution this repository builds ({sorted(names)})"


def hints_in_code() -> list[tuple[str, str]]:
    out = []
    for path in CODE:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "pip install" in node.value:
                out += [(f"{path.relative_to(ROOT)}", t) for t in targets(node.value)]
    return out


def test_the_distribution_is_not_named_qo():
    names = built_here()
    assert "qo" not in names and "qo-queue" in names
    for name, folder in names.items():
        deps = tomllib.loads((folder / "pyproject.toml").read_text())["project"].get("dependencies", [])
        assert not any(re.match(r"qo\b(?!-)", d) for d in deps), f"{name} depends on 'qo' (another project)"


def test_every_install_hint_in_the_code_names_a_distribution_built_here():
    names = built_here()
    found = hints_in_code()
    assert len(found) >= 6  # the s3, az and memory hints at least: the scan is not empty
    bad = [f"{where}: {problem}" for where, t in found if (problem := check(t, names))]
    assert not bad, "\n".join(bad)


def test_every_install_line_in_the_docs_names_a_distribution_built_here():
    names = built_here()
    bad = []
    for doc in DOCS:
        for t in targets(doc.read_text()):
            if t.startswith(("-", "'-")) or t in ("torch",):
                continue
            if (problem := check(t, names)) and t.split("[")[0] not in ("s3fs", "azure-identity", "playwright"):
                bad.append(f"{doc.relative_to(ROOT)}: {problem}")
    assert not bad, "\n".join(bad)


def test_the_checker_refuses_the_name_qo():
    names = built_here()
    assert check("qo[s3]", names) is not None
    assert check("qo-queue[s3]", names) is None and check("./plugins/qo-azure", names) is None
    assert check("./plugins/nope", names) is not None
