// A connector's history as inline SVG, drawn from GET /api/v1/connectors/<id>/stats: duration per run (bars by
// status, a mark per backend), a success strip, rows per table, and fire lag where runs came from a schedule.
// Colours come from classes in app.css (no style attributes under the CSP); every status is also a glyph and
// every point has a title, so nothing depends on telling colours apart.
import { h, number, seconds, shortId, svg, when } from "./dom.js";

const WIDTH = 760, LEFT = 96, RIGHT = 56, MIN_SLOTS = 20, MAX_TABLES = 8;
// Status as a glyph beside its colour: above a bar, inside a strip cell.
export const GLYPHS = { completed: "✓", failed: "✕", crashed: "!", cancelled: "–", cancelling: "…", running: "▸", queued: "…" };
const BACKEND_SHAPES = { local: "circle", prefect: "diamond" };

// Where run i of n sits along x: slots of equal width, at least MIN_SLOTS of them so a few runs stay thin bars.
function slots(n) {
  const plot = WIDTH - LEFT - RIGHT;
  const step = plot / Math.max(n, MIN_SLOTS);
  return { step, x: (i) => LEFT + i * step, bar: Math.max(2, Math.min(step * 0.7, 24)) };
}

function describe(run) {
  return `run ${shortId(run.run_id)} · ${run.status} · ${run.backend} · ${when(run.created_at)}`;
}

// A run's point: a link to the run, with its title and the data a test (or a reader's tools) can find.
function point(run, chart, ...children) {
  return svg("a", { href: `#/runs/${run.run_id}`, class: "point", "data-run": run.run_id, "data-status": run.status,
    "data-backend": run.backend, "data-chart": chart }, ...children);
}

function frame(kind, height, label) {
  return svg("svg", { class: `chart chart-${kind}`, viewBox: `0 0 ${WIDTH} ${height}`, role: "img",
    "aria-label": label, preserveAspectRatio: "xMinYMin meet" }, svg("title", {}, label));
}

function yAxis(root, top, bottom, max, format) {
  for (const fraction of [0, 0.5, 1]) {
    const y = bottom - (bottom - top) * fraction;
    root.append(svg("line", { class: "grid", x1: LEFT, x2: WIDTH - RIGHT, y1: y, y2: y }),
      svg("text", { class: "axis", x: LEFT - 6, y: y + 4, "text-anchor": "end" }, fraction ? format(max * fraction) : "0"));
  }
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 2.5, 5, 10].map((m) => m * power).find((m) => m >= value);
}

function backendMark(run, cx, cy) {
  const shape = BACKEND_SHAPES[run.backend] || "square";
  const cls = `backend-mark backend-${run.backend}`;
  if (shape === "circle") return svg("circle", { class: cls, cx, cy, r: 3.5 });
  if (shape === "diamond") return svg("path", { class: cls, d: `M${cx},${cy - 4.5} L${cx + 4.5},${cy} L${cx},${cy + 4.5} L${cx - 4.5},${cy} z` });
  return svg("rect", { class: cls, x: cx - 3.5, y: cy - 3.5, width: 7, height: 7 });
}

// Duration per run: bar height is the duration, the bar's class its status (a glyph above unless completed),
// and under it a circle (local) or a diamond (Prefect).
export function durationChart(runs) {
  const top = 18, bottom = 150, height = 178;
  const { x, step, bar } = slots(runs.length);
  const max = niceMax(Math.max(0, ...runs.map((run) => run.duration_seconds || 0)));
  const root = frame("duration", height, `Duration of the last ${runs.length} runs`);
  yAxis(root, top, bottom, max, seconds);
  runs.forEach((run, i) => {
    const cx = x(i) + step / 2;
    const tall = run.duration_seconds === null ? 0 : Math.max(1.5, (bottom - top) * run.duration_seconds / max);
    const glyph = run.status === "completed" ? null : GLYPHS[run.status] || "?";
    root.append(point(run, "duration",
      svg("title", {}, `${describe(run)} · ${run.duration_seconds === null ? "not ended" : seconds(run.duration_seconds)}`),
      svg("rect", { class: `bar status-${run.status}`, x: cx - bar / 2, y: bottom - tall, width: bar, height: tall }),
      glyph ? svg("text", { class: "glyph", x: cx, y: bottom - tall - 4, "text-anchor": "middle" }, glyph) : null,
      backendMark(run, cx, bottom + 11)));
  });
  root.append(svg("line", { class: "baseline", x1: LEFT, x2: WIDTH - RIGHT, y1: bottom, y2: bottom }),
    svg("text", { class: "axis", x: LEFT - 6, y: bottom + 15, "text-anchor": "end" }, "backend"));
  return root;
}

// One cell per run, its status as colour and glyph; the rate over the ended runs as text beside it.
export function successStrip(runs, stats) {
  const height = 34;
  const { x, step } = slots(runs.length);
  const cell = Math.max(3, Math.min(step - 2, 22));
  const rate = stats.success_rate === null ? "no run ended yet" : `${Math.round(stats.success_rate * 100)}% succeeded`;
  const root = frame("strip", height, `Outcome of the last ${runs.length} runs: ${rate}`);
  root.append(svg("text", { class: "axis", x: LEFT - 6, y: 21, "text-anchor": "end" }, "outcome"));
  runs.forEach((run, i) => {
    const cx = x(i) + step / 2;
    root.append(point(run, "strip", svg("title", {}, describe(run)),
      svg("rect", { class: `cell status-${run.status}`, x: cx - cell / 2, y: 6, width: cell, height: 22, rx: 3 }),
      cell >= 9 ? svg("text", { class: "glyph on-cell", x: cx, y: 21.5, "text-anchor": "middle" }, GLYPHS[run.status] || "?") : null));
  });
  return root;
}

