// One run: where and why it ran, its steps and rows, its error, callbacks, a workflow's graph, live logs.
import { getJSON, postJSON } from "../api.js";
import { drawDag, updateDag } from "../dag.js";
import {
  badge, errorBox, h, json, number, reasonText, replace, runSeconds, seconds, shortId, TERMINAL, when,
} from "../dom.js";
import { POLL_MS } from "../live.js";

const STEPS = ["recover", "extract", "normalize", "load"];

export async function render(root, { id, canTrigger }, scope) {
  const runUrl = `/api/v1/runs/${encodeURIComponent(id)}`;
  const first = (await getJSON(runUrl)).body;
  const isWorkflow = first.kind === "workflow";

  const head = h("div", { class: "page-head" });
  const timeline = h("ol", { class: "timeline" });
  const detail = h("section", { class: "card" });
  const error = h("div");
  const graph = h("div", { class: "dag-wrap" });
  const nodePanel = h("aside", { class: "node-panel muted" }, "Click a node to see its output, attempts and timing.");
  const callback = h("section", { class: "card", hidden: true });
  const logs = h("pre", { class: "logs", "aria-label": "log lines" });
  const logSource = h("span", { class: "muted small" });

  replace(root,
    head,
    h("section", { class: "card" }, h("h2", {}, "Timeline"), timeline),
    error,
    isWorkflow ? h("section", { class: "card" }, h("h2", {}, "Graph"),
      h("div", { class: "graph-layout" }, graph, nodePanel)) : null,
    detail,
    callback,
    h("section", { class: "card" }, h("h2", {}, "Logs ", logSource), logs));

  let run = first;
  let execution = null;
  let selected = null;
  let dag = null;

  const drawRun = () => {
    replace(head,
      h("h1", {}, isWorkflow ? "Workflow " : "Connector ", h("span", { class: "mono" }, run.connector_id || run.workflow_id),
        " ", badge(run.status)),
      h("span", { class: "muted mono small" }, run.run_id),
      run.trace_id ? h("span", { class: "muted mono small trace-id", title: "W3C trace id: search it in Jaeger or Tempo" },
        "trace ", run.trace_id) : null,
      canTrigger && !TERMINAL.has(run.status) && run.status !== "cancelling"
        ? h("button", { type: "button", class: "danger", onclick: cancel }, "Cancel") : null,
      canTrigger && TERMINAL.has(run.status)
        ? h("button", { type: "button", dataset: { action: "rerun" }, onclick: rerun({}) }, "Rerun") : null,
      canTrigger && isWorkflow && TERMINAL.has(run.status) && run.status !== "completed"
        ? h("button", { type: "button", dataset: { action: "rerun-failed" }, onclick: rerun({ from: "failed" }) },
          "Rerun from failed") : null,
      run.rerun_of ? h("a", { class: "small", href: `#/runs/${encodeURIComponent(run.rerun_of)}` },
        `rerun of ${shortId(run.rerun_of)}`) : null);
    replace(timeline, timelineSteps(run));
    replace(error, run.error ? errorPanel(run.error) : null);
    replace(detail, isWorkflow ? workflowDetail(run, execution) : connectorDetail(run), attemptsPanel(run));
    callback.hidden = !run.callback;
    if (run.callback) replace(callback, callbackPanel(run.callback));
  };

  const cancel = async (event) => {
    event.target.disabled = true;
    try {
      run = (await postJSON(`${runUrl}/cancel`, {}, { accept: [409] })).body;
    } catch (failure) {
      replace(error, errorBox({ code: failure.code, message: failure.message }));
    }
  };

  // A new run of this one (source: rerun); the page moves to it.
  const rerun = (body) => async (event) => {
    event.target.disabled = true;
    try {
      const started = (await postJSON(`${runUrl}/rerun`, body)).body;
      location.hash = `#/runs/${encodeURIComponent(started.run_id)}`;
    } catch (failure) {
      event.target.disabled = false;
      replace(error, errorBox({ code: failure.code, message: failure.message }));
    }
  };

  const drawNodes = () => {
    if (!execution) return;
    if (!dag) {
      const connections = run.params?.workflow?.connections || [];
      dag = drawDag(execution.layers, execution.nodes, connections, (nodeId) => {
        selected = nodeId;
        for (const el of dag.querySelectorAll(".dag-node")) el.classList.toggle("selected", el.dataset.node === nodeId);
        drawPanel();
      });
      replace(graph, dag);
    } else {
      updateDag(dag, execution.nodes);
    }
    drawPanel();
  };

  const drawPanel = () => {
    const node = execution?.nodes.find((n) => n.id === selected);
    if (!node) return;
    nodePanel.classList.remove("muted");
    replace(nodePanel,
      h("h3", {}, node.id, " ", badge(node.status)),
      h("dl", { class: "facts" },
        fact("type", node.type), fact("layer", node.layer), fact("attempts", node.attempts),
        fact("cached", node.cached ? "yes" : "no"), fact("reused", node.reused ? "yes, from the rerun run" : "no"),
        fact("started", when(node.started_at)),
        fact("finished", when(node.finished_at)), fact("duration", seconds(node.duration_seconds))),
      node.error ? errorPanel(node.error) : null,
      h("h4", {}, "Output"), node.output === null || node.output === undefined ? h("p", { class: "muted" }, "none yet")
        : json(node.output));
  };

  drawRun();
  const logState = { after: 0, done: [], tail: [] };
  const refresh = async () => {
    const answer = await getJSON(runUrl);
    const ended = TERMINAL.has(answer.body.status);
    run = answer.body;
    if (isWorkflow) {
      const exec = await getJSON(`/api/workflow/execution/${encodeURIComponent(id)}`);
      if (exec.changed) execution = exec.body;
    }
    if (answer.changed || isWorkflow || !ended) drawRun();
    drawNodes();
    await followLogs(id, logState, logs, logSource);
    // After the end, keep following only while a callback is still being delivered.
    return !ended || run.callback?.status === "pending";
  };
  await scope.every(POLL_MS, refresh);
}

