"""The package's layering (DESIGN.md §2): the ops library at the top of the package, the SIGMA
application in ``rec``, the serving layer in ``serving``, the command line in ``apps``; imports
only go down that stack, and no two modules import each other, directly or in a circle.

Read from the source with ``ast`` (every import counts, also those inside functions)."""

import ast
from pathlib import Path

import sigma_fast

ROOT = Path(sigma_fast.__file__).parent
PACKAGE = "sigma_fast"
# Layer of a module: the first subpackage under sigma_fast, else "ops". Lower number = lower layer.
LAYERS = {"ops": 0, "reference": 0, "triton": 0, "rec": 1, "serving": 2, "apps": 3}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str) -> bool:
    return (ROOT.parent / Path(*name.split("."))).is_dir()


def _imports(path: Path) -> set[str]:
    """Fully qualified sigma_fast modules imported by the file (``from . import x`` counts as
    importing the module ``x`` when x is one)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == PACKAGE}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PACKAGE:
                continue
            subs = [f"{target}.{a.name}" for a in node.names]
            found = [s for s in subs if (ROOT.parent / (s.replace(".", "/") + ".py")).is_file()
                     or _is_package(s)]
            out |= set(found) if found else {target}
    return out


def _layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 and parts[1] in LAYERS else 0


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def test_imports_only_go_down_the_layers():
    bad = [f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})"
           for mod, deps in _graph().items() for dep in deps if _layer(dep) > _layer(mod)]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    """Edges into a package's __init__ are left out (importing a submodule imports its parent
    package; that is how Python works, not a circle in our design)."""
    graph = {m: {d for d in deps if d != m and not _is_package(d)}
             for m, deps in _graph().items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "\n".join(cycles)


def test_every_op_has_one_stem_everywhere():
    """Each op's twins are found by one stem: python, reference, triton, csrc, cuda, tests."""
    repo = ROOT.parents[1]
    for stem, twins in {
        "rq": ["python/sigma_fast/rq.py", "python/sigma_fast/reference/rq.py",
               "python/sigma_fast/triton/rq.py", "tests/ops/test_rq_parity.py"],
        "beam_step": ["python/sigma_fast/beam_step.py", "python/sigma_fast/reference/beam_step.py",
                      "python/sigma_fast/triton/beam_step.py", "tests/ops/test_beam_step.py"],
        "apf": ["python/sigma_fast/apf.py", "python/sigma_fast/reference/apf.py",
                "python/sigma_fast/triton/apf.py", "tests/ops/test_apf_parity.py"],
        "item_index": ["python/sigma_fast/item_index.py",
                       "python/sigma_fast/reference/item_index.py",
                       "tests/ops/test_item_index.py"],
        "trie": ["python/sigma_fast/trie.py", "python/sigma_fast/reference/trie.py",
                 "tests/ops/test_trie.py"],
    }.items():
        if not (repo / "csrc").is_dir():  # an installed package, not a source checkout
            return
        twins = twins + [f"csrc/{stem}_cpu.cpp", f"csrc/bindings_{stem}.cpp"]
        missing = [t for t in twins if not (repo / t).is_file()]
        assert not missing, f"{stem}: {missing}"
