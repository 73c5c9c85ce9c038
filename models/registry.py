"""Models by name: ``conf/model/<name>.yaml`` names a builder registered here.

A site builds the model the server names from its own copy of this registry, so the
server cannot make a hospital instantiate arbitrary code (no Hydra ``_target_`` for models).
A model of your own registers here from your package with ``@register_model("name")``; the
run names that module in ``plugins`` and each site imports it only if it lists it too
(docs/extending.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

ModelBuilder = Callable[..., nn.Module]
_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def decorate(builder: ModelBuilder) -> ModelBuilder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice (by {_origin(_MODELS[name])} "
                             f"and by {_origin(builder)}); give the new model a name of its own")
        _MODELS[name] = builder
        return builder

    return decorate


def _origin(builder: ModelBuilder) -> str:
    return f"{getattr(builder, '__module__', '?')}.{getattr(builder, '__qualname__', builder)}"


def registered_models() -> list[str]:
    return sorted(_MODELS)


def build_model(model_cfg: Mapping[str, Any], input_spec: Mapping[str, Any]) -> nn.Module:
    """Build ``model_cfg["name"]`` with its hyper-parameters for data described by ``input_spec``.

    ``input_spec`` comes from the task (e.g. channels, image size, number of classes).
    """
    params = dict(model_cfg)
    name = params.pop("name", None)
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {registered_models()} (a "
                         "model of your own registers when its module is imported: name it in "
                         "plugins, docs/extending.md)")
    builder = _MODELS[name]
    try:
        return builder(**params, **dict(input_spec))
    except TypeError as err:  # e.g. another model's keys under model.*: name what was passed
        raise TypeError(f"model {name!r} ({_origin(builder)}) cannot be built with model "
                        f"settings {params} and task spec {dict(input_spec)}: {err} (the keys "
                        f"of conf/model/{name}.yaml and task.spec)") from err
