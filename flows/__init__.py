"""Prefect flows and the workflow engine; they wrap the same plain functions the local executor calls."""