async function followLogs(id, state, pre, sourceLabel) {
  // `next_after` is a cursor past a full page; a short page is the tail, asked again until it grows.
  for (;;) {
    const { body, changed } = await getJSON(`/api/v1/runs/${encodeURIComponent(id)}/logs?after=${state.after}&limit=500`);
    sourceLabel.textContent = body.source === "prefect" ? "(from Prefect)" : "(kept by flowgate)";
    if (body.next_after !== null && body.next_after !== undefined) {
      state.done.push(...body.items);
      state.after = body.next_after;
      state.tail = [];
      continue;
    }
    if (!changed && pre.childElementCount) return;
    state.tail = body.items;
    break;
  }
  const lines = [...state.done, ...state.tail];
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  replace(pre, lines.length ? lines.map((line) => h("div", { class: `log level-${line.level.toLowerCase()}` },
    h("span", { class: "muted" }, new Date(line.at).toLocaleTimeString(), " "),
    h("span", { class: "level" }, line.level.padEnd(7)), " ", h("span", { class: "muted" }, line.logger), " ",
    line.message)) : h("span", { class: "muted" }, "No log lines yet."));
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

function fact(name, value) {
  return [h("dt", {}, name), h("dd", {}, value === null || value === undefined || value === "" ? "—" : String(value))];
}

function timelineSteps(run) {
  const ended = TERMINAL.has(run.status);
  const why = run.backend === "prefect"
    ? `Prefect took it${run.prefect_flow_run_id ? ` (flow run ${shortId(run.prefect_flow_run_id)}` : ""}${
      run.prefect_state ? `, ${run.prefect_state})` : run.prefect_flow_run_id ? ")" : ""}`
    : run.fallback_reason ? `local because ${reasonText(run.fallback_reason)}` : "local, as chosen by settings or the caller";
  const step = (name, at, state, ...text) => h("li", { class: `step-${state}` },
    h("strong", {}, name), h("span", { class: "muted small" }, at ? ` ${when(at)}` : ""), h("div", {}, ...text));
  const endState = !ended ? "pending" : run.status === "completed" ? "done" : "failed";
  return [
    step("accepted", run.created_at, "done", run.kind, " ", run.connector_id || run.workflow_id,
      run.source === "schedule" ? ` by its schedule, slot ${when(run.scheduled_for)}${
        run.schedule?.late_seconds >= 1 ? ` (${seconds(run.schedule.late_seconds)} late)` : ""}`
        : ` from ${run.source}, by ${run.triggered_by}`,
      // Each label links to the runs that carry it.
      Object.entries(run.labels || {}).map(([key, value]) => h("a", {
        class: "label mono small", dataset: { label: key }, title: "runs with this label",
        href: `#/runs?${new URLSearchParams({ label: `${key}:${value}` })}` }, ` ${key}: ${value}`)),
      joinedNote(run.joined_count)),
    step("queued", run.created_at, "done", "on ", h("span", { class: `backend backend-${run.backend}` }, run.backend),
      ": ", why),
    step("running", run.started_at, run.started_at ? (ended ? "done" : "current") : "pending",
      run.started_at ? `attempt ${run.attempt}${run.retry ? ` of ${run.retry.max_attempts}` : ""}`
        : run.next_attempt_at ? `attempt ${run.attempt} waits until ${when(run.next_attempt_at)}`
          : "waiting for an executor"),
    step("ended", run.finished_at, endState, ended ? badge(run.status) : run.status === "cancelling" ? "cancelling…" : "",
      ended && run.started_at ? ` after ${seconds(runSeconds(run))}` : ""),
  ];
}

// Triggers whose on_conflict (join, or queue_one finding it queued) got this run instead of starting one.
function joinedNote(count) {
  if (!count) return null;
  return h("div", { class: "muted small", dataset: { joinedCount: count },
    title: "triggers answered with this run by their conflict policy (on_conflict: join or queue_one)" },
  `joined by ${count} later trigger${count === 1 ? "" : "s"}`);
}

// What each failure class means for a retry (connectors/failures.py).
const CLASSES = {
  transient: "A retry can help: the cause may pass (network, timeout, HTTP 429/5xx, a locked or unreachable database).",
  crashed: "A retry can help: the run was cut off from outside (its process died, a shutdown, a lapsed lease).",
  terminal: "A retry will not help: fix the cause first.",
};

function attemptsPanel(run) {
  if (run.attempts.length < 2 && !run.retry) return null;
  return [
    h("h2", {}, "Attempts"),
    run.retry ? h("p", { class: "muted small" }, `Retried on ${run.retry.on.join(", ")}, at most ${
      run.retry.max_attempts} attempts, waiting ${seconds(run.retry.backoff_seconds)} doubling up to ${
      seconds(run.retry.max_backoff_seconds)}.`) : null,
    h("table", { class: "attempts" },
      h("thead", {}, h("tr", {}, ["#", "backend", "started", "ended", "status", "class", "error"]
        .map((name) => h("th", {}, name)))),
      h("tbody", {}, run.attempts.map((a) => h("tr", { dataset: { attempt: a.attempt, status: a.status } },
        h("td", {}, a.attempt), h("td", {}, a.backend), h("td", {}, when(a.started_at)), h("td", {}, when(a.ended_at)),
        h("td", {}, badge(a.status)), h("td", {}, a.error?.failure_class || "—"),
        h("td", { class: "error-message" }, a.error?.message || ""))))),
  ];
}

function errorPanel(error) {
  const failureClass = error.failure_class || (error.terminal === true ? "terminal" : null);
  return h("div", { class: "notice error", role: "alert" },
    h("div", {}, h("strong", {}, error.code || "error"), error.step ? ` in step ${error.step}` : "",
      error.field ? ` (field ${error.field})` : "", error.nodes ? ` (nodes ${error.nodes.join(", ")})` : "",
      error.contract ? contractText(error.contract) : ""),
    h("div", { class: "error-message" }, error.message),
    failureClass ? h("div", { class: "small", dataset: { failureClass } },
      h("strong", {}, failureClass), `: ${CLASSES[failureClass] || ""}`) : null);
}

function contractText(contract) {
  const column = contract.column ? `, column ${contract.column}` : "";
  return ` (table ${contract.table}${column}; schema_contract.${contract.entity}: ${contract.mode})`;
}

function stepStates(run) {
  if (run.status === "completed") return STEPS.map(() => "done");
  const failedAt = STEPS.indexOf(run.error?.step);
  if (TERMINAL.has(run.status) && failedAt >= 0) {
    return STEPS.map((_, i) => (i < failedAt ? "done" : i === failedAt ? "failed" : "skipped"));
  }
  if (run.status === "running" || run.status === "cancelling") return STEPS.map(() => "current");
  return STEPS.map(() => "pending");
}

function connectorDetail(run) {
  const result = run.result || {};
  const rows = Object.entries(result.rows || {});
  const states = stepStates(run);
  return [
    h("h2", {}, "Steps"),
    h("ol", { class: "steps" }, STEPS.map((name, i) => h("li", { class: `step-${states[i]}` }, name))),
    h("h2", {}, "Rows loaded"),
    rows.length ? h("table", { class: "rows" },
      h("thead", {}, h("tr", {}, h("th", {}, "table"), h("th", { class: "num" }, "rows"))),
      h("tbody", {}, rows.map(([table, count]) => h("tr", { dataset: { table } },
        h("td", { class: "mono" }, table), h("td", { class: "num" }, number(count))))))
      : h("p", { class: "muted" }, run.status === "completed" ? "No rows." : "Not loaded yet."),
    schemaChanges(result.schema_changes),
    incrementalWindows(result.incremental, result.merge),
    h("dl", { class: "facts" },
      fact("destination", result.destination), fact("dataset", result.dataset), fact("location", result.location),
      fact("load ids", (result.load_ids || []).join(", ")), fact("pipeline time", seconds(result.duration_seconds)),
      fact("params", Object.keys(run.params || {}).length ? JSON.stringify(run.params) : "")),
  ];
}

// What the run changed in the destination's schema, highlighted: a new table, new or variant columns, a type change.
function schemaChanges(changes) {
  const tables = Object.entries(changes || {});
  if (!tables.length) return null;
  const column = (c) => h("span", { class: "mono" }, c.name, h("span", { class: "muted" }, ` ${c.type}`));
  return h("div", { class: "notice changes", role: "status" },
    h("h3", {}, "Schema changes"),
    h("ul", {}, tables.map(([table, change]) => h("li", { dataset: { changed: table } },
      h("strong", { class: "mono" }, table), change.new_table ? " new table" : "",
      change.new_columns.length ? [" · new columns: ", list(change.new_columns, column)] : "",
      change.variant_columns.length ? [" · variant columns: ", list(change.variant_columns, column)] : "",
      change.type_changes.length ? [" · type changes: ", list(change.type_changes,
        (c) => h("span", { class: "mono" }, `${c.name} ${c.from} → ${c.to}`))] : ""))));
}

function list(items, render) {
  return items.map((item, i) => [i ? ", " : "", render(item)]);
}

// Each incremental table's cursor window and, for merge tables, rows inserted versus updated.
function incrementalWindows(windows, merge) {
  const tables = [...new Set([...Object.keys(windows || {}), ...Object.keys(merge || {})])];
  if (!tables.length) return null;
  const value = (v) => (v === null || v === undefined ? "—" : String(v));
  return [
    h("h2", {}, "Incremental and merge"),
    h("table", { class: "rows" },
      h("thead", {}, h("tr", {}, ["table", "cursor", "from", "to", "rows", "inserted", "updated"].map((name) =>
        h("th", { class: ["rows", "inserted", "updated"].includes(name) ? "num" : null }, name)))),
      h("tbody", {}, tables.map((table) => {
        const w = windows?.[table];
        const m = merge?.[table];
        return h("tr", { dataset: { window: table } },
          h("td", { class: "mono" }, table), h("td", { class: "mono" }, w ? w.cursor_path : "—"),
          h("td", { class: "mono" }, w ? value(w.from) : "—"), h("td", { class: "mono" }, w ? value(w.to) : "—"),
          h("td", { class: "num" }, w ? number(w.rows) : "—"), h("td", { class: "num" }, m ? number(m.inserted) : "—"),
          h("td", { class: "num" }, m ? number(m.updated) : "—"));
      }))),
  ];
}

function workflowDetail(run, execution) {
  return [
    h("h2", {}, "Execution"),
    h("dl", { class: "facts" },
      fact("mode", execution?.mode || run.params?.mode), fact("layers", execution?.layers.length),
      fact("nodes", execution?.nodes.length), fact("duration", seconds(execution?.durationSeconds))),
    execution && Object.keys(execution.outputs || {}).length ? [h("h3", {}, "Outputs"), json(execution.outputs)] : null,
    run.params?.inputs && Object.keys(run.params.inputs).length ? [h("h3", {}, "Inputs"), json(run.params.inputs)] : null,
  ];
}

function callbackPanel(cb) {
  return [
    h("h2", {}, "Callback ", badge(cb.status)),
    h("p", { class: "mono small" }, cb.url),
    cb.attempts.length ? h("table", { class: "attempts" },
      h("thead", {}, h("tr", {}, ["#", "at", "answer", "duration"].map((name) => h("th", {}, name)))),
      h("tbody", {}, cb.attempts.map((a) => h("tr", {},
        h("td", {}, a.attempt), h("td", {}, when(a.at)), h("td", {}, a.error || `HTTP ${a.status_code}`),
        h("td", { class: "num" }, a.duration_ms !== undefined ? `${a.duration_ms} ms` : "—")))))
      : h("p", { class: "muted" }, "No attempt yet."),
  ];
}
