"""The import-layers contract of ``ray_ckpt/``, checked over the source with :mod:`ast`.

Three rules, each of which fails this test when broken:

* **no import circle** between ray_ckpt's modules (module-level imports, which run at import
  time, and imports inside functions alike: a lazy import only hides a circle);
* **imports flow downward**: a module imports only modules of its own layer or of layers below
  it (``LAYERS`` lists them, lowest first);
* **no import inside a function**, except of an optional heavy dependency named in
  ``LAZY_IMPORTS_ALLOWED`` (one that ``import ray_ckpt`` must not pay for or may not have), and
  the few deliberate first-use loads of ``LAZY_ON_PURPOSE``, each with its reason (such an
  import runs only when its function is called: it is left out of the circle and layer rules).

Imports under ``if TYPE_CHECKING:`` never run and are not counted.

``KNOWN_VIOLATIONS`` lists what the tree breaks today, by name; the package move of issue 14
empties it. A violation not in the list fails, and so does an entry that no longer happens (so
the list only shrinks).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PACKAGE = "ray_ckpt"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# Lowest first. A module belongs to the layer of its longest matching entry (a module name, or a
# package name that covers its submodules). A module may import its own layer and those below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("ray_ckpt.errors", "ray_ckpt.types", "ray_ckpt._checksum", "ray_ckpt.metrics",
     "ray_ckpt._util", "ray_ckpt._stateful", "ray_ckpt._attach"),
    ("ray_ckpt.config", "ray_ckpt.sharding"),
    ("ray_ckpt.format.names", "ray_ckpt.format.refs"),
    ("ray_ckpt.format.header", "ray_ckpt.format.layout", "ray_ckpt.format.tree",
     "ray_ckpt.format.torch_leaves"),
    ("ray_ckpt.format.checks", "ray_ckpt.format.flatten"),
    ("ray_ckpt.format.marker", "ray_ckpt.format.manifest"),
    ("ray_ckpt.storage.credentials",),
    ("ray_ckpt.storage.classify", "ray_ckpt.storage.local"),
    ("ray_ckpt.storage.storage",),
    ("ray_ckpt.storage.buffers", "ray_ckpt.storage.memory_stream"),
    ("ray_ckpt.storage.memory_holder",),
    ("ray_ckpt.storage.memory_catalog",),
    ("ray_ckpt.storage.atomic", "ray_ckpt.storage.files", "ray_ckpt.storage.memory"),
    ("ray_ckpt.catalog",),
    ("ray_ckpt.futures",),
    ("ray_ckpt.save.protocol", "ray_ckpt.save.prefault"),
    ("ray_ckpt.save.dedup", "ray_ckpt.save.pieces"),
    ("ray_ckpt.save.stager", "ray_ckpt.save.encoder", "ray_ckpt.save.commit"),
    ("ray_ckpt.save.barrier", "ray_ckpt.save.writer"),
    ("ray_ckpt.save.pool",),
    ("ray_ckpt.save.pipeline", "ray_ckpt.save.in_process"),
    ("ray_ckpt.load.validate", "ray_ckpt.load.extents", "ray_ckpt.load.map_location"),
    ("ray_ckpt.load.match",),
    ("ray_ckpt.load.reader",),
    ("ray_ckpt.checkpointer", "ray_ckpt.runs"),
    ("ray_ckpt.builder", "ray_ckpt.manager"),
    ("ray_ckpt.tiers", "ray_ckpt.tools"),
    ("ray_ckpt.train", "ray_ckpt.demo"),
    ("ray_ckpt.cli",),
    # the packages' __init__ (docstrings only) and the package itself
    ("ray_ckpt", "ray_ckpt.__main__", "ray_ckpt.format", "ray_ckpt.storage", "ray_ckpt.save",
     "ray_ckpt.load"),
)

# Optional heavy dependencies a function may import on first use (top-level module names or
# dotted prefixes): absent in some installs, or too costly for ``import ray_ckpt``.
LAZY_IMPORTS_ALLOWED: tuple[str, ...] = (
    "safetensors",  # tools' export/import only; an optional dependency
    "torch.distributed",  # DTensor and process groups: only with torch.distributed in use
    "torch._subclasses",  # fake tensors, for reading a torch.save file's metadata
    "ray.train",  # Ray Train integration: an extra
    "ray.util.metrics",  # metrics only where a Ray worker reports them
)

# (importing module or package, imported module or package) -> why it is imported on first use.
LAZY_ON_PURPOSE: dict[tuple[str, str], str] = {
    ("ray_ckpt.cli", "ray_ckpt"): "each command imports what it needs when it runs: `ray-ckpt "
    "--help` and `ray-ckpt ls` answer without importing torch or Ray",
    ("ray_ckpt.cli", "ray"): "the same: only the commands that talk to a cluster import Ray",
    ("ray_ckpt.storage.classify", "ray_ckpt.storage.memory"): "the memory tier's filesystem "
    "imports Ray: it is loaded for mem:// paths only",
    ("ray_ckpt.format", "torch"): "torch dtypes by name, for loads and tools that read tensor "
    "data: markers and manifests are read and checked with the torch-free ITEMSIZES table",
    ("ray_ckpt.format.tree", "ray_ckpt.format.torch_leaves"): "decoding a tree imports torch "
    "only for a torch.Size/dtype/device leaf: `ray-ckpt inspect` of a tree without one never "
    "imports torch",
}

# What the tree breaks today, by name (issue 14's package move empties this list).
KNOWN_VIOLATIONS: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Import:
    """One import statement's target, as seen from ``source``."""

    source: str  # the importing module, e.g. "ray_ckpt.writer"
    target: str  # the imported module, e.g. "ray_ckpt.commit" or "numpy"
    in_function: bool
    line: int


