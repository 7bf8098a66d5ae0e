"""The layer contract of the package, read from its source (function-body imports included).

- Every memaudit module belongs to one layer of :data:`LAYERS` (lowest first); a module imports only from its own
  layer or lower ones, never a higher one, not even inside a function (diffusers' rule: models never import
  pipelines).
- No import circle among memaudit modules, function-body imports included.
- An import of a memaudit module inside a function is listed in :data:`LAZY` with its reason (an optional dependency
  or a measured import cost); anything else belongs at the module's top.
- Only ``memaudit.cli`` imports typer or rich; only ``memaudit.distributed`` imports ray.
- No private name (``_x``) is imported from another memaudit module.

Each check fails naming the module, the line and what to do, so a change that breaks the layering says where.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import memaudit

PACKAGE = Path(memaudit.__file__).resolve().parent

#: lowest first; a module belongs to the first layer with a prefix it starts with (longest prefix wins)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("memaudit.core",)),
    ("infrastructure", ("memaudit.distributed", "memaudit.tokenizers", "memaudit.images")),
    ("families", ("memaudit.families",)),
    ("models", ("memaudit.target", "memaudit.data", "memaudit.models", "memaudit.testing",
                "memaudit.tiny_families")),
    ("sampling and features", ("memaudit.detectors", "memaudit.sampling", "memaudit.latents", "memaudit.features",
                               "memaudit.index")),
    ("scores", ("memaudit.attacks", "memaudit.metrics")),
    ("tuning", ("memaudit.peft", "memaudit.training", "memaudit.baselines")),
    ("report", ("memaudit.report",)),
    ("workflows", ("memaudit.audit", "memaudit.finetune")),
    ("mitigation", ("memaudit.mitigate",)),
    ("demo", ("memaudit.demo",)),
    ("cli", ("memaudit.cli", "memaudit.__main__")),
    ("package", ("memaudit",)),  # the package's lazy public API (memaudit/__init__.py)
]

#: in-function imports of memaudit modules, (importer, imported) -> why it is not at the top
LAZY: dict[tuple[str, str], str] = {
    ("memaudit", "memaudit.target"): "`import memaudit` stays light (no torch/diffusers) until the API is used",
    ("memaudit", "memaudit.data"): "`import memaudit` stays light until the API is used",
    ("memaudit", "memaudit.core.errors"): "`import memaudit` stays light until the API is used",
    # the CLI imports the work of a command when it runs: `import memaudit.cli` takes 0.4 s, the audit, fine-tune
    # and model modules 4.5 to 5.7 s each (torch, diffusers; measured with /usr/bin/time on two CPU cores), so
    # `memaudit --help` and a mistyped option answer at once
    **{("memaudit.cli.audit", m): "measured import cost (torch, diffusers): the CLI stays fast"
       for m in ("memaudit.models", "memaudit.target", "memaudit.audit", "memaudit.report", "memaudit.demo.run",
                 "memaudit.demo.settings", "memaudit.detectors", "memaudit.families")},
    ("memaudit.cli.finetune", "memaudit.finetune"): "measured import cost (torch, diffusers): the CLI stays fast",
    ("memaudit.cli.finetune", "memaudit.training"): "measured import cost (torch): the CLI stays fast",
    **{("memaudit.cli.mitigate", m): "measured import cost (torch, diffusers): the CLI stays fast"
       for m in ("memaudit.mitigate.search", "memaudit.mitigate.finetune", "memaudit.peft")},
    ("memaudit.cli.progress", "memaudit.report"): "measured import cost (matplotlib, numpy): the CLI stays fast",
}

#: optional or heavy third-party packages only one layer may import
OWNERS = {"typer": ("memaudit.cli",), "rich": ("memaudit.cli",), "ray": ("memaudit.distributed",)}


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # the memaudit module (or third-party top-level package)
    names: tuple[str, ...]
    line: int
    in_function: bool


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(known: dict[str, Path]) -> list[Import]:
    out = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        inner = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(a.name, ()) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = module if path.name == "__init__.py" else module.rpartition(".")[0]
                for _ in range(max(node.level - 1, 0)):
                    base = base.rpartition(".")[0]
                source = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
                targets = []
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    targets.append((full, ()) if full in known else (source, (alias.name,)))
            else:
                continue
            for target, names in targets:
                if target == "memaudit" or target.startswith("memaudit."):
                    resolved = resolve(target, known)
                    if resolved and resolved != module:
                        out.append(Import(module, resolved, names, node.lineno, id(node) in inner))
                else:
                    out.append(Import(module, target.partition(".")[0], names, node.lineno, id(node) in inner))
    return out


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer of tests/test_layers.py: add it to LAYERS"
    return rank


KNOWN = modules()
IMPORTS = imports(KNOWN)
INTERNAL = [i for i in IMPORTS if i.imported == "memaudit" or i.imported.startswith("memaudit.")]


def where(i: Import) -> str:
    return f"{KNOWN[i.importer].relative_to(PACKAGE.parent)}:{i.line}"


def test_every_module_has_a_layer():
    for module in KNOWN:
        layer_of(module)


def upward(i: Import) -> bool:
    # the version string is the one name of the package itself any layer may read (memaudit/__init__.py defines it
    # without importing anything)
    return layer_of(i.imported) > layer_of(i.importer) and not (i.imported == "memaudit" and i.names == ("__version__",))


def test_no_module_imports_a_higher_layer():
    bad = [f"{where(i)}: {i.importer} ({LAYERS[layer_of(i.importer)][0]}) imports {i.imported} "
           f"({LAYERS[layer_of(i.imported)][0]})" for i in INTERNAL if upward(i)]
    assert not bad, "lower layers never import higher ones; move the code down or pass it in:\n" + "\n".join(bad)


def test_no_import_circle():
    edges: dict[str, set[str]] = {m: set() for m in KNOWN}
    for i in INTERNAL:
        if i.imported != "memaudit":
            edges[i.importer].add(i.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(" <-> ".join(sorted(comp)))

    for v in KNOWN:
        if v not in index:
            visit(v)
    assert not circles, "import circles (function-body imports counted):\n" + "\n".join(circles)


def test_function_body_imports_of_memaudit_modules_are_listed_with_a_reason():
    found = {(i.importer, i.imported) for i in INTERNAL if i.in_function}
    unlisted = sorted(f"{where(i)}: {i.importer} imports {i.imported} inside a function"
                      for i in INTERNAL if i.in_function and (i.importer, i.imported) not in LAZY)
    assert not unlisted, ("move these imports to the module's top, or list them in LAZY with the optional dependency "
                          "or measured import cost that keeps them inside:\n" + "\n".join(unlisted))
    stale = sorted(f"{a} -> {b}" for a, b in LAZY if (a, b) not in found)
    assert not stale, "LAZY lists imports that are no longer inside a function; remove them:\n" + "\n".join(stale)


def test_only_their_owners_import_typer_rich_and_ray():
    bad = [f"{where(i)}: {i.importer} imports {i.imported}" for i in IMPORTS if i.imported in OWNERS
           and not any(i.importer == o or i.importer.startswith(o + ".") for o in OWNERS[i.imported])]
    assert not bad, "only memaudit.cli imports typer and rich, only memaudit.distributed imports ray:\n" + "\n".join(bad)


def test_no_private_name_is_imported_from_another_module():
    bad = [f"{where(i)}: {i.importer} imports {name} from {i.imported}" for i in INTERNAL for name in i.names
           if name.startswith("_") and not name.startswith("__")]
    assert not bad, "give these names a public name in their module, or keep them where they are used:\n" + \
        "\n".join(bad)


def test_the_contract_catches_a_violation(tmp_path):
    """The checks above are not vacuous: a planted upward import, circle and private import are each found."""
    assert layer_of("memaudit.core.io") < layer_of("memaudit.audit") < layer_of("memaudit.cli")
    fake = {"memaudit.core.x": tmp_path / "x.py", "memaudit.audit.y": tmp_path / "y.py"}
    fake["memaudit.core.x"].write_text("def f():\n    from memaudit.audit.y import _private\n")
    fake["memaudit.audit.y"].write_text("from memaudit.core.x import f\n")
    found = imports(fake)
    up = [i for i in found if upward(i)]
    assert [(i.importer, i.imported, i.names, i.in_function) for i in up] == \
        [("memaudit.core.x", "memaudit.audit.y", ("_private",), True)]
    assert {(i.importer, i.imported) for i in found} == {("memaudit.core.x", "memaudit.audit.y"),
                                                         ("memaudit.audit.y", "memaudit.core.x")}
