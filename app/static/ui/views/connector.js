// One connector's page: its card (source, destination, schedule, latest runs, Run and Preview) and its history
// drawn from GET /api/v1/connectors/<id>/stats, refreshed while the page is open.
import { getJSON } from "../api.js";
import { historyCharts } from "../charts.js";
import { h, replace } from "../dom.js";
import { POLL_MS } from "../live.js";
import { connectorCard } from "./connectors.js";

export const WINDOWS = [20, 50, 100, 200];

export async function render(root, { id, params, canTrigger, canAdmin }, scope) {
  const asked = Number(params.get("window"));
  const size = WINDOWS.includes(asked) ? asked : 50;
  const { body: detail } = await getJSON(`/api/v1/connectors/${encodeURIComponent(id)}`);
  const card = connectorCard(detail, canTrigger, canAdmin);
  const history = historySection(id, size, `#/connectors/${encodeURIComponent(id)}`);
  replace(root,
    h("div", { class: "page-head" }, h("h1", {}, "Connector ", h("span", { class: "mono" }, id)),
      h("a", { href: "#/connectors", class: "small" }, "← all connectors")),
    card.el, history.el);
  await scope.every(POLL_MS * 2, () => Promise.all([card.refresh(), history.refresh()]));
}

// A card with the charts of a connector's last `size` runs and links to other window sizes; `base` is the hash
// the size links extend. `refresh()` redraws only when the stats changed (a 304 otherwise).
export function historySection(id, size, base, { title = "History", more = null } = {}) {
  const body = h("div", { class: "history-body" }, h("p", { class: "muted" }, "Loading…"));
  const sep = base.includes("?") ? "&" : "?";
  const el = h("section", { class: "card", dataset: { history: id } },
    h("div", { class: "page-head" }, h("h2", {}, title),
      h("span", { class: "windows small" }, "runs:", WINDOWS.map((n) => h("a", {
        href: `${base}${sep}window=${n}`, class: n === size ? "active" : null }, String(n)))),
      more),
    body);
  let drawn = false;
  const refresh = async () => {
    const { body: stats, changed } = await getJSON(`/api/v1/connectors/${encodeURIComponent(id)}/stats?window=${size}`);
    if (changed || !drawn) replace(body, historyCharts(stats));
    drawn = true;
  };
  return { el, refresh };
}
