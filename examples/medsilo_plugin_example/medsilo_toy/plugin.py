"""The module a run names in ``plugins``: importing it registers the ``tiny_mlp`` model and the
``toy_csv`` task. The server imports it to validate the run and build the first global model;
every site imports it before it builds the model, if the site lists it in its own ``plugins``.
"""

from medsilo_toy import model, task

__all__ = ["model", "task"]
