// Building DOM from data as text nodes only (no HTML parsed from strings), and the formats every view shares.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(name, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const SVG = "http://www.w3.org/2000/svg";
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined) el.setAttribute(name, value);
  }
  append(el, children);
  return el;
}

export const TERMINAL = new Set(["completed", "failed", "cancelled", "crashed"]);

export function badge(status) {
  return h("span", { class: `badge status-${status}`, dataset: { status } }, status);
}

export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return date.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function seconds(value) {
  if (value === null || value === undefined) return "—";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 120) return `${value.toFixed(1)} s`;
  const minutes = Math.floor(value / 60);
  return minutes < 120 ? `${minutes} min ${Math.round(value % 60)} s` : `${(minutes / 60).toFixed(1)} h`;
}

// A run's duration: ended - started, or so far while it runs.
export function runSeconds(run) {
  const start = run.started_at || run.startedAt;
  if (!start) return null;
  const end = run.finished_at || run.finishedAt;
  return ((end ? new Date(end) : new Date()) - new Date(start)) / 1000;
}

export function totalRows(result) {
  const rows = result?.rows;
  if (!rows) return null;
  return Object.values(rows).reduce((sum, n) => sum + (Number(n) || 0), 0);
}

export function number(n) {
  return n === null || n === undefined ? "—" : Number(n).toLocaleString();
}

export function shortId(id) {
  return id ? id.slice(0, 8) : "";
}

export function json(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

export function errorBox(error) {
  return h("div", { class: "notice error", role: "alert" },
    h("strong", {}, error.code ? `${error.code}: ` : ""), error.message);
}

// Why a run went where it went, in words.
const REASONS = {
  prefect_not_configured: "Prefect is not configured (PREFECT_API_URL unset)",
  prefect_unreachable: "Prefect did not answer",
  prefect_circuit_open: "Prefect's circuit is open after repeated failures",
  no_deployment: "Prefect has no deployment for it",
  no_worker_online: "no Prefect worker was online",
  prefect_create_failed: "creating the Prefect flow run failed",
  prefect_not_picked_up: "no Prefect worker picked it up in time",
  prefect_not_started: "a Prefect worker took it but did not start it in time",
};
export function reasonText(reason) {
  return reason ? REASONS[reason] || reason.replaceAll("_", " ") : null;
}
