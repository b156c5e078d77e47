"""The house's floor plan, read from the source: no import cycles, and no module importing from a stage above
its own (imports under `if TYPE_CHECKING:` are for type hints only and are not counted)."""

import ast
from pathlib import Path

import nanosae

ROOT = Path(nanosae.__file__).parent
# lowest first: a module may import from its own stage and the ones below it
STAGES = [
    {"errors", "io"},
    {"registry", "config", "outputs"},
    {"sae", "models"},
    {"rundir", "data"},
    {"eval"},
    {"train"},
    {"interp"},
    {"export"},
    {"viewer"},
    {"options", "cli", "demo", "diff_demo", "__init__", "__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("nanosae", *parts)).removesuffix(".__init__")


def stage_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(STAGES) if top in names)


def imports(path: Path, known: set[str]) -> set[str]:
    """The nanosae modules a file imports, anywhere in it but under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for child in node.body
        for n in ast.walk(child)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanosae") and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("nanosae")}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: imports(path, set(files)) - {name} for name, path in files.items()}


def test_every_module_has_a_stage():
    assert all(stage_of(m) >= 0 for m in graph())


def test_no_module_imports_from_a_stage_above_its_own():
    upward = sorted(
        f"{m} -> {d}" for m, deps in graph().items() for d in deps if d != "nanosae" and stage_of(d) > stage_of(m)
    )
    assert upward == []


def test_no_import_cycles():
    g = graph()
    # a package's __init__ re-exports its modules: an edge from a module to its own package is not a cycle
    g = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in g.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d) :] + [d]))
            elif d in g and not state.get(d):
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if not state.get(m):
            visit(m, [m])
    assert cycles == []
