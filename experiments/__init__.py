"""The user-facing layer: the ``cotune`` CLI, demos and reports (MLflow tracking and Optuna tuning land here)."""
