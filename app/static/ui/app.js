// The dashboard's entry: a hash router over the views, and the API-key prompt.
import { ApiError, onKeyNeeded, scopes, storedKey, storeKey } from "./api.js";
import { errorBox, h, replace } from "./dom.js";
import { ViewScope } from "./live.js";
import * as connectorView from "./views/connector.js";
import * as connectorsView from "./views/connectors.js";
import * as healthView from "./views/health.js";
import * as runView from "./views/run.js";
import * as runsView from "./views/runs.js";
import * as workflowsView from "./views/workflows.js";

const main = document.getElementById("view");
const dialog = document.getElementById("key-dialog");
const keyInput = document.getElementById("key-input");
const keyError = document.getElementById("key-error");
const keyButton = document.getElementById("key-button");
const who = document.getElementById("who");
let current = new ViewScope();

function route() {
  const [path, query = ""] = (location.hash.replace(/^#/, "") || "/runs").split("?");
  const params = new URLSearchParams(query);
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "runs" && parts[1]) return { name: "runs", view: runView, id: decodeURIComponent(parts[1]), params };
  if (parts[0] === "connectors" && parts[1]) {
    return { name: "connectors", view: connectorView, id: decodeURIComponent(parts[1]), params };
  }
  if (parts[0] === "connectors") return { name: "connectors", view: connectorsView, params };
  if (parts[0] === "workflows") return { name: "workflows", view: workflowsView, params };
  if (parts[0] === "health") return { name: "health", view: healthView, params };
  return { name: "runs", view: runsView, params };
}

async function show() {
  current.stop();
  current = new ViewScope();
  const scope = current;
  const { name, view, id, params } = route();
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === name);
  }
  keyButton.hidden = !storedKey();
  let allowed;
  try {
    allowed = await scopes();
  } catch (error) {
    if (!scope.alive) return;
    replace(main, error.status === 401 ? h("p", { class: "muted" }, "An API key is needed to see this gateway.")
      : errorBox({ code: error.code, message: error.message }));
    return;
  }
  if (!scope.alive) return;
  who.textContent = !storedKey() ? "" : allowed.admin ? "key: admin" : allowed.trigger ? "key: read + trigger" : "key: read only";
  document.body.classList.toggle("can-trigger", allowed.trigger);
  // Each view draws into a box of its own: one left behind while it loaded (the hash changed meanwhile) draws
  // into a box no longer on the page, never over the view that replaced it.
  const box = h("div", { class: "view" }, h("p", { class: "muted" }, "Loading…"));
  replace(main, box);
  try {
    await view.render(box, { id, params, canTrigger: allowed.trigger, canAdmin: allowed.admin }, scope);
  } catch (error) {
    if (!scope.alive) return;
    if (!(error instanceof ApiError) || error.status !== 401) {
      replace(box, errorBox({ code: error.code || "error", message: error.message }));
    }
  }
}

onKeyNeeded((error) => {
  keyError.hidden = !storedKey();
  keyError.textContent = error.code === "invalid_api_key" ? "That key is not valid." : error.message;
  keyButton.hidden = false;
  if (!dialog.open) {
    keyInput.value = "";
    dialog.showModal();
  }
});

document.getElementById("key-form").addEventListener("submit", () => {
  storeKey(keyInput.value.trim());
  show();
});
document.getElementById("key-forget").addEventListener("click", () => {
  storeKey(null);
  dialog.close();
  show();
});
keyButton.addEventListener("click", () => {
  keyError.hidden = true;
  keyInput.value = "";
  dialog.showModal();
});

window.addEventListener("hashchange", show);
show();
