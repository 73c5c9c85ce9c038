"""Models by name: ``conf/model/<name>.yaml`` names a builder registered here.

A site builds the model the server names from its own copy of this registry, so the
server cannot make a hospital instantiate arbitrary code (no Hydra ``_target_`` for models).
A model of your own registers here from your package with ``@register_model("name")``; the
run names that module in ``plugins`` and each site imports it only if it lists it too
(docs/extending.md).

Our own families (``models/*.py``) are imported when a model of theirs is first built, not on
``import models``: which module registers which name is read from their source (the literal
``@register_model("name")`` decorators, as server/settings.py reads them). So a site or server
building the MLP never imports the recurrent family, nor Opacus through it (a second or more
of start-up in every process that builds a model).
"""

from __future__ import annotations

import ast
import functools
import importlib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

ModelBuilder = Callable[..., nn.Module]
_MODELS: dict[str, ModelBuilder] = {}


@functools.cache
def our_families() -> dict[str, tuple[str, str]]:
    """name -> (module, builder function) of every ``@register_model("name")`` on a top-level
    function in ``models/*.py``, read from source without importing anything."""
    families: dict[str, tuple[str, str]] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        source = path.read_text(encoding="utf-8")
        if "register_model(" not in source or path.name == "registry.py":
            continue
        for node in ast.parse(source, filename=str(path)).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if (isinstance(decorator, ast.Call) and isinstance(decorator.func, ast.Name)
                        and decorator.func.id == "register_model" and decorator.args
                        and isinstance(decorator.args[0], ast.Constant)):
                    families[decorator.args[0].value] = (f"models.{path.stem}", node.name)
    return families


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def decorate(builder: ModelBuilder) -> ModelBuilder:
        ours = our_families().get(name)
        if name in _MODELS:
            owner = _origin(_MODELS[name])
        elif ours is not None and ".".join(ours) != _origin(builder):
            owner = ".".join(ours)  # ours counts as registered before its module is imported
        else:
            owner = None
        if owner is not None:
            raise ValueError(f"model {name!r} is registered twice (by {owner} and by "
                             f"{_origin(builder)}); give the new model a name of its own")
        _MODELS[name] = builder
        return builder

    return decorate


def _builder(name: Any) -> ModelBuilder | None:
    """The builder registered as ``name``, importing our module that defines it if need be."""
    if name in _MODELS:
        return _MODELS[name]
    if not isinstance(name, str) or name not in our_families():
        return None
    module_name, function = our_families()[name]
    module = importlib.import_module(module_name)  # registers it (unless imported before)
    # imported before and the registry reset since (a test restoring it): the same function
    return _MODELS.setdefault(name, getattr(module, function))


def _origin(builder: ModelBuilder) -> str:
    return f"{getattr(builder, '__module__', '?')}.{getattr(builder, '__qualname__', builder)}"


def registered_models() -> list[str]:
    return sorted({*_MODELS, *our_families()})


def build_model(model_cfg: Mapping[str, Any], input_spec: Mapping[str, Any]) -> nn.Module:
    """Build ``model_cfg["name"]`` with its hyper-parameters for data described by ``input_spec``.

    ``input_spec`` comes from the task (e.g. channels, image size, number of classes).
    """
    params = dict(model_cfg)
    name = params.pop("name", None)
    builder = _builder(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; expected one of {registered_models()} (a "
                         "model of your own registers when its module is imported: name it in "
                         "plugins, docs/extending.md)")
    if "opacus" in sys.modules:
        # Opacus may wrap this model (make_private, GradSampleModule): our layers need our
        # per-sample gradient samplers by then, and registering costs nothing once it is loaded
        from models import register_grad_samplers

        register_grad_samplers()
    try:
        return builder(**params, **dict(input_spec))
    except TypeError as err:  # e.g. another model's keys under model.*: name what was passed
        raise TypeError(f"model {name!r} ({_origin(builder)}) cannot be built with model "
                        f"settings {params} and task spec {dict(input_spec)}: {err} (the keys "
                        f"of conf/model/{name}.yaml and task.spec)") from err
