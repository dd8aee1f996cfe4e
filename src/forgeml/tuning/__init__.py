"""Hyperparameter search with Optuna: the space (space.py) and the study that runs it (study.py)."""
