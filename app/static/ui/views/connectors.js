// Connectors as declared (secrets redacted, paths relative to the project) with their schedule and latest runs; Run
// and Preview for a key with `trigger`, Pause and Resume of a schedule for a key with `admin`. Each card links to
// the connector's page (views/connector.js) with its history drawn.
import { getJSON, postJSON } from "../api.js";
import { badge, errorBox, h, replace, shortId, when } from "../dom.js";
import { POLL_MS } from "../live.js";

export async function render(root, { canTrigger, canAdmin }, scope) {
  const { body } = await getJSON("/api/v1/connectors");
  const cards = body.items.map((item) => connectorCard(item, canTrigger, canAdmin));
  replace(root, h("div", { class: "page-head" }, h("h1", {}, "Connectors")),
    cards.length ? h("div", { class: "cards" }, cards.map((card) => card.el))
      : h("p", { class: "muted" }, "No connectors are configured."));
  // Each card's details and latest runs, kept fresh (304s while nothing changed).
  await scope.every(POLL_MS * 2, () => Promise.all(cards.map((card) => card.refresh())));
}

export function connectorCard(item, canTrigger, canAdmin) {
  const facts = h("dl", { class: "facts" });
  const scheduleSwitch = h("div", { class: "actions schedule-actions" });
  const latest = h("ul", { class: "latest" });
  const form = h("form", { class: "params", hidden: true });
  const output = h("div", { class: "output" });
  let detail = null;

  const el = h("article", { class: "card connector", dataset: { connector: item.id } },
    h("h2", {}, h("a", { href: `#/connectors/${encodeURIComponent(item.id)}`, class: "mono" }, item.id)),
    item.description ? h("p", { class: "muted" }, item.description) : null,
    facts, scheduleSwitch,
    h("h3", {}, "Latest runs ", h("a", { href: `#/connectors/${encodeURIComponent(item.id)}`, class: "small",
      dataset: { action: "history" } }, "history →")), latest,
    canTrigger ? h("div", { class: "actions" },
      h("button", { type: "button", dataset: { action: "run" }, onclick: () => open("run") }, "Run"),
      h("button", { type: "button", class: "ghost", dataset: { action: "preview" }, onclick: () => open("preview") },
        "Preview")) : null,
    form, output);

  const open = (action) => {
    form.hidden = false;
    el.classList.add("expanded"); // room for the form and a sample table
    replace(form,
      h("p", { class: "small muted" }, item.overridable.length
        ? "Overridable params (JSON values; leave empty for the connector's own):" : "This connector takes no params."),
      item.overridable.map((name) => h("label", {}, h("span", { class: "mono" }, name),
        h("input", { name, placeholder: JSON.stringify(defaultOf(detail?.spec, name)) ?? "", autocomplete: "off" }))),
      h("div", { class: "actions" },
        h("button", { type: "submit", dataset: { submit: action } }, action === "run" ? "Start run" : "Show sample rows"),
        h("button", { type: "button", class: "ghost", onclick: () => { form.hidden = true; el.classList.remove("expanded"); replace(output); } }, "Close")));
    form.onsubmit = (event) => {
      event.preventDefault();
      submit(action).catch((failure) => replace(output, problemBox(failure)));
    };
  };

  const submit = async (action) => {
    const params = {};
    for (const [name, raw] of new FormData(form)) {
      if (raw === "") continue;
      try { params[name] = JSON.parse(raw); } catch { params[name] = raw; }
    }
    if (action === "run") {
      const { body: run } = await postJSON("/trigger", { connector_id: item.id, params });
      replace(output, h("p", {}, "Started ", h("a", { href: `#/runs/${run.run_id}`, class: "mono" }, shortId(run.run_id)),
        " on ", run.backend, " ", badge(run.status)));
      await refresh();
    } else {
      replace(output, h("p", { class: "muted" }, "Extracting a sample…"));
      const { body: sample } = await postJSON(`/api/v1/connectors/${encodeURIComponent(item.id)}/preview`,
        { limit: 20, params });
      replace(output, previewChanges(sample),
        Object.entries(sample.resources).map(([name, resource]) => previewTable(name, resource)));
    }
  };

  const refresh = async (force = false) => {
    const answer = await getJSON(`/api/v1/connectors/${encodeURIComponent(item.id)}`);
    if (!answer.changed && detail && !force) return;
    detail = answer.changed || !detail ? answer.body : detail;
    const spec = detail.spec;
    replace(facts,
      fact("source", `${spec.source.kind}: ${describeSource(spec.source)}`),
      fact("destination", `${spec.destination.kind}${spec.destination.bucket_url ? ` ${spec.destination.bucket_url}` : ""}`
        + ` → ${spec.dataset} (${spec.write_disposition})`),
      fact("schedule", describeSchedule(detail.schedule)),
      detail.schedule ? fact("next", nextFire(detail.schedule)) : null,
      detail.schedule?.last_run ? fact("last scheduled", h("span", {},
        h("a", { href: `#/runs/${detail.schedule.last_run.run_id}`, class: "mono" }, shortId(detail.schedule.last_run.run_id)),
        " ", badge(detail.schedule.last_run.status), " ",
        h("span", { class: "muted small" }, `slot ${when(detail.schedule.last_run.scheduled_for)}`))) : null);
    drawSwitch();
    replace(latest, detail.latest_runs.length ? detail.latest_runs.map((run) => h("li", {},
      h("a", { href: `#/runs/${run.run_id}`, class: "mono" }, shortId(run.run_id)), " ", badge(run.status), " ",
      h("span", { class: "muted small" }, `${run.backend} · ${when(run.created_at)}`)))
      : h("li", { class: "muted" }, "never run"));
  };

  // Pause / Resume for a key with `admin`: the answer is the schedule as it is now.
  const drawSwitch = () => {
    const schedule = detail?.schedule;
    if (!canAdmin || !schedule || schedule.state === "inactive") return replace(scheduleSwitch);
    const paused = schedule.state === "paused";
    replace(scheduleSwitch, h("button", {
      type: "button", class: "ghost", dataset: { action: paused ? "resume" : "pause" },
      onclick: async (event) => {
        event.target.disabled = true;
        try {
          const { body: now } = await postJSON(
            `/api/v1/connectors/${encodeURIComponent(item.id)}/schedule/${paused ? "resume" : "pause"}`, {});
          detail = { ...detail, schedule: now };
          await refresh(true);
        } catch (failure) {
          replace(output, problemBox(failure));
          event.target.disabled = false;
        }
      },
    }, paused ? "Resume schedule" : "Pause schedule"));
  };

  return { el, refresh };
}

