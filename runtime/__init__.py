"""Shared run-time plumbing: config/recipe validation, environment config, MLflow tracking."""
