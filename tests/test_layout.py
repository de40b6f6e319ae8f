"""The layout stays true: every import of src/ownlm (module level or inside a function) goes to the same stage
or an earlier one, and no modules import each other in a circle. The stages are the map in ownlm/__init__.py."""

import ast
from pathlib import Path

import ownlm

SRC = Path(ownlm.__file__).parent
# Earliest first. A module belongs to the first entry whose name is it or a package above it.
STAGES = [
    ("shared bottom", ["ownlm", "ownlm.errors", "ownlm.settings", "ownlm.fsutil", "ownlm.device", "ownlm.basemodel"]),
    ("bitdelta", ["ownlm.bitdelta"]),
    ("artifact", ["ownlm.artifact"]),
    ("capture", ["ownlm.capture"]),
    ("store", ["ownlm.store"]),
    ("learn", ["ownlm.learn"]),
    ("engine", ["ownlm.engine"]),
    ("evaluate", ["ownlm.evaluate"]),
    ("node", ["ownlm.node"]),
    ("privacy", ["ownlm.privacy"]),
    ("cluster", ["ownlm.cluster"]),
    ("loop", ["ownlm.loop"]),
    ("api", ["ownlm.api"]),
    ("demo", ["ownlm.demo"]),
    ("cli", ["ownlm.cli", "ownlm.__main__"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def stage_of(module: str) -> int:
    best = None
    for i, (_, names) in enumerate(STAGES):
        for n in names:
            if (module == n or module.startswith(n + ".")) and (best is None or len(n) > best[1]):
                best = (i, len(n))
    assert best is not None, f"{module} is in no stage: add it to STAGES and to the map in ownlm/__init__.py"
    return best[0]


def _known(name: str) -> str:
    """The module of this tree that an imported name lives in (a.b.c → a.b when c is a name inside a.b)."""
    while name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports(module: str) -> set[str]:
    """Every module of ownlm that `module` imports, wherever in the file the import stands."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "ownlm":
                    assert a.name in MODULES, f"{module} imports {a.name}, which is no module of ownlm"
                    out.add(a.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            if base.split(".")[0] != "ownlm":
                continue
            assert base in MODULES or (SRC.parent / base.replace(".", "/")).is_dir(), \
                f"{module} imports from {base}, which is no module of ownlm"
            for a in node.names:  # `from pkg import submodule` imports the submodule; `from mod import name` the module
                out.add(_known(f"{base}.{a.name}"))
    out.discard(module)
    return out


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_stage():
    for m in MODULES:
        stage_of(m)


def test_no_import_runs_back_up_the_stages():
    back = [f"{m} ({STAGES[stage_of(m)][0]}) imports {d} ({STAGES[stage_of(d)][0]})"
            for m, deps in sorted(GRAPH.items()) for d in sorted(deps) if stage_of(d) > stage_of(m)]
    assert back == [], "imports from a later stage:\n" + "\n".join(back)


def test_no_circle_of_imports():
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []
    circles = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                circles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert circles == [], "modules that import each other in a circle:\n" + "\n".join(circles)


def test_the_checker_sees_a_back_import_and_a_circle(monkeypatch):
    """The checks above can fail: a store module importing the loop, and two modules importing each other."""
    fake = {**GRAPH, "ownlm.store.db": GRAPH["ownlm.store.db"] | {"ownlm.loop"}}
    assert any(stage_of(d) > stage_of("ownlm.store.db") for d in fake["ownlm.store.db"])
    monkeypatch.setitem(GRAPH, "ownlm.errors", GRAPH["ownlm.errors"] | {"ownlm.settings"})
    monkeypatch.setitem(GRAPH, "ownlm.settings", GRAPH["ownlm.settings"] | {"ownlm.errors"})
    try:
        test_no_circle_of_imports()
    except AssertionError as e:
        assert "ownlm.errors -> ownlm.settings -> ownlm.errors" in str(e)
    else:
        raise AssertionError("a circle was not found")


def test_the_map_in_the_package_docstring_names_every_stage():
    doc = ownlm.__doc__
    for name, modules in STAGES[1:]:
        assert any(m.removeprefix("ownlm.").replace(".", "/") in doc for m in modules), f"{name} missing from the map"
