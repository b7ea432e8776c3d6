"""What pyproject.toml declares is what sensorhub/ and firmware_sim/ import, and the other way round."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# used without an import statement of ours: redis-py loads hiredis as its parser when installed
USED_IMPLICITLY = {"hiredis"}
# imported inside try/except ImportError, served only when installed
OPTIONAL = {"brotli"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_modules() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for pkg in ("sensorhub", "firmware_sim"):
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
                      and node.args and isinstance(node.args[0], ast.Constant)):
                    names = [str(node.args[0].value)]
                for n in names:
                    found.setdefault(n, set()).add(str(path.relative_to(ROOT)))
    return found


def _distributions(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """Distribution name -> the places that import it (third-party only)."""
    by_top = importlib.metadata.packages_distributions()
    out: dict[str, set[str]] = {}
    for mod, where in modules.items():
        top = mod.split(".")[0]
        if top in sys.stdlib_module_names or top in ("sensorhub", "firmware_sim") or top in OPTIONAL:
            continue
        if mod == "backports":
            continue  # a namespace package: the distribution is named by what is taken from it
        dists = by_top.get(top, [])
        if top == "backports":
            dists = [d for d in dists if _norm(d) == _norm(".".join(mod.split(".")[:2]))]
        assert dists, f"{mod} (imported in {sorted(where)}) is installed by no distribution"
        for d in dists:
            out.setdefault(_norm(d), set()).update(where)
    return out


def _declared() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_norm(re.match(r"[A-Za-z0-9._-]+", d).group(0)) for d in deps}  # type: ignore[union-attr]


def test_every_import_is_declared_and_every_declared_package_is_imported() -> None:
    imported = _distributions(_imported_modules())
    declared = _declared()
    undeclared = {d: sorted(w) for d, w in imported.items() if d not in declared}
    assert not undeclared, f"imported but not in pyproject.toml dependencies: {undeclared}"
    unused = declared - set(imported) - USED_IMPLICITLY
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"
    # the scan sees the imports that matter here
    assert {"backports-zstd", "zstandard", "aiomqtt", "paho-mqtt"} <= set(imported)
