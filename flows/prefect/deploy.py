"""Register one Prefect deployment per connector (concurrency limit 1) and one for workflows; idempotent.

    python -m flows.prefect.deploy [--pool flowgate]      (PREFECT_API_URL must point at the server)

No deployment carries a schedule: the gateway is the only scheduler (app/scheduler.py). It creates one flow run
per slot from these deployments when Prefect can take the run, and runs the slot locally when it cannot; a
schedule in Prefect as well would run each slot twice. Deploying removes the schedules (and the runs they had
scheduled) that earlier versions registered.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.exceptions import ObjectAlreadyExists

from connectors.registry import ConnectorRegistry
from connectors.spec import ConnectorSpec
from flows.prefect.connector_flow import connector_flow
from flows.prefect.contract import FLOW_NAME, WORKFLOW_DEPLOYMENT
from flows.prefect.workflow_flow import workflow_flow
from flows.runtime import RuntimeSettings

ROOT = Path(__file__).resolve().parents[2]
# Deployments registered from the old paths (flows/connector_flow.py, flows/workflow_flow.py) are updated in
# place by the next `make deploy`: they keep their names, so the gateway's lookups carry on.
ENTRYPOINT = "flows/prefect/connector_flow.py:connector_flow"
WORKFLOW_ENTRYPOINT = "flows/prefect/workflow_flow.py:workflow_flow"
DEFAULT_POOL = "flowgate"
# How the process worker starts a flow run without the launcher: one `<python> -m prefect.engine`, which runs the
# pull step and imports the flow itself. Left unset, Prefect 3.8 starts a workspace supervisor first (a second Python
# process that imports Prefect, prepares the workspace, then execs the engine): 1-2 s more CPU per flow run on this
# 2-core machine, for dependency installs flowgate does not use. <python> is the interpreter this deploy runs on, by
# its path: a worker started as `.venv/bin/prefect worker start` keeps the system's PATH, where a bare `python` is
# another interpreter without flowgate's requirements, and every flow run crashed.
ENGINE_COMMAND = f"{shlex.quote(sys.executable)} -m prefect.engine"
# What the deployments' flow runs start as: flows/prefect/launch.py, a standard-library script that hands the flow
# run to this host's launcher (flows/prefect/launcher.py: forked from a process with Prefect, dlt and the flows
# imported) and runs ENGINE_COMMAND in its own place when no launcher listens. Same interpreter, by its path; `-S`
# (no site-packages) because the script needs only the standard library. The stack and the Docker image deploy from
# the interpreter their workers run on; a worker elsewhere takes `--engine-command`.
LAUNCH_COMMAND = f"{shlex.quote(sys.executable)} -S {shlex.quote(str(ROOT / 'flows' / 'prefect' / 'launch.py'))}"
log = logging.getLogger(__name__)


def schedule_note(registry: ConnectorRegistry) -> str:
    """What `make deploy` says about schedules: none in Prefect, and who fires the declared ones."""
    scheduled = [spec.id for spec in registry if spec.schedule is not None]
    fired = (f"; the gateway fires the {len(scheduled)} declared ({', '.join(scheduled)}) as flow runs of these "
             "deployments, tagged flowgate-schedule, or locally when Prefect cannot take them") if scheduled else ""
    return f"schedules: none registered in Prefect (the gateway is the only scheduler){fired}"


def command_note(engine_command: str) -> str:
    """What `make deploy` says about how the deployments' flow runs start."""
    if engine_command == LAUNCH_COMMAND:
        return (f"flow runs start as: {engine_command} (forked by this host's launcher, `python -m "
                f"flows.prefect.launcher`, when it listens; otherwise it runs {ENGINE_COMMAND})")
    return f"flow runs start as: {engine_command or 'Prefect default (workspace supervisor, then the engine)'}"


def ensure_work_pool(pool: str) -> None:
    """Create the process work pool unless it exists."""
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            log.info("created work pool %s", pool)
        except ObjectAlreadyExists:
            pass


