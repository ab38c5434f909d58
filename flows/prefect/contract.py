"""What the gateway and the Prefect flows agree on: flow and deployment names, artifact keys, state → status."""
from __future__ import annotations

import re

from flows.outcome import CANCELLED, CANCELLING, COMPLETED, CRASHED, FAILED, QUEUED, RUNNING

FLOW_NAME = "flowgate-connector"  # the connector flow in flows/prefect/connector_flow.py
SUMMARY_ARTIFACT_PREFIX = "flowgate-summary"  # key prefix of the table artifact holding a run's load summary
WORKFLOW_FLOW_NAME = "flowgate-workflow"  # the workflow flow in flows/prefect/workflow_flow.py
WORKFLOW_DEPLOYMENT = "workflow"  # its one deployment: the definition is a parameter of each flow run
WORKFLOW_ARTIFACT_PREFIX = "flowgate-workflow"  # key prefix of the artifact holding a workflow run's nodes
SCHEDULE_TAG = "flowgate-schedule"  # on a flow run the gateway created for a schedule's slot (and `<tag>:<slot>`)
RUN_TAG_PREFIX = "flowgate-run:"  # a flow run's tag naming its run, so a create whose answer was lost is found
TRACE_TAG_PREFIX = "trace:"  # a flow run's tag naming the W3C trace id of its run, to find it in Prefect's UI
# Prefect's own label for a flow run's parent span (prefect.telemetry.run_telemetry): Prefect's engine starts
# the flow run's span under it, and the flow continues the run's trace from it.
TRACEPARENT_LABEL = "__OTEL_TRACEPARENT"
ERROR_ARTIFACT_PREFIX = "flowgate-error"  # key prefix of the table artifact holding a failed run's error and class

# Prefect state type -> flowgate status (SCHEDULED covers Late; PAUSED waits like a queued run).
STATE_TO_STATUS = {
    "SCHEDULED": QUEUED, "PENDING": QUEUED, "PAUSED": QUEUED, "RUNNING": RUNNING, "CANCELLING": CANCELLING,
    "COMPLETED": COMPLETED, "FAILED": FAILED, "CANCELLED": CANCELLED, "CRASHED": CRASHED,
}


def summary_artifact_key(connector_id: str) -> str:
    """The load summary's artifact key (keys allow lowercase letters, digits and dashes only)."""
    return f"{SUMMARY_ARTIFACT_PREFIX}-{re.sub(r'[^a-z0-9-]+', '-', connector_id.lower())}"


def workflow_artifact_key(run_id: str) -> str:
    """The key of the artifact a workflow flow run publishes its nodes under."""
    return f"{WORKFLOW_ARTIFACT_PREFIX}-{run_id}"


def run_tag(run_id: str) -> str:
    """The tag a run's flow run carries."""
    return f"{RUN_TAG_PREFIX}{run_id}"


def trace_tag(trace_id: str) -> str:
    """The tag naming a flow run's trace."""
    return f"{TRACE_TAG_PREFIX}{trace_id}"
def attempt_tag(run_id: str, attempt: int) -> str:
    """The tag that tells the flow runs of one run's attempts apart (a retry is a new flow run of the same run)."""
    return f"flowgate-attempt:{run_id}:{attempt}"


def error_artifact_key(connector_id: str) -> str:
    """The key of the artifact a failed connector flow run publishes its error (code, step, class) under."""
    return f"{ERROR_ARTIFACT_PREFIX}-{re.sub(r'[^a-z0-9-]+', '-', connector_id.lower())}"


def adopted_run_key(flow_run_id: str) -> str:
    """The idempotency key of the run a gateway makes for a flow run someone started in Prefect (adopted)."""
    return f"prefect-flow-run:{flow_run_id}"


def tagged_run_id(tags: list[str]) -> str | None:
    """The run id a flow run's tags name (None for a flow run flowgate did not create, e.g. a scheduled one)."""
    return next((tag.removeprefix(RUN_TAG_PREFIX) for tag in tags if tag.startswith(RUN_TAG_PREFIX)), None)
