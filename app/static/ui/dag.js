// A workflow's DAG as SVG: layers left to right, one box per node coloured by its state, edges as curves. Nodes
// without a status (a workflow file, not a run of it) are drawn plain, and without `onSelect` nothing is clickable.
import { svg } from "./dom.js";

const W = 150, H = 46, GAP_X = 70, GAP_Y = 22, PAD = 16;

// `layers`: lists of node ids; `connections`: [{from, to}] (or source/target); `onSelect(id)` on a click (optional).
export function drawDag(layers, nodes, connections, onSelect) {
  const tallest = Math.max(1, ...layers.map((layer) => layer.length));
  const height = PAD * 2 + tallest * H + (tallest - 1) * GAP_Y;
  const width = PAD * 2 + layers.length * W + Math.max(0, layers.length - 1) * GAP_X;
  const at = new Map();
  layers.forEach((layer, x) => {
    const top = (height - (layer.length * H + (layer.length - 1) * GAP_Y)) / 2;
    layer.forEach((id, y) => at.set(id, { x: PAD + x * (W + GAP_X), y: top + y * (H + GAP_Y) }));
  });
  const byId = new Map(nodes.map((node) => [node.id, node]));
  const root = svg("svg", { class: "dag", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "workflow graph" });
  root.style.maxWidth = `${width}px`; // shrink a wide graph to fit, never blow a small one up (CSSOM: CSP allows it)
  root.append(svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, svg("path", { d: "M0,0 L10,5 L0,10 z", class: "arrowhead" }))));
  for (const link of connections) {
    const from = at.get(link.from ?? link.source), to = at.get(link.to ?? link.target);
    if (!from || !to) continue;
    const x1 = from.x + W, y1 = from.y + H / 2, x2 = to.x, y2 = to.y + H / 2, bend = (x2 - x1) / 2;
    root.append(svg("path", { class: "edge", "marker-end": "url(#arrow)",
      d: `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}` }));
  }
  for (const [id, pos] of at) {
    const node = byId.get(id) || { id, type: "?", status: onSelect ? "pending" : undefined };
    const state = node.status;
    const select = onSelect ? { tabindex: 0, role: "button", onclick: () => onSelect(id),
      onkeydown: (event) => { if (event.key === "Enter") onSelect(id); } } : {};
    const group = svg("g", { class: state ? `dag-node status-${state}` : "dag-node plain", "data-node": id,
      "data-status": state, transform: `translate(${pos.x},${pos.y})`, ...select },
    svg("title", {}, state ? `${id} (${node.type}): ${state}` : `${id} (${node.type})`),
    svg("rect", { width: W, height: H, rx: 8 }),
    svg("text", { x: 12, y: 20, class: "node-id" }, id.length > 18 ? `${id.slice(0, 17)}…` : id),
    svg("text", { x: 12, y: 36, class: "node-type" }, state ? `${node.type} · ${state}` : node.type));
    root.append(group);
  }
  return root;
}

// Recolour the boxes in place (keeps focus and the selection) as node states change.
export function updateDag(root, nodes) {
  for (const node of nodes) {
    const group = root.querySelector(`[data-node="${CSS.escape(node.id)}"]`);
    if (!group || group.dataset.status === node.status) continue;
    group.setAttribute("class", `dag-node status-${node.status}${group.classList.contains("selected") ? " selected" : ""}`);
    group.dataset.status = node.status;
    group.querySelector("title").textContent = `${node.id} (${node.type}): ${node.status}`;
    group.querySelector(".node-type").textContent = `${node.type} · ${node.status}`;
  }
}