// Rows loaded per run, one band per table (each scaled to its own largest load), labelled by the table's name.
export function rowsChart(runs, tables) {
  const shown = tables.slice(0, MAX_TABLES);
  const band = 40, top = 6, height = top + shown.length * band + 4;
  const { x, step, bar } = slots(runs.length);
  const root = frame("rows", height, `Rows loaded per table by the last ${runs.length} runs`);
  shown.forEach((table, row) => {
    const bottom = top + (row + 1) * band - 6, room = band - 14;
    const max = Math.max(0, ...runs.map((run) => run.rows[table] || 0));
    const group = svg("g", { class: "table-band", "data-table": table },
      svg("text", { class: "axis table-name", x: LEFT - 6, y: bottom - room / 2 + 4, "text-anchor": "end" },
        table.length > 14 ? `${table.slice(0, 13)}…` : table, svg("title", {}, table)),
      svg("line", { class: "baseline", x1: LEFT, x2: WIDTH - RIGHT, y1: bottom, y2: bottom }),
      svg("text", { class: "axis", x: WIDTH - RIGHT + 6, y: bottom - room + 8 }, number(max)));
    runs.forEach((run, i) => {
      if (!(table in run.rows)) return;
      const count = run.rows[table];
      const tall = max ? Math.max(1.5, room * count / max) : 1.5;
      group.append(point(run, "rows", svg("title", {}, `${table}: ${number(count)} rows · ${describe(run)}`),
        svg("rect", { class: "bar rows", x: x(i) + step / 2 - bar / 2, y: bottom - tall, width: bar, height: tall })));
    });
    root.append(group);
  });
  return root;
}

// How long after its slot each scheduled run started; runs a caller started have no slot and no bar.
export function fireLagChart(runs) {
  const top = 14, bottom = 96, height = 108;
  const { x, step, bar } = slots(runs.length);
  const max = niceMax(Math.max(0, ...runs.map((run) => run.fire_lag_seconds || 0)));
  const scheduled = runs.filter((run) => run.scheduled_for);
  const root = frame("lag", height, `Fire lag of the ${scheduled.length} scheduled runs among the last ${runs.length}`);
  yAxis(root, top, bottom, max, seconds);
  runs.forEach((run, i) => {
    if (!run.scheduled_for) return;
    const lag = run.fire_lag_seconds;
    const tall = lag === null ? 0 : Math.max(1.5, (bottom - top) * lag / max);
    root.append(point(run, "lag",
      svg("title", {}, `${describe(run)} · slot ${when(run.scheduled_for)} · ${lag === null ? "not started" : `started ${seconds(lag)} after it`}`),
      svg("rect", { class: "bar lag", x: x(i) + step / 2 - bar / 2, y: bottom - tall, width: bar, height: tall })));
  });
  root.append(svg("line", { class: "baseline", x1: LEFT, x2: WIDTH - RIGHT, y1: bottom, y2: bottom }));
  return root;
}

function legend() {
  return h("p", { class: "chart-legend small muted" },
    Object.entries(GLYPHS).filter(([status]) => !["cancelling", "queued"].includes(status)).map(([status, glyph]) =>
      h("span", { class: "legend-item" }, h("span", { class: `swatch status-${status}` }, glyph), ` ${status}`)),
    h("span", { class: "legend-item" }, "● local"), h("span", { class: "legend-item" }, "◆ prefect"));
}

// The whole picture for one stats document; a sentence instead when there is nothing to draw.
export function historyCharts(stats) {
  const runs = stats.runs;
  if (!runs.length) return h("p", { class: "muted" }, "No runs yet: nothing to draw.");
  const ended = ["completed", "failed", "crashed"].reduce((sum, status) => sum + (stats.counts[status] || 0), 0);
  const rate = stats.success_rate === null ? "none ended yet"
    : `${Math.round(stats.success_rate * 100)}% of ${ended} ended runs succeeded`;
  const scheduled = runs.some((run) => run.scheduled_for);
  return h("div", { class: "history", dataset: { runs: String(runs.length) } },
    h("h3", {}, "Duration per run ", h("span", { class: "muted small" }, `last ${runs.length}, oldest left`)),
    durationChart(runs),
    h("h3", {}, "Outcome ", h("span", { class: "muted small", dataset: { rate: String(stats.success_rate) } }, rate)),
    successStrip(runs, stats),
    legend(),
    stats.tables.length ? [h("h3", {}, "Rows loaded per table"), rowsChart(runs, stats.tables),
      stats.tables.length > MAX_TABLES ? h("p", { class: "muted small" }, `and ${stats.tables.length - MAX_TABLES} more tables`) : null]
      : null,
    scheduled ? [h("h3", {}, "Fire lag ", h("span", { class: "muted small" }, "scheduled runs: start after their slot")),
      fireLagChart(runs)] : null);
}
