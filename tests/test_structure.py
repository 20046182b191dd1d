"""The code's structure: imports point down only, no run path spelled outside storage/, small entry points.

Layers (docs/ARCHITECTURE.md): ``jobs`` -> ``service`` / ``actors`` -> ``pipeline`` / ``storage``. ``pipeline``
(algorithms) and ``storage`` (I/O) import nothing else of the project and never each other; ``pipeline`` and
``service`` never import Ray (the query side runs in any process); ``actors`` never import the query side or
the entry points.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from storage.layout import ARTEFACT_FILES, RUN_ENTRY_NAMES

REPO = Path(__file__).resolve().parents[1]
PROJECT = ("pipeline", "storage", "actors", "service", "jobs", "experiments")
FORBIDDEN = {
    "pipeline": {"storage", "actors", "service", "jobs", "experiments", "ray"},
    "storage": {"pipeline", "actors", "service", "jobs", "experiments", "ray"},
    "actors": {"service", "jobs", "experiments"},
    "service": {"actors", "jobs", "experiments", "ray"},
    "jobs": {"experiments"},
}
# directory names of a run: flagged when they appear in a path expression (they are also ordinary words)
RUN_DIRS = {"artefacts", "corpus", "tables", "indexes", "shards", "stages"} | {d for d, _ in ARTEFACT_FILES.values()}
RUN_FILES = RUN_ENTRY_NAMES - RUN_DIRS


def _modules(packages: tuple[str, ...]) -> list[Path]:
    return sorted(p for pkg in packages for p in (REPO / pkg).rglob("*.py"))


def _imports(tree: ast.AST) -> list[tuple[int, str, bool]]:
    """(line, top-level module, inside a function) of every import."""
    out = []

    def visit(node: ast.AST, in_fn: bool) -> None:
        for child in ast.iter_child_nodes(node):
            fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                out.extend((child.lineno, a.name.split(".")[0], in_fn) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                out.append((child.lineno, child.module.split(".")[0], in_fn))
            visit(child, fn)

    visit(tree, False)
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down_only(package):
    bad = [f"{p.relative_to(REPO)}:{line} imports {mod}"
           for p in _modules((package,)) for line, mod, _ in _imports(ast.parse(p.read_text()))
           if mod in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_project_imports_sit_at_the_top_of_modules():
    hidden = [f"{p.relative_to(REPO)}:{line} imports {mod} inside a function"
              for p in _modules(PROJECT) for line, mod, in_fn in _imports(ast.parse(p.read_text()))
              if in_fn and mod in PROJECT]
    assert not hidden, "\n".join(hidden)


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _path_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants naming a run's files anywhere, or a run's folders inside a path expression (arguments of a
    ``join`` call or of ``/`` between paths)."""
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            parts = {p for p in node.value.replace("\\", "/").split("/") if p}
            if parts & RUN_FILES:
                found.append((node.lineno, node.value))
        path_args = []
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("join", "Path"):
            path_args = node.args
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            path_args = [node.left, node.right]
        for a in path_args:
            if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.strip("/") in RUN_DIRS:
                found.append((a.lineno, a.value))
    return found


def test_no_path_literal_for_a_run_outside_storage():
    files = _modules(tuple(x for x in PROJECT if x != "storage")) + sorted(
        p for p in (REPO / "tests").glob("*.py") if p.name != Path(__file__).name)
    bad = [f"{p.relative_to(REPO)}:{line}: {text!r}"
           for p in files for line, text in _path_literals(ast.parse(p.read_text()))]
    assert not bad, "use storage.layout.RunLayout:\n" + "\n".join(bad)


def test_the_literal_check_catches_a_path():
    code = 'join(root, "artefacts", "graph", "V.npy")\nPath(out) / "indexes"\nx = {"stages": []}\n'
    assert sorted(t for _, t in _path_literals(ast.parse(code))) == ["V.npy", "artefacts", "graph", "indexes"]


def test_entry_points_are_short():
    long = []
    for p in _modules(("jobs",)):
        for node in ast.walk(ast.parse(p.read_text())):
            n = node.end_lineno - node.lineno + 1 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) else 0
            if n > 60:
                long.append(f"{p.relative_to(REPO)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_no_module_of_600_lines_or_more():
    big = [f"{p.relative_to(REPO)}: {n}" for p in _modules(PROJECT) + sorted((REPO / "tests").glob("*.py"))
           if (n := len(p.read_text().splitlines())) >= 600]
    assert not big, "\n".join(big)


def test_every_package_says_what_lives_there():
    for pkg in ("pipeline", "storage", "actors", "service", "jobs", "experiments"):
        init = REPO / pkg / "__init__.py"
        assert init.exists(), pkg
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and 1 <= len(doc.strip().splitlines()) <= 3, f"{pkg}/__init__.py needs a short docstring"


def test_lint_is_clean():
    """pyflakes errors and style (ruff, the config in pyproject.toml) over the whole tree."""
    import shutil
    import subprocess
    import sys

    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                                                       capture_output=True).returncode != 0:
        pytest.skip("ruff is not installed")
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", *PROJECT, "tests"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:]


def test_entry_points_import_no_torchvision_or_sklearn():
    """Every ``python -m jobs.X`` (and every Ray worker, through pipeline.config) pays its imports: torchvision
    (seconds, with torch._dynamo) and scikit-learn load only where a backbone is built or a scorer trained."""
    import subprocess
    import sys

    jobs = sorted(p.stem for p in (REPO / "jobs").glob("*.py") if p.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for j in {jobs!r}:\n    importlib.import_module('jobs.' + j)\n"
            "print(' '.join(m for m in ('torchvision', 'torch._dynamo', 'sklearn') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", f"imported at start-up: {proc.stdout.strip()}"


def _top_level_names(path: Path) -> set[str]:
    """Names a module binds at its top level (definitions, assignments, imports), found without importing it."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        nodes = [node] + (list(ast.walk(node)) if isinstance(node, (ast.If, ast.Try)) else [])
        for n in nodes:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in n.names)
            elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = n.targets if isinstance(n, ast.Assign) else [n.target]
                names.update(t.id for tg in targets for t in ast.walk(tg) if isinstance(t, ast.Name))
    return names


def test_every_project_import_names_something_that_exists():
    """``from pipeline.x import y`` anywhere (experiments and tests included, which no other test imports all of)
    must name a module of the project and something it defines: a renamed or moved function breaks the scripts
    that the README tells users to run, and nothing else would notice."""
    bad = []
    for p in _modules(PROJECT) + sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                    and node.module.split(".")[0] in PROJECT):
                continue
            base = REPO / node.module.replace(".", "/")
            target = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
            if not target.exists():
                bad.append(f"{p.relative_to(REPO)}:{node.lineno} no module {node.module}")
                continue
            defined = _top_level_names(target)
            bad += [f"{p.relative_to(REPO)}:{node.lineno} {node.module} has no {a.name}" for a in node.names
                    if a.name != "*" and a.name not in defined and not (base / f"{a.name}.py").exists()
                    and not (base / a.name).is_dir()]
    assert not bad, "\n".join(bad)


def test_download_job_starts_without_torch():
    """``python -m jobs.download`` only fetches and checks files: it must not pay torch's import (1.7-2.8 s here),
    which ``service.errors`` once pulled in through ``pipeline.config`` for one exception class."""
    import subprocess
    import sys

    code = "import sys, jobs.download\nprint('torch' in sys.modules, 'pipeline.config' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "False"]
