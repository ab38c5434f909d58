"""How a run ends, in words both the gateway and the Prefect flows use: statuses, RunError, RunOutcome."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from connectors import failures
from connectors.failures import classify
from connectors.pipeline import ConnectorRunError, RunCancelled
from connectors.schema_contract import SchemaContractViolation
from connectors.secrets import scrub
from connectors.spec import ParamsError

if TYPE_CHECKING:  # the workflow engine (Jinja, the node types) is not loaded in a connector's flow run
    from flows.engine import WorkflowResult

QUEUED, RUNNING, CANCELLING = "queued", "running", "cancelling"
COMPLETED, FAILED, CANCELLED, CRASHED = "completed", "failed", "cancelled", "crashed"
ACTIVE = (RUNNING, CANCELLING)
TERMINAL = (COMPLETED, FAILED, CANCELLED, CRASHED)
STATUSES = (QUEUED, *ACTIVE, *TERMINAL)
# Error codes of a run cut off from outside (connectors.failures.CRASHED), and of one that lost its hold for now.
CRASH_CODES = frozenset({"process_died", "interrupted", "lease_expired", "cut_off", "executor_failed"})
TRANSIENT_CODES = frozenset({"lock_lost"})


@dataclass(frozen=True)
class RunError:
    """Why a run did not complete: a stable `code`, a message for people, the `step` it failed in, its
    `failure_class` (transient, crashed, terminal: connectors.failures) and whether running it again can help
    (`terminal`), plus the bad `field`, the failed workflow `nodes` or the schema `contract` that refused data
    (table, column, entity, mode) when known. A cancel has no class."""

    code: str
    message: str
    step: str | None = None
    terminal: bool | None = None
    field: str | None = None
    nodes: list[str] | None = None
    contract: dict[str, Any] | None = None
    failure_class: str | None = None

    def __post_init__(self) -> None:
        failure_class = self.failure_class
        if failure_class is None and self.code != "cancelled":
            failure_class = (failures.CRASHED if self.code in CRASH_CODES
                             else failures.TRANSIENT if self.code in TRANSIENT_CODES
                             else failures.TERMINAL if self.terminal is not False else None)
        object.__setattr__(self, "failure_class", failure_class)
        if self.terminal is None and failure_class is not None:
            object.__setattr__(self, "terminal", failure_class == failures.TERMINAL)

    def describe(self) -> str:
        """One line for the run's log: where it failed, the cause and its class."""
        where = f" in step {self.step}" if self.step else f" in node(s) {', '.join(self.nodes)}" if self.nodes else ""
        return f"failed{where} ({self.failure_class or 'no class'}, {self.code}): {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """As stored and shown on the run (unset facts left out)."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    # What a run is expected to raise: its error says all there is (anything else is logged with its traceback).
    EXPECTED = (RunCancelled, ConnectorRunError, ParamsError)

    @classmethod
    def of(cls, exc: BaseException) -> RunError:
        """The error for an exception a connector run raised."""
        if isinstance(exc, RunCancelled):
            return cls("cancelled", str(exc), step=exc.step)
        if isinstance(exc, SchemaContractViolation):
            return cls("schema_contract_violation", exc.message, step=exc.step, terminal=True, contract=exc.facts())
        if isinstance(exc, ConnectorRunError):
            return cls("connector_failed", exc.message, step=exc.step, failure_class=exc.failure_class)
        if isinstance(exc, ParamsError):
            return cls("invalid_params", exc.message, field=exc.field, terminal=True)
        return cls("internal_error", f"{type(exc).__name__}: {exc}", failure_class=classify(exc).failure_class)

    @classmethod
    def timed_out(cls, seconds: float) -> RunError:
        return cls("run_timeout", f"not finished within FLOWGATE_RUN_TIMEOUT_SECONDS ({seconds:g} s)")

    @classmethod
    def interrupted(cls) -> RunError:
        return cls("interrupted", "the gateway process shut down before the run finished")

    @classmethod
    def lease_expired(cls, owner: str | None) -> RunError:
        return cls("lease_expired", f"executor {owner} stopped renewing its lease; the process running this run died")

    @classmethod
    def process_died(cls, pid: int) -> RunError:
        """gunicorn's master saw the worker holding the run exit (SIGKILL, OOM): known at once, not after a lease."""
        return cls("process_died", f"the gateway worker running it (pid {pid}) died")

    @classmethod
    def no_lease(cls, owner: str | None) -> RunError:
        """An active run found without a lease: nothing renews it, so nothing runs it (still `lease_expired`)."""
        return cls("lease_expired", f"the run was left active without a lease (last held by executor {owner}); "
                                    "no process was running it")


@dataclass(frozen=True)
class RunOutcome:
    """How one execution ended: its status, its result (a load summary, a workflow's outputs) or its error."""

    status: str
    result: dict[str, Any] | None = None
    error: RunError | None = None

    @classmethod
    def failed(cls, error: RunError) -> RunOutcome:
        return cls(CANCELLED if error.code == "cancelled" else FAILED, None, error)

    @classmethod
    def of_workflow(cls, result: WorkflowResult) -> RunOutcome:
        """The outcome of a finished workflow (its summary is the result whatever the status)."""
        summary = {"workflow_id": result.workflow_id, "mode": result.mode, "layers": result.layers,
                   "duration_seconds": result.duration_seconds, "outputs": scrub(result.outputs)}
        if result.status == COMPLETED:
            return cls(COMPLETED, summary)
        if result.status == FAILED:
            failed = result.failed_nodes
            first = result.nodes[failed[0]].error or {}
            # The workflow's class is its first failed node's: a node that gave up on a 503 may pass next time.
            failure_class = first.get("failure_class", failures.TERMINAL)
            return cls(FAILED, summary, RunError("node_failed", first.get("message", f"node '{failed[0]}' failed"),
                                                 nodes=failed, failure_class=failure_class))
        return cls(result.status, summary, RunError("cancelled", "the workflow was cancelled"))
