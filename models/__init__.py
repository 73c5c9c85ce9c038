"""Model families, registered by name (see ``models/registry.py``)."""

from models.registry import build_model, register_model, registered_models

# Importing the family modules registers them.
from models import cnn  # noqa: E402,F401

__all__ = ["build_model", "register_model", "registered_models"]
