"""The type stubs of the compiled modules (``_core.pyi``, ``_cuda.pyi``, shipped beside them)
match the bindings: the same public names, and for every function the same parameters in the
same order, with the same defaults and compatible types (read from the signatures pybind11
writes into the docstrings)."""

import ast
import importlib
import re
from pathlib import Path

import pytest

import sigma_fast

# pybind11 2.x writes `int` / `float`; 3.x writes the protocols it accepts.
_BINDING_TYPES = {
    "typing.SupportsInt | typing.SupportsIndex": "int",
    "typing.SupportsFloat | typing.SupportsIndex": "float",
    "int": "int", "float": "float", "bool": "bool", "str": "str", "None": "None",
    "numpy.ndarray": "array",
    "object": "array | None",  # every py::object argument of the bindings is an optional array
    "tuple": "tuple", "dict": "dict",
}
_STUB_ARRAYS = {"_F32", "_I64", "_Codes", "_Bool"}


def _stub_type(node):
    if node is None:
        return "None"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        return f"{_stub_type(node.left)} | {_stub_type(node.right)}"
    text = ast.unparse(node)
    if text in _STUB_ARRAYS:
        return "array"
    return re.sub(r"\[.*\]$", "", text)  # tuple[...] -> tuple, dict[...] -> dict


def _stub_signatures(path: Path):
    tree = ast.parse(path.read_text())
    functions, attributes = {}, {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            args = node.args.args
            defaults = [None] * (len(args) - len(node.args.defaults)) + [
                ast.literal_eval(d) if not (isinstance(d, ast.Constant) and d.value is None)
                else "None" for d in node.args.defaults]
            functions[node.name] = (
                [(a.arg, _stub_type(a.annotation), d) for a, d in zip(args, defaults)],
                _stub_type(node.returns))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            attributes[node.target.id] = ast.unparse(node.annotation)
    return functions, attributes


def _split_params(text: str):
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i].strip())
            start = i + 1
    if text[start:].strip():
        out.append(text[start:].strip())
    return out


def _binding_signature(fn):
    first = (fn.__doc__ or "").splitlines()[0]
    m = re.fullmatch(rf"{fn.__name__}\((.*)\) -> (.+)", first)
    assert m, f"unexpected pybind11 signature line: {first!r}"
    params = []
    for p in _split_params(m.group(1)):
        pm = re.fullmatch(r"(\w+): (.+?)(?: = (.+))?", p)
        assert pm, f"{fn.__name__}: cannot read parameter {p!r}"
        name, typ, default = pm.groups()
        default = None if default is None else (
            "None" if default == "None" else ast.literal_eval(default))
        params.append((name, _BINDING_TYPES.get(typ, typ), default))
    return params, _BINDING_TYPES.get(m.group(2), m.group(2))


def _module_or_skip(name):
    if name == "_core":
        assert sigma_fast.backends()["cpu"], sigma_fast.backends()["cpu"].reason
        return importlib.import_module("sigma_fast._core")
    if sigma_fast.build_info().get("cuda") not in ("ON", "TRUE", "1", "YES"):
        pytest.skip("the CUDA extension was not built in this installation")
    try:
        return importlib.import_module("sigma_fast._cuda")
    except ImportError as exc:
        pytest.skip(f"the CUDA extension does not import here: {exc}")


@pytest.mark.parametrize("name", ["_core", "_cuda"])
def test_stub_matches_bindings(name):
    module = _module_or_skip(name)
    stub = Path(module.__file__).with_name(f"{name}.pyi")
    assert stub.is_file(), f"{stub} is not installed beside {module.__file__}"
    functions, attributes = _stub_signatures(stub)

    public = {n for n in dir(module) if not n.startswith("_")}
    runtime_functions = {n for n in public if callable(getattr(module, n))}
    assert set(functions) == runtime_functions
    assert set(attributes) == public - runtime_functions
    for attr, annotation in attributes.items():
        assert type(getattr(module, attr)).__name__ == annotation, attr

    for fn_name, (stub_params, stub_return) in functions.items():
        params, returns = _binding_signature(getattr(module, fn_name))
        assert stub_params == params, fn_name
        assert stub_return == returns, fn_name


def test_package_is_typed():
    assert (Path(sigma_fast.__file__).parent / "py.typed").is_file()
