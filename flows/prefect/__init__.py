"""The Prefect side: flows that wrap connectors and workflows, and their deployment. Only this package and the
gateway's Prefect backend know Prefect; `contract` (no Prefect import) is what both sides agree on."""
