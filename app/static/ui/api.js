// The JSON API as the page uses it: the key from session storage in a header, conditional GETs, problem documents.
const KEY = "flowgate.apiKey";
const etags = new Map(); // url -> {etag, body}: a 304 answers with what we already have

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
    this.code = this.problem.code || `http_${status}`;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY);
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
  etags.clear();
  scopesCache = null;
}

let keyListener = () => {};
// Called with the ApiError when the gateway wants a key (401): the app shows the prompt.
export function onKeyNeeded(listener) {
  keyListener = listener;
}

function headers(extra) {
  const out = { Accept: "application/json", ...extra };
  const key = storedKey();
  if (key) out["X-API-Key"] = key; // a header, never a URL or a cookie: nothing for CSRF to ride on
  return out;
}

async function problemOf(response) {
  try {
    return await response.json();
  } catch {
    return { detail: `${response.status} ${response.statusText}` };
  }
}

// GET a JSON document; `{changed: false}` when it is the same as last time (304), so views can skip a redraw.
// `accept` lists statuses other than 200 whose body is the answer (readiness answers 503 with its checks).
export async function getJSON(url, { accept = [] } = {}) {
  const known = etags.get(url);
  const response = await fetch(url, {
    headers: headers(known ? { "If-None-Match": known.etag } : {}),
    cache: "no-store",
  });
  if (response.status === 304 && known) return { body: known.body, changed: false, status: 200 };
  if (response.ok || accept.includes(response.status)) {
    const body = await response.json();
    const etag = response.headers.get("ETag");
    if (etag && response.status === 200) etags.set(url, { etag, body });
    return { body, changed: true, status: response.status };
  }
  const error = new ApiError(response.status, await problemOf(response));
  if (response.status === 401) keyListener(error);
  throw error;
}

export async function postJSON(url, body, { accept = [] } = {}) {
  const response = await fetch(url, {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify(body ?? {}),
    cache: "no-store",
  });
  if (response.ok || accept.includes(response.status)) return { body: await response.json(), status: response.status };
  const error = new ApiError(response.status, await problemOf(response));
  if (response.status === 401) keyListener(error);
  throw error;
}

let scopesCache = null;
// What this tab's key may do: GET /api/v1/whoami answers any valid key with its name and scopes.
export function scopes() {
  scopesCache ??= (async () => {
    try {
      const { body: me } = await getJSON("/api/v1/whoami");
      return { trigger: me.scopes.includes("trigger"), admin: me.scopes.includes("admin"), name: me.name };
    } catch (error) {
      scopesCache = null;
      throw error;
    }
  })();
  return scopesCache;
}
