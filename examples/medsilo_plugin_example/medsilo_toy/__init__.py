"""medsilo_toy: a model and a task of one's own, outside medsilo's source tree (docs/extending.md).

Kept empty on purpose: Hydra imports this package to read ``conf/`` (``pkg://medsilo_toy.conf``)
while it composes the configuration, before validation; what registers code lives in
:mod:`medsilo_toy.plugin` (sites and server) and :mod:`medsilo_toy.synthetic` (simulation only).
"""
