// Readiness as a page: the database, executors and capacity, Prefect, this process's loops; why, when not up.
import { getJSON } from "../api.js";
import { badge, h, replace } from "../dom.js";
import { POLL_MS } from "../live.js";

const TITLES = { database: "Database", executor: "Executors", prefect: "Prefect", process: "This process" };

export async function render(root, _route, scope) {
  const status = h("span");
  const grid = h("div", { class: "cards health" });
  const stamp = h("span", { class: "muted small" });
  replace(root, h("div", { class: "page-head" }, h("h1", {}, "Health ", status), stamp), grid);
  await scope.every(POLL_MS * 2, async () => {
    const { body, changed } = await getJSON("/api/v1/health/ready", { accept: [503] });
    stamp.textContent = `checked ${new Date().toLocaleTimeString()}`;
    if (!changed) return;
    replace(status, badge(body.status));
    const order = ["database", "executor", "prefect", "process"];
    const checks = Object.entries(body.checks).sort(([a], [b]) => (order.indexOf(a) + 1 || 99) - (order.indexOf(b) + 1 || 99));
    replace(grid, checks.map(([name, check]) => h("article", {
      class: `card check check-${check.status}`, dataset: { check: name } },
    h("h2", {}, TITLES[name] || name, " ", badge(check.status)),
    check.reason ? h("p", { class: "reason" }, check.reason) : null,
    h("dl", { class: "facts" }, facts(check)))));
  });
}

function facts(check, prefix = "") {
  return Object.entries(check).filter(([key]) => key !== "status" && key !== "reason").map(([key, value]) => {
    if (value && typeof value === "object" && !Array.isArray(value)) return facts(value, `${prefix}${key}.`);
    return [h("dt", {}, `${prefix}${key}`.replaceAll("_", " ")),
      h("dd", {}, value === null ? "—" : Array.isArray(value) ? value.join(", ") || "—" : String(value))];
  });
}
