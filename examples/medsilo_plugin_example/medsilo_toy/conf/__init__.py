"""Hydra configs of the plugin: hydra.searchpath=[pkg://medsilo_toy.conf] (Hydra finds a pkg://
search path only in a package: this file makes conf/ one)."""