def module_name(path: Path, root: Path) -> str:
    """``ray_ckpt/save/writer.py`` -> ``ray_ckpt.save.writer``; a package's ``__init__`` -> it."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, source: str, is_package: bool, modules: set[str]) -> list[str]:
    """The modules ``from X import a, b`` imports: ``X.a`` where that is a module, else ``X``."""
    if node.level:
        base = source.split(".") if is_package else source.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    targets = []
    for alias in node.names:
        candidate = f"{prefix}.{alias.name}"
        targets.append(candidate if candidate in modules else prefix)
    return targets


def imports_of(root: Path) -> list[Import]:
    """Every import in the package at ``root`` (module level, in classes and in functions)."""
    files = sorted(root.rglob("*.py"))
    modules = {module_name(f, root) for f in files}
    found: list[Import] = []
    for path in files:
        source = module_name(path, root)
        tree = ast.parse(path.read_text(), filename=str(path))
        found.extend(_walk(tree, source, path.name == "__init__.py", modules, in_function=False))
    return found


def _walk(
    node: ast.AST, source: str, is_package: bool, modules: set[str], *, in_function: bool
) -> Iterable[Import]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            for alias in child.names:
                yield Import(source, alias.name, in_function, child.lineno)
        elif isinstance(child, ast.ImportFrom):
            for target in _resolve(child, source, is_package, modules):
                yield Import(source, target, in_function, child.lineno)
        elif isinstance(child, ast.If) and ast.unparse(child.test) == "TYPE_CHECKING":
            continue  # type-only imports never run
        else:
            inner = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
            )
            yield from _walk(child, source, is_package, modules, in_function=inner)


def internal_graph(imports: Iterable[Import], package: str = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (at any depth of its code)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source, set())
        if _inside(imp.target, package) and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def circles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The import circles: each strongly connected set of two or more modules, sorted.

    One entry per tangle (not per elementary cycle), so that the report stays stable while the
    edges inside a tangle change (Tarjan's algorithm, iterative)."""
    nodes = sorted(set(graph) | {t for ts in graph.values() for t in ts})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in nodes:
        if root in index:
            continue
        work: list[tuple[str, list[str]]] = [(root, sorted(graph.get(root, ())))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, pending = work[-1]
            if pending:
                nxt = pending.pop(0)
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, sorted(graph.get(nxt, ()))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def layer_of(module: str, layers: Sequence[Sequence[str]]) -> int | None:
    """The index of ``module``'s layer: its longest matching entry wins."""
    best: tuple[int, int] | None = None  # (length of the entry, layer)
    for index, layer in enumerate(layers):
        for entry in layer:
            if module == entry or module.startswith(entry + "."):
                if best is None or len(entry) > best[0]:
                    best = (len(entry), index)
    return None if best is None else best[1]


def violations(
    imports: Sequence[Import],
    layers: Sequence[Sequence[str]],
    lazy_allowed: Sequence[str],
    package: str = PACKAGE,
) -> set[str]:
    """Every broken rule, one line each (the form ``KNOWN_VIOLATIONS`` uses)."""
    out: set[str] = set()
    imports = [imp for imp in imports if not (imp.in_function and _on_purpose(imp))]
    for circle in circles(internal_graph(imports, package)):
        out.add("circle: " + ", ".join(circle))
    for imp in imports:
        internal = _inside(imp.target, package)
        if internal and imp.target != imp.source:
            source_layer, target_layer = layer_of(imp.source, layers), layer_of(imp.target, layers)
            if source_layer is None:
                out.add(f"unlayered: {imp.source} is in no layer")
            elif target_layer is None:
                out.add(f"unlayered: {imp.target} is in no layer")
            elif target_layer > source_layer:
                out.add(f"upward: {imp.source} imports {imp.target} (line {imp.line})")
        if imp.in_function and (internal or not _allowed(imp.target, lazy_allowed)):
            out.add(f"lazy import: {imp.source} imports {imp.target} in a function")
    return out


def _on_purpose(imp: Import) -> bool:
    return any(
        _inside(imp.source, source) and _inside(imp.target, target)
        for source, target in LAZY_ON_PURPOSE
    )


def _allowed(target: str, allowed: Sequence[str]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


# --- the contract on ray_ckpt/ ------------------------------------------------------------------


@pytest.fixture(scope="module")
def found() -> set[str]:
    return violations(imports_of(ROOT), LAYERS, LAZY_IMPORTS_ALLOWED)


def test_no_new_violations(found: set[str]) -> None:
    new = sorted(found - KNOWN_VIOLATIONS)
    assert not new, "import-layers contract broken (see tests/test_layers.py):\n" + "\n".join(new)


def test_known_violations_still_happen(found: set[str]) -> None:
    fixed = sorted(KNOWN_VIOLATIONS - found)
    assert not fixed, "fixed: remove these from KNOWN_VIOLATIONS:\n" + "\n".join(fixed)


def test_every_module_has_a_layer() -> None:
    unlayered = [
        name
        for name in sorted(module_name(f, ROOT) for f in ROOT.rglob("*.py"))
        if layer_of(name, LAYERS) is None
    ]
    assert not unlayered


# --- the checker itself, on synthetic packages ----------------------------------------------------


def _package(tmp_path: Path, files: Mapping[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_checker_finds_a_circle_an_upward_import_and_a_lazy_import(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "low.py": "from .high import thing\n",  # upward, and closes a circle
            "high.py": "from . import low\n\ndef f():\n    import json\n    from .sub import x\n",
            "sub/__init__.py": "",
            "sub/x.py": "import numpy\n",
        },
    )
    layers = (("pkg.low", "pkg.sub"), ("pkg.high",), ("pkg",))
    found = violations(imports_of(root), layers, ("numpy",), package="pkg")
    assert found == {
        "circle: pkg.high, pkg.low",
        "upward: pkg.low imports pkg.high (line 1)",
        "lazy import: pkg.high imports json in a function",
        "lazy import: pkg.high imports pkg.sub.x in a function",
    }


def test_checker_passes_a_clean_package_and_allows_named_lazy_imports(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "from .top import run\n",
            "base.py": "import os\n",
            "top.py": "from .base import os\n\ndef run():\n    import safetensors.torch\n",
        },
    )
    layers = (("pkg.base",), ("pkg.top",), ("pkg",))
    assert violations(imports_of(root), layers, ("safetensors",), package="pkg") == set()


def test_checker_reports_each_tangle_once(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from . import b\n",
            "b.py": "from .c import x\n",
            "c.py": "def f():\n    from .a import y\n",
            "d.py": "from . import c, e\n",  # d -> c is no circle; d <-> e is a second one
            "e.py": "from .d import z\n",
        },
    )
    layers = (("pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e"), ("pkg",))
    found = violations(imports_of(root), layers, (), package="pkg")
    assert {v for v in found if v.startswith("circle")} == {
        "circle: pkg.a, pkg.b, pkg.c",
        "circle: pkg.d, pkg.e",
    }


# --- the public API ------------------------------------------------------------------------------


def _in_a_fresh_python(script: str) -> Any:
    """What ``script`` prints as JSON, run in a new interpreter (nothing of ray_ckpt imported)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT.parent)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_import_ray_ckpt_exports_the_contract_names_and_loads_no_tools() -> None:
    """``import ray_ckpt`` gives DESIGN.md's names (about 20) and does not import tools/; the
    submodules the README calls as ``ray_ckpt.<module>.<name>`` load when first used."""
    names, tools_loaded, missing, has_other = _in_a_fresh_python(textwrap.dedent("""
        import json, sys, ray_ckpt
        tools = sorted(m for m in sys.modules if m.startswith("ray_ckpt.tools"))
        used = [ray_ckpt.tiers.persist, ray_ckpt.tools.verify, ray_ckpt.train.load,
                ray_ckpt.errors.MemoryTierFullError, ray_ckpt.catalog.delete_checkpoint,
                ray_ckpt.storage.memory.memory_filesystem, ray_ckpt.types.RankInfo]
        print(json.dumps([sorted(ray_ckpt.__all__), tools,
                          [n for n in ray_ckpt.__all__ if not hasattr(ray_ckpt, n)],
                          hasattr(ray_ckpt, "no_such_module")]))
    """))
    assert tools_loaded == []
    assert missing == []
    assert has_other is False
    assert 18 <= len(names) <= 26, names
    assert {
        "make_sync_checkpointer", "make_async_checkpointer", "Checkpointer", "SyncCheckpointer",
        "AsyncCheckpointer", "CheckpointStager", "CheckpointWriter", "CheckpointReader",
        "WriterHook", "RankInfo", "CheckpointerConfig", "CheckpointManager", "CheckpointError",
    } <= set(names)


def test_every_error_ray_ckpt_raises_on_purpose_is_in_ray_ckpt_errors() -> None:
    """The README's promise: every error is in ``ray_ckpt.errors``, so a caller can catch
    ``ray_ckpt.errors.MemoryTierFullError`` without knowing which module raises it."""
    errors = _in_a_fresh_python(textwrap.dedent("""
        import importlib, json, pkgutil, ray_ckpt
        from ray_ckpt.errors import CheckpointError
        for m in pkgutil.walk_packages(ray_ckpt.__path__, "ray_ckpt."):
            if not m.name.endswith("__main__"):
                importlib.import_module(m.name)
        seen, todo = [], [CheckpointError]
        while todo:
            seen.append(todo.pop())
            todo += seen[-1].__subclasses__()
        print(json.dumps(sorted(f"{c.__module__}.{c.__qualname__}" for c in seen)))
    """))
    assert "ray_ckpt.errors.MemoryTierFullError" in errors
    assert [e for e in errors if not e.startswith("ray_ckpt.errors.")] == []
