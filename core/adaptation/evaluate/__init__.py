"""Evaluation tasks: one module per task, each returning score rows."""
