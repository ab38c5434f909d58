// The workflow files: each one's graph (drawn as on a run's page, without states), its schedule when it has one,
// its latest runs, and for a key with `trigger` a Run form with a field per input the workflow reads.
import { getJSON, postJSON } from "../api.js";
import { drawDag } from "../dag.js";
import { badge, errorBox, h, replace, shortId, when } from "../dom.js";
import { POLL_MS } from "../live.js";
import { describeSchedule } from "./connectors.js";

export async function render(root, { canTrigger }, scope) {
  const { body } = await getJSON("/api/v1/workflows");
  const cards = body.items.map((item) => workflowCard(item, canTrigger));
  replace(root, h("div", { class: "page-head" }, h("h1", {}, "Workflows")),
    cards.length ? h("div", { class: "cards wide" }, cards.map((card) => card.el))
      : h("p", { class: "muted" }, "No workflows are configured (FLOWGATE_WORKFLOWS names their folder)."));
  await scope.every(POLL_MS * 2, () => Promise.all(cards.map((card) => card.refresh())));
}

function workflowCard(item, canTrigger) {
  const url = `/api/v1/workflows/${encodeURIComponent(item.id)}`;
  const graph = h("div", { class: "dag-wrap" });
  const facts = h("dl", { class: "facts" });
  const latest = h("ul", { class: "latest" });
  const form = h("form", { class: "params", hidden: true });
  const output = h("div", { class: "output" });
  let detail = null;

  const el = h("article", { class: "card workflow", dataset: { workflow: item.id } },
    h("h2", {}, h("span", { class: "mono" }, item.id)),
    item.description ? h("p", { class: "muted" }, item.description) : null,
    graph, facts,
    h("h3", {}, "Latest runs ", h("a", { href: `#/runs?target=${encodeURIComponent(item.id)}`, class: "small" }, "all →")),
    latest,
    canTrigger ? h("div", { class: "actions" },
      h("button", { type: "button", dataset: { action: "run" }, onclick: () => open() }, "Run")) : null,
    form, output);

  const open = () => {
    const inputs = Object.entries(detail?.inputs || {});
    form.hidden = false;
    replace(form,
      h("p", { class: "small muted" }, inputs.length
        ? "Inputs (JSON values, or text; leave empty for the default):" : "This workflow reads no inputs."),
      inputs.map(([name, value]) => h("label", {}, h("span", { class: "mono" }, name),
        h("input", { name, placeholder: value === null ? "no default" : JSON.stringify(value), autocomplete: "off" }))),
      h("div", { class: "actions" },
        h("button", { type: "submit", dataset: { submit: "run" } }, "Start run"),
        h("button", { type: "button", class: "ghost", onclick: () => { form.hidden = true; replace(output); } }, "Close")));
    form.onsubmit = (event) => {
      event.preventDefault();
      start().catch((failure) => replace(output, errorBox({ code: failure.code,
        message: failure.problem?.errors?.map((e) => `${e.field}: ${e.message}`).join("; ") || failure.message })));
    };
  };

  const start = async () => {
    const inputs = {};
    for (const [name, raw] of new FormData(form)) {
      if (raw === "") continue;
      try { inputs[name] = JSON.parse(raw); } catch { inputs[name] = raw; }
    }
    const { body: accepted } = await postJSON(`/api/workflow/${encodeURIComponent(item.id)}/execute`, { inputs });
    replace(output, h("p", {}, "Started ", h("a", { href: `#/runs/${accepted.executionId}`, class: "mono" },
      shortId(accepted.executionId)), " on ", accepted.backend, " ", badge(accepted.status)));
    await refresh();
  };

  const refresh = async () => {
    const answer = await getJSON(url);
    if (!answer.changed && detail) return;
    const first = !detail;
    detail = answer.body;
    if (first) replace(graph, drawDag(detail.layers, detail.graph.nodes, detail.graph.connections, null));
    const inputs = Object.keys(detail.inputs);
    replace(facts,
      fact("nodes", `${detail.graph.nodes.length} in ${detail.layers.length} layers`),
      fact("inputs", inputs.length ? inputs.join(", ") : "none"),
      fact("schedule", describeSchedule(detail.schedule)));
    replace(latest, detail.latest_runs.length ? detail.latest_runs.map((run) => h("li", {},
      h("a", { href: `#/runs/${run.run_id}`, class: "mono" }, shortId(run.run_id)), " ", badge(run.status), " ",
      h("span", { class: "muted small" }, `${run.backend} · ${when(run.created_at)}`)))
      : h("li", { class: "muted" }, "never run"));
  };

  return { el, refresh };
}

function fact(name, value) {
  return [h("dt", {}, name), h("dd", {}, value)];
}
