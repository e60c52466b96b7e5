// The web UI's client of the rbee API: the token, plain calls, jobs and their event streams.
// No framework and no build step: ES modules served by the daemon itself.

const TOKEN_KEY = "rbee-token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

export class ApiError extends Error {
  constructor(status, code, message, hint) {
    super(message);
    this.status = status;
    this.code = code;
    this.hint = hint;
  }
}

let onUnauthorized = () => {};

/** Called when the daemon answers 401: the page asks for the token. */
export function whenUnauthorized(callback) {
  onUnauthorized = callback;
}

function headers(extra = {}) {
  const value = token();
  return value ? { Authorization: `Bearer ${value}`, ...extra } : extra;
}

async function failure(response) {
  let code = `HTTP_${response.status}`;
  let message = response.statusText || "The request failed.";
  let hint;
  try {
    const body = await response.json();
    const error = body.error || {};
    code = error.code || error.type || code;
    message = error.message || message;
    hint = error.details && error.details.hint;
  } catch {
    // not JSON: keep the status line
  }
  if (response.status === 401) onUnauthorized();
  return new ApiError(response.status, code, message, hint);
}

/** fetch() with the token; throws ApiError on a 4xx/5xx. */
export async function call(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }) };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response;
}

export async function getJson(path) {
  return (await call(path)).json();
}

/** Each `data:` payload of a server-sent event stream, as it arrives. */
export async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = frame.split("\n").filter((line) => line.startsWith("data: ")).map((line) => line.slice(6));
      if (data.length) yield data.join("\n");
    }
  }
}

/**
 * Submit an operation as a job and follow its stream. `onEvent` sees each narration, progress
 * and token event; the promise gives the job's result, or throws its error.
 */
export async function runJob(operation, { onEvent = () => {}, onCreated = () => {} } = {}) {
  const created = await (await call("/v1/jobs", { method: "POST", body: operation })).json();
  onCreated(created.job_id);
  return followJob(created.job_id, { onEvent });
}

export async function followJob(jobId, { onEvent = () => {}, signal } = {}) {
  const response = await call(`/v1/jobs/${jobId}/stream`, { signal });
  let result;
  let failed;
  for await (const data of sseData(response)) {
    if (data === "[DONE]") return result;
    if (data === "[CANCELLED]") throw new ApiError(0, "CANCELLED", "The job was cancelled.");
    if (data.startsWith("[ERROR]")) {
      const message = failed ? failed.message : data.slice(8) || "The job failed.";
      throw new ApiError(failed ? failed.status : 0, failed ? failed.code : "JOB_FAILED", message, failed && failed.hint);
    }
    const event = JSON.parse(data);
    // Every page may listen: the queen's job list shows the narration of the jobs it started.
    window.dispatchEvent(new CustomEvent("rbee-job-event", { detail: { jobId, event } }));
    if (event.type === "result") result = event.value;
    else if (event.type === "narration" && event.error) {
      failed = { code: event.error.code, message: event.error.message, hint: event.error.details && event.error.details.hint, status: event.fields && event.fields.status };
    }
    onEvent(event);
  }
  throw new ApiError(0, "STREAM_ENDED", "The job's stream ended early.");
}

// --- small DOM helpers -------------------------------------------------------------------

/** el("td", {class: "num"}, "text", child, …): an element; attributes starting with "on" are listeners. */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value === true) node.setAttribute(key, "");
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function bytes(count) {
  if (count === undefined || count === null) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = count;
  let unit = 0;
  while (value >= 1000 && unit < units.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return `${value.toFixed(value >= 100 || unit === 0 ? 0 : 1)} ${units[unit]}`;
}

/** A table with a header row, or a quiet line when there are no rows. */
export function table(columns, rows, empty) {
  if (!rows.length) return el("p", { class: "empty" }, empty);
  return el("table", {},
    el("thead", {}, el("tr", {}, columns.map((name) => el("th", {}, name)))),
    el("tbody", {}, rows));
}

export function badge(text, kind) {
  return el("span", { class: `badge ${kind || text}` }, text);
}

/** A progress bar (`value` of `max`) with its percentage. */
export function progressBar(value, max) {
  const percent = max ? Math.min(100, Math.floor((100 * value) / max)) : 0;
  const bar = el("div", { class: "bar" });
  bar.style.width = `${percent}%`; // through the CSSOM: the page's CSP refuses style attributes
  return el("div", { class: "progress", role: "progressbar", "aria-valuenow": percent, "aria-valuemin": 0, "aria-valuemax": 100 },
    bar, el("span", { class: "label" }, `${percent}%`));
}

/** Fill the header's token form: it opens on a 401, and the token is kept in session storage. */
export function tokenForm(form, onSaved) {
  const input = el("input", { type: "password", placeholder: "API token", autocomplete: "off", "aria-label": "API token" });
  const status = el("span", { class: "token-status" });
  form.replaceChildren(status,
    el("span", { class: "token-fields" }, input, el("button", { type: "submit" }, "Save")),
    el("button", { type: "button", class: "secondary token-toggle" }, "Token"));
  const show = (open) => {
    form.classList.toggle("open", open);
    status.textContent = token() ? "token set" : "no token";
  };
  whenUnauthorized(() => show(true));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    input.value = "";
    show(false);
    onSaved();
  });
  form.querySelector(".token-toggle").addEventListener("click", () => show(!form.classList.contains("open")));
  show(false);
}

/** Show an error under a form (or clear it). */
export function showError(node, error) {
  node.textContent = "";
  if (!error) return;
  node.append(el("strong", {}, error.code ? `${error.code}: ` : ""), error.message || String(error));
  if (error.hint) node.append(el("div", { class: "hint" }, error.hint));
}
