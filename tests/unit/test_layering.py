"""The layering rule: compress/, models/, data/ and results/ never import Ray or DeepSpeed
(results/ reads a run directory: `report` and `export` work on any machine that has it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
PKG = Path(__file__).resolve().parents[2] / "orchestrator"
PLAIN = ("compress", "models", "data", "results")


@pytest.mark.parametrize("package", PLAIN)
def test_no_ray_or_deepspeed_imports_in_source(package: str) -> None:
    for path in sorted((PKG / package).rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                root = name.split(".")[0]
                assert root not in ("ray", "deepspeed"), f"{path}: imports {name}"
                if name.startswith("orchestrator."):
                    sub = name.split(".")[1]
                    assert sub not in ("launch", "search", "strategies"), f"{path}: {name}"


def test_importing_plain_packages_loads_neither() -> None:
    code = (
        "import sys; import orchestrator.compress, orchestrator.compress.artifact, "
        "orchestrator.models, orchestrator.data, orchestrator.results; "
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]; "
        "sys.exit(f'imported: {bad}' if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def _package_inits() -> list[Path]:
    # The top-level one also sets Hugging Face's offline mode before anything imports it.
    return sorted(p for p in PKG.rglob("__init__.py") if p != PKG / "__init__.py")


@pytest.mark.parametrize("init", _package_inits(), ids=lambda p: str(p.relative_to(PKG.parent)))
def test_package_inits_only_re_export(init: Path) -> None:
    """Logic lives in named modules; a package's ``__init__`` holds its docstring, imports and
    ``__all__`` only."""
    tree = ast.parse(init.read_text())
    for node in tree.body:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        names_all = isinstance(node, ast.Assign) and [
            t.id for t in node.targets if isinstance(t, ast.Name)
        ] == ["__all__"]
        imports = isinstance(node, ast.Import | ast.ImportFrom)
        assert docstring or names_all or imports, f"{init}:{node.lineno}: {ast.dump(node)[:80]}"


def _imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_config_modules_import_each_other_without_a_circle() -> None:
    """The job spec's modules form a tree (the search-space check is a step of loading a job,
    not a validator that needs the loader)."""
    modules = {p.stem: p for p in (PKG / "config").glob("*.py") if p.stem != "__init__"}
    graph = {
        name: {
            m.rsplit(".", 1)[-1]
            for m in _imports_of(path)
            if m.startswith("orchestrator.config.") and m.rsplit(".", 1)[-1] in modules
        }
        for name, path in modules.items()
    }
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for dep in graph[name]:
            visit(dep, (*path, name))
        done.add(name)

    for name in graph:
        visit(name, ())


def test_nothing_refers_outside_the_repository() -> None:
    """The repository explains itself: no code, doc or job points at notes kept elsewhere."""
    root = PKG.parent
    files = subprocess.run(
        ["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    outside = ("../shared", "DESIGN.md", "ENV.md", "ASSETS.md", "STYLE.md")
    this = Path(__file__).resolve().relative_to(root).as_posix()
    hits = [
        f"{name}: {word}"
        for name in files
        if name != this and (root / name).is_file()
        for word in outside
        if word in (root / name).read_text(errors="ignore")
    ]
    assert not hits, hits
