"""Connectors: dlt pipelines declared in YAML, run by plain functions that know nothing of who runs them."""
