// Every run of both engines, newest first, a page at a time, filtered (by labels too: a run has every one given),
// refreshed while the page is open; filtered to one connector, its history drawn above the list.
import { getJSON } from "../api.js";
import { badge, h, number, reasonText, replace, runSeconds, seconds, shortId, totalRows, when } from "../dom.js";
import { POLL_MS } from "../live.js";
import { historySection, WINDOWS } from "./connector.js";

const STATUSES = ["queued", "running", "cancelling", "completed", "failed", "cancelled", "crashed"];
const PAGE = 50;
// A label as the API's `label` parameter takes it (app.schemas.LABEL_QUERY_PATTERN): the browser refuses another.
const LABEL_PATTERN = "[a-z][a-z0-9_.\\-]{0,62}:[\\s\\S]{0,256}";

function hashFor(params) {
  const query = params.toString();
  return `#/runs${query ? `?${query}` : ""}`;
}

export async function render(root, { params }, scope) {
  const target = params.get("target") || "";
  const status = params.get("status") || "";
  const backend = params.get("backend") || "";
  const source = params.get("source") || "";
  const cursor = params.get("cursor") || "";
  const labels = params.getAll("label").filter(Boolean);

  const api = new URLSearchParams({ limit: String(PAGE) });
  if (target) api.set("connector_id", target);
  if (status) api.set("status", status);
  if (backend) api.set("backend", backend);
  if (source) api.set("source", source);
  for (const label of labels) api.append("label", label);
  if (cursor) api.set("cursor", cursor);
  const url = `/api/v1/runs?${api}`;

  const targets = h("datalist", { id: "targets" });
  getJSON("/api/v1/connectors").then(({ body }) => {
    replace(targets, body.items.map((c) => h("option", { value: c.id })));
  }).catch(() => {});

  const filters = h("form", { class: "filters", onsubmit: (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const next = new URLSearchParams();
    for (const name of ["target", "status", "backend", "source"]) if (form.get(name)) next.set(name, form.get(name));
    for (const label of form.getAll("label")) if (label) next.append("label", label);
    location.hash = hashFor(next);
  } },
  h("label", {}, "Connector or workflow ",
    h("input", { name: "target", value: target, list: "targets", placeholder: "any", size: 18 })),
  targets,
  h("label", {}, "Status ", select("status", status, STATUSES)),
  h("label", {}, "Backend ", select("backend", backend, ["local", "prefect"])),
  h("label", {}, "Source ", select("source", source, ["api", "schedule", "rerun", "workflow", "prefect"])),
  // One field per label in the filter, and an empty one to add another.
  [...labels, ""].map((label) => h("label", {}, "Label ", h("input", {
    name: "label", value: label, placeholder: "key:value", size: 16, pattern: LABEL_PATTERN,
    title: "key:value, e.g. tenant:acme (a run must have every label given)" }))),
  h("button", { type: "submit" }, "Filter"),
  (target || status || backend || source || labels.length)
    ? h("a", { href: "#/runs", class: "button ghost" }, "Clear") : null);

  const tbody = h("tbody");
  const pager = h("div", { class: "pager" });
  const stamp = h("span", { class: "muted small" });
  // A connector's history (a workflow has none: its stats are a 404 and the card stays hidden).
  const asked = Number(params.get("window"));
  const unsized = new URLSearchParams(params);
  unsized.delete("window");
  unsized.delete("cursor");
  const history = target ? historySection(target, WINDOWS.includes(asked) ? asked : PAGE, hashFor(unsized), {
    title: `History of ${target}`,
    more: h("a", { href: `#/connectors/${encodeURIComponent(target)}`, class: "small" }, "connector page →") }) : null;
  let hasHistory = Boolean(history);
  if (history) history.el.hidden = true;
  replace(root,
    h("div", { class: "page-head" }, h("h1", {}, "Runs"), stamp),
    filters,
    history?.el,
    h("table", { class: "runs" },
      h("thead", {}, h("tr", {}, ["Run", "Target", "Status", "Backend", "Created", "Duration", "Rows"].map(
        (name) => h("th", {}, name)))),
      tbody),
    pager);

  let last = null;
  await scope.every(POLL_MS, async () => {
    if (hasHistory) {
      try {
        await history.refresh();
        history.el.hidden = false;
      } catch (error) {
        if (error.status !== 404) throw error;
        hasHistory = false;
      }
    }
    const { body, changed } = await getJSON(url);
    stamp.textContent = `updated ${new Date().toLocaleTimeString()}`;
    // Durations of running runs tick even when nothing else changed.
    if (!changed && !body.items.some((run) => run.started_at && !run.finished_at)) return;
    last = body;
    replace(tbody, body.items.length ? body.items.map(row)
      : h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No runs yet. Start one from Connectors.")));
    const older = new URLSearchParams(params);
    if (last.next_cursor) older.set("cursor", last.next_cursor);
    const newest = new URLSearchParams(params);
    newest.delete("cursor");
    replace(pager,
      cursor ? h("a", { href: hashFor(newest), class: "button ghost" }, "← Newest") : null,
      last.next_cursor ? h("a", { href: hashFor(older), class: "button ghost", rel: "next" }, "Older →") : null);
  });
}

function select(name, value, options) {
  return h("select", { name },
    h("option", { value: "" }, "any"),
    options.map((option) => h("option", { value: option, selected: option === value }, option)));
}

function row(run) {
  const target = run.connector_id || run.workflow_id || run.kind;
  const rows = totalRows(run.result);
  return h("tr", { dataset: { runId: run.run_id, status: run.status } },
    h("td", {}, h("a", { href: `#/runs/${run.run_id}`, class: "mono" }, shortId(run.run_id))),
    h("td", {}, h("span", { class: "kind" }, run.kind), " ", h("a", { href: `#/runs?target=${encodeURIComponent(target)}` }, target),
      run.source === "schedule" ? h("div", { class: "muted small", dataset: { source: "schedule" } },
        `scheduled for ${when(run.scheduled_for)}`) : null),
    h("td", {}, badge(run.status)),
    h("td", {}, h("span", { class: `backend backend-${run.backend}` }, run.backend),
      run.fallback_reason ? h("div", { class: "muted small", title: run.fallback_reason }, reasonText(run.fallback_reason)) : null),
    h("td", { class: "nowrap" }, when(run.created_at)),
    h("td", { class: "num" }, seconds(runSeconds(run))),
    h("td", { class: "num" }, number(rows)));
}
