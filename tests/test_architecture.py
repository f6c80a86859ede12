"""The boundaries of src/: an acyclic import graph, numerics that import nothing above them, deferred imports only
for heavy optional dependencies, and third-party private names only inside src/integrations."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# All that src/quantization may import of src/: itself, the error types, and torch's private ops behind their seam.
NUMERICS_MAY_IMPORT = ("src.quantization", "src.errors", "src.integrations.torch_ops")
THIRD_PARTY_PRIVATE = re.compile(r"\baten\._|\bbatchnorm\._|\._recipe_manager\b|\._get_ops_details\b")


def _modules() -> dict[str, Path]:
    mods = {}
    for p in SRC.rglob("*.py"):
        name = ".".join(p.relative_to(SRC.parent).with_suffix("").parts)
        mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rsplit(".", 1)[0] if "." in name else ""
    return name or None


def _imports(module: str, path: Path):
    """(import statement, whether it sits inside a function, the module names it imports) of ``module``."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    # `if TYPE_CHECKING:` imports serve annotations only: nothing is imported at run time
    typing_only = {id(n) for i in ast.walk(tree) if isinstance(i, ast.If) and "TYPE_CHECKING" in ast.unparse(i.test)
                   for b in i.body for n in ast.walk(b)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            yield node, id(node) in nested, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            yield node, id(node) in nested, [base] + [f"{base}.{a.name}" for a in node.names]


def _graph_of(module: str) -> set[str]:
    return {r for _, _, targets in _imports(module, MODULES[module]) for t in targets
            if t.startswith("src") and (r := _resolve(t)) and r != module}


def _graph() -> dict[str, set[str]]:
    from src.export.registry import FORMATS

    graph = {m: _graph_of(m) for m in MODULES}
    graph["src.export.hooks"] |= {f.module for f in FORMATS.values()}  # imported by name, on first use
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycles():
    graph = _graph()
    assert sum(map(len, graph.values())) > 50, "the graph lost its edges: the import parser is broken"
    assert _cycles(graph) == []


def test_numerics_import_nothing_above_them():
    upward = sorted(f"{m} -> {t}" for m, targets in _graph().items() if m.startswith("src.quantization")
                    for t in targets if not t.startswith(NUMERICS_MAY_IMPORT))
    assert upward == []


def _block_start(lines: list[str], index: int) -> int:
    """First line of the run of import / comment lines that ends at ``lines[index]`` (one comment may cover several)."""
    while index > 0 and lines[index - 1].strip().startswith(("import ", "from ", "#", "try:")):
        index -= 1
    return index


# The command line parses --help and sets up the offline environment before anything imports Ultralytics.
MAY_DEFER_SRC = ("src.cli",)


# Bottom to top (docs/architecture.md draws the same). A module imports its own layer or lower ones only; the longest
# prefix names a module's layer.
LAYERS = (
    ("src.errors", "src.env"),
    ("src.integrations",),
    ("src.quantization",),
    ("src.export.registry",),
    ("src.config", "src.qconfig"),
    ("src.data", "src.deploy"),
    ("src.models",),
    ("src.training",),
    ("src.export",),
    ("src.analysis",),
    ("src.stages",),
    ("src.pipeline", "src.cli"),
)


def _layer(module: str) -> int:
    if MODULES[module].name == "__init__.py" and not _graph_of(module):  # a package that imports nothing
        return 0
    best = max(((len(p), rank) for rank, prefixes in enumerate(LAYERS) for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS and docs/architecture.md"
    return best[1]


def test_layers_import_only_downward():
    upward = sorted(f"{m} -> {t}" for m, targets in _graph().items() for t in targets if _layer(t) > _layer(m))
    assert upward == []


def test_function_level_imports_only_defer_heavy_dependencies():
    """A function-level import defers a heavy dependency on purpose, and its line or the one above says so."""
    bad = []
    for m, p in MODULES.items():
        lines = p.read_text().splitlines()
        for node, in_function, targets in _imports(m, p):
            if not in_function:
                continue
            comment = " ".join(lines[_block_start(lines, node.lineno - 1): node.end_lineno])
            if (targets[0].startswith("src") and m not in MAY_DEFER_SRC) or "deferred" not in comment:
                bad.append(f"{p.relative_to(SRC.parent)}:{node.lineno} {targets[0]}")
    assert bad == []


@pytest.mark.parametrize("path", sorted(p for p in SRC.rglob("*.py") if "integrations" not in p.parts),
                         ids=lambda p: str(p.relative_to(SRC.parent)))
def test_third_party_private_names_only_in_integrations(path):
    module = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    private = []
    for node, _, targets in _imports(module, path):
        for target in targets:
            parts = target.split(".")
            if parts[0] not in ("src", "__future__") and any(p.startswith("_") and not p.endswith("__") for p in parts):
                private.append(f"line {node.lineno}: {target}")
    private += [f"line {i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
                if THIRD_PARTY_PRIVATE.search(line)]
    assert private == []


def test_cli_help_is_generated_from_presets_and_defaults():
    from src.cli import build_parser
    from src.config import TrainParams
    from src.quantization.presets import PRESET_NAMES

    text = " ".join(build_parser().format_help().split())
    assert f"quantization preset: {', '.join(PRESET_NAMES)};" in text
    tp = TrainParams()
    assert f"(default: {tp.epochs})" in text and f"batch size (default: {tp.batch_size})" in text


def _documented_paths(text: str) -> set[str]:
    """Every `src/...` path named in a markdown text, with `a.py`, `b.py` cells split and `*` globs kept."""
    return {m for m in re.findall(r"`(src/[\w/.*]+)`", text)}


def test_architecture_doc_names_every_module_and_only_real_ones():
    root = SRC.parent
    doc = (root / "docs" / "architecture.md").read_text()
    modules = doc[doc.index("## One line per module"): doc.index("## Common changes")]
    named = _documented_paths(modules)
    # a table cell like `src/stages/sensitivity.py`, `sensitivity_cache.py` names a sibling without its folder
    for cell in re.findall(r"\| `(src/[\w/]+/)[\w.]+`((?:, `[\w.]+`)+)", modules):
        named |= {cell[0] + n for n in re.findall(r"`([\w.]+)`", cell[1])}
    missing = sorted(str(p.relative_to(root)) for p in SRC.rglob("*.py") if p.name != "__init__.py"
                     and not any(p.match(str(root / n)) for n in named))
    assert missing == []
    stale = sorted(n for n in named | _documented_paths(doc) if not list(root.glob(n)))
    assert stale == []


def test_readme_layout_table_names_real_paths():
    root = SRC.parent
    text = (root / "README.md").read_text()
    table = text[text.index("## Project layout"): text.index("## Basic usage")]
    named = _documented_paths(table)
    assert len(named) > 10
    assert sorted(n for n in named if not list(root.glob(n.rstrip("/")))) == []
    packages = {f"src/{p.name}/" for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert sorted(packages - named) == []
