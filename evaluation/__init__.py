"""Evaluation helpers behind ``eval.py``: subsets, the linear probe, per-setting measurements (features,
XLA FLOPs, throughput), method x budget sweeps, tables and plots."""

from evaluation.probe import RidgeProbe, fit_ridge_probe
from evaluation.sweep import Backbone, SweepSettings, plan, resolve_methods, run_sweep

__all__ = ["Backbone", "RidgeProbe", "SweepSettings", "fit_ridge_probe", "plan", "resolve_methods", "run_sweep"]