function fact(name, value) {
  return [h("dt", {}, name), h("dd", {}, value)];
}

function defaultOf(spec, name) {
  if (!spec) return undefined;
  if (name === "full_refresh") return spec.full_refresh ?? false;
  return spec.source?.args?.[name] ?? spec.source?.[name] ?? spec.source?.incremental?.[name];
}

function describeSource(source) {
  switch (source.kind) {
    case "sql_database": return `${source.url} [${(source.tables || []).join(", ") || "all tables"}]`;
    case "filesystem": return `${source.bucket_url}/${source.file_glob}`;
    case "python": return source.ref;
    case "rest_api": return source.config?.client?.base_url || "REST API";
    default: return "";
  }
}

export function describeSchedule(schedule) {
  if (!schedule) return "none (on demand)";
  const rule = schedule.cron ? `cron ${schedule.cron} (${schedule.timezone})`
    : schedule.interval ? `every ${schedule.interval} s` : `rrule ${schedule.rrule} (${schedule.timezone})`;
  const counts = [schedule.missed_slots ? `${schedule.missed_slots} missed` : null,
    schedule.skipped_slots ? `${schedule.skipped_slots} skipped` : null].filter(Boolean).join(", ");
  return h("span", { dataset: { scheduleState: schedule.state } }, rule, " ", h("span", { class: `badge status-${
    schedule.state === "active" ? "up" : "disabled"}` }, schedule.state), counts ? ` · ${counts}` : "");
}

// The next fire time as the schedule's own zone writes it (the API gives it with its offset).
function nextFire(schedule) {
  if (schedule.state !== "active") return schedule.state === "paused" ? `paused${schedule.paused_by
    ? ` by ${schedule.paused_by}` : ""} ${when(schedule.paused_at)}` : "never (active: false)";
  const next = schedule.next_fire_times[0];
  return next ? h("span", { class: "mono", title: schedule.next_fire_times.join("\n") },
    next.replace("T", " "), schedule.timezone !== "UTC" ? ` ${schedule.timezone}` : "") : "—";
}

function previewTable(name, resource) {
  const columns = Object.keys(resource.columns || {});
  return h("div", { class: "preview", dataset: { resource: name } },
    h("h3", {}, name, " ", h("span", { class: "muted small" }, `${resource.rows.length} sample rows`)),
    h("div", { class: "scroll" }, h("table", { class: "sample" },
      h("thead", {}, h("tr", {}, columns.map((column) => h("th", { title: resource.columns[column] }, column)))),
      h("tbody", {}, resource.rows.map((row) => h("tr", {}, columns.map((column) => h("td", {}, cell(row[column])))))))));
}

// Tables and columns the sample would add at the destination, and what the schema contract would refuse.
function previewChanges(sample) {
  if (!sample.changes) {
    return sample.changes_unavailable ? h("p", { class: "muted" }, sample.changes_unavailable) : null;
  }
  const tables = Object.entries(sample.changes.tables);
  if (!tables.length) return h("p", { class: "muted" }, "Nothing new compared with the destination.");
  return h("div", { class: "notice changes", role: "status" },
    h("h3", {}, "New compared with the destination"),
    h("ul", {}, tables.map(([table, change]) => h("li", { dataset: { changed: table } },
      h("strong", { class: "mono" }, table), change.new_table ? " new table" : "",
      change.new_columns.length ? [" · new columns: ", h("span", { class: "mono" },
        change.new_columns.map((c) => c.name).join(", "))] : "",
      change.refused.length ? [" · refused by the contract: ", h("span", { class: "mono" },
        change.refused.map((r) => `${r.column || "the table"} (${r.entity}: ${r.mode})`).join(", "))] : ""))));
}

function cell(value) {
  if (value === null || value === undefined) return "∅";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function problemBox(failure) {
  const fields = failure.problem?.errors?.map((e) => `${e.field}: ${e.message}`).join("; ");
  return errorBox({ code: failure.code, message: fields || failure.message });
}
