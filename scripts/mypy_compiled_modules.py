"""mypy plugin: the loaders of ``sigma_fast._backends`` return the compiled modules.

``load_core()``, ``load_cuda()`` and ``require_backend("cpu" | "cuda")`` import ``sigma_fast._core``
/ ``sigma_fast._cuda`` dynamically (an import failure only disables a backend), so mypy would
type their result as ``Any`` and check no call into the compiled code. This plugin gives those
calls the module's type, and resolves attributes of that value in the module's stub
(``python/sigma_fast/_core.pyi``, ``_cuda.pyi``) instead of ``ModuleType.__getattr__`` (which
mypy uses for module values and which returns ``Any``), so every call site is checked against
the bindings' names, argument names and types. The ``None`` a loader returns when a backend is
unavailable is left out on purpose: the ops only call a module after dispatch chose its backend.

Enabled by ``[tool.mypy] plugins`` in pyproject.toml. It reads two mypy internals
(``ExpressionChecker.module_type``, ``Instance.extra_attrs``), hence the mypy 2.x pin of the
``test`` extra.
"""

from __future__ import annotations

from typing import Callable

from mypy import errorcodes
from mypy.nodes import CallExpr, RefExpr, StrExpr
from mypy.plugin import AttributeContext, FunctionContext, MethodContext, Plugin
from mypy.types import AnyType, Instance, Type, TypeOfAny

_BACKENDS = "sigma_fast._backends"
_LOADERS = {f"{_BACKENDS}.load_core": "sigma_fast._core",
            f"{_BACKENDS}.load_cuda": "sigma_fast._cuda"}
_BY_NAME = {"cpu": "sigma_fast._core", "cuda": "sigma_fast._cuda"}


def _module_type(ctx: FunctionContext | MethodContext, module: str) -> Type:
    tree = ctx.api.modules.get(module)  # type: ignore[attr-defined]
    if tree is None:
        return ctx.default_return_type
    return ctx.api.expr_checker.module_type(tree)  # type: ignore[attr-defined,no-any-return]


def _cached_loader_call(ctx: MethodContext) -> Type:
    """A call of an ``lru_cache``-wrapped function: ``load_core()`` or ``load_cuda()``?"""
    call = ctx.context
    if isinstance(call, CallExpr) and isinstance(call.callee, RefExpr):
        module = _LOADERS.get(call.callee.fullname)
        if module is not None:
            return _module_type(ctx, module)
    return ctx.default_return_type


def _require_backend_call(ctx: FunctionContext) -> Type:
    """``require_backend("cpu")`` / ``require_backend("cuda")`` with a literal name."""
    if ctx.args and ctx.args[0] and isinstance(ctx.args[0][0], StrExpr):
        module = _BY_NAME.get(ctx.args[0][0].value)
        if module is not None:
            return _module_type(ctx, module)
    return ctx.default_return_type


def _module_attribute(name: str) -> Callable[[AttributeContext], Type]:
    def hook(ctx: AttributeContext) -> Type:
        extra = ctx.type.extra_attrs if isinstance(ctx.type, Instance) else None
        if extra is None or extra.mod_name not in _BY_NAME.values():
            return ctx.default_attr_type
        if name in extra.attrs:
            return extra.attrs[name]
        ctx.api.fail(f'Module "{extra.mod_name}" has no attribute "{name}"', ctx.context,
                     code=errorcodes.ATTR_DEFINED)
        return AnyType(TypeOfAny.from_error)

    return hook


class CompiledModulesPlugin(Plugin):
    def get_additional_deps(self, file):  # type: ignore[no-untyped-def]
        # Load the stubs whenever the loaders' module is part of the build.
        if file.fullname == _BACKENDS:
            return [(10, module, -1) for module in _LOADERS.values()]
        return []

    def get_method_hook(self, fullname: str) -> Callable[[MethodContext], Type] | None:
        return _cached_loader_call if fullname == "functools._lru_cache_wrapper.__call__" else None

    def get_function_hook(self, fullname: str) -> Callable[[FunctionContext], Type] | None:
        return _require_backend_call if fullname == f"{_BACKENDS}.require_backend" else None

    def get_attribute_hook(self, fullname: str) -> Callable[[AttributeContext], Type] | None:
        # Attributes that a module value finds through ModuleType.__getattr__.
        prefix = "types.ModuleType."
        return _module_attribute(fullname[len(prefix):]) if fullname.startswith(prefix) else None


def plugin(version: str) -> type[Plugin]:
    return CompiledModulesPlugin