def job_variables(engine_command: str) -> dict[str, str]:
    """The deployments' job variables: the flow runs' start command, unless Prefect's default is asked for."""
    return {"command": engine_command} if engine_command else {}


def deploy_connector(spec: ConnectorSpec, pool: str, engine_command: str = LAUNCH_COMMAND) -> str:
    """Create or update the deployment `<flow>/<connector id>`; returns its id."""
    # from_source is sync_compatible, typed Flow | Coroutine: outside an event loop it returns the Flow
    deployment_id = connector_flow.from_source(  # type: ignore[union-attr]
        source=str(ROOT), entrypoint=ENTRYPOINT).deploy(
        name=spec.id,
        work_pool_name=pool,
        parameters={"connector_id": spec.id, "params": {}},
        schedules=[],  # the gateway fires schedules (see the module docstring); this also removes older ones
        concurrency_limit=1,  # a connector never runs twice at once on this path either
        job_variables=job_variables(engine_command),
        description=spec.description or f"flowgate connector {spec.id}",
        tags=["flowgate", f"connector:{spec.id}"],
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )
    return str(deployment_id)


def deploy_workflows(pool: str, engine_command: str = LAUNCH_COMMAND) -> str:
    """Create or update `flowgate-workflow/workflow`: every workflow run is a flow run of it, definition included."""
    deployment_id = workflow_flow.from_source(  # type: ignore[union-attr]  # sync_compatible, as above
        source=str(ROOT), entrypoint=WORKFLOW_ENTRYPOINT).deploy(
        name=WORKFLOW_DEPLOYMENT,
        work_pool_name=pool,
        description="flowgate workflows: the gateway passes the definition, inputs and mode of each run",
        tags=["flowgate", "workflow"],
        job_variables=job_variables(engine_command),
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )
    return str(deployment_id)


def remove_stale(keep: set[str]) -> list[str]:
    """Delete deployments of the connector flow whose connector left connectors.yaml."""
    removed = []
    with get_client(sync_client=True) as client:
        for deployment in client.read_deployments(flow_filter=FlowFilter(name=FlowFilterName(any_=[FLOW_NAME]))):
            if deployment.name not in keep:
                client.delete_deployment(deployment.id)
                removed.append(deployment.name)
    return removed


def deploy_all(registry: ConnectorRegistry, pool: str = DEFAULT_POOL,
               engine_command: str = LAUNCH_COMMAND) -> dict[str, list[str]]:
    """Deploy every connector, remove the deployments of removed ones."""
    ensure_work_pool(pool)
    deployed = [spec.id for spec in registry if deploy_connector(spec, pool, engine_command)]
    removed = remove_stale(set(deployed))
    deploy_workflows(pool, engine_command)
    return {"deployed": deployed + [f"workflows ({WORKFLOW_DEPLOYMENT})"], "removed": removed}


def main() -> None:
    parser = argparse.ArgumentParser(description="Register flowgate's connectors as Prefect deployments.")
    parser.add_argument("--pool", default=DEFAULT_POOL, help="process work pool (created if missing)")
    parser.add_argument("--engine-command", default=LAUNCH_COMMAND,
                        help="how the worker starts a flow run (default: the launch script, which uses this host's "
                             f"launcher or runs `{ENGINE_COMMAND}`; empty: Prefect's default)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    settings = RuntimeSettings()
    result = deploy_all(ConnectorRegistry.load(settings.connectors_file), args.pool, args.engine_command)
    print(f"deployed {len(result['deployed'])}: {', '.join(result['deployed'])}")
    if result["removed"]:
        print(f"removed {len(result['removed'])}: {', '.join(result['removed'])}")
    print(schedule_note(ConnectorRegistry.load(settings.connectors_file)))
    print(command_note(args.engine_command))


if __name__ == "__main__":
    main()
