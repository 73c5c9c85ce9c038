"""Model families, registered by name (see ``models/registry.py``).

Every module in this package registers its builders on import; a new family is a new file.
A family's module is imported when a model of it is first built (``build_model``), so
``import models`` costs only the registry, and a run without DP never imports Opacus: the DP
path calls :func:`register_grad_samplers` before Opacus wraps a model.
"""

from models.registry import build_model, register_model, registered_models


def register_grad_samplers() -> None:
    """Register our per-sample gradient samplers with Opacus (imports it); idempotent.

    Opacus picks a layer's sampler when it wraps the model (``make_private``,
    ``GradSampleModule``), by the layer's exact type, so this runs before that:
    ``models.layers.Linear`` has no sampler otherwise (Opacus would fall back to functorch,
    which its input-gradient-only backward defeats), and ``nn.Conv2d`` / ``nn.Embedding`` get
    our faster exact ones (models/dp_conv.py, models/dp_embedding.py) in place of Opacus's.
    ``build_model`` calls it too whenever Opacus is already loaded.
    """
    from models import dp_conv, dp_embedding, dp_recurrent  # noqa: F401  (register on import)
    from models.layers import register_linear_grad_sampler

    register_linear_grad_sampler()


__all__ = ["build_model", "register_grad_samplers", "register_model", "registered_models"]
