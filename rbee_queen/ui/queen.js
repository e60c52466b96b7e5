// The queen's dashboard: hives, workers, queues, models, live jobs, and a chat playground that
// talks to /v1/chat/completions like any OpenAI client.

import { badge, bytes, call, el, followJob, getJson, runJob, showError, sseData, table, tokenForm } from "./api.js";
import { downloadForm, modelsTable, spawnForm, stopWorker, workersTable } from "./panels.js";

const $ = (selector, root = document) => root.querySelector(selector);
const QUIET = new Set(["status", "hive_list", "hive_get", "hive_status", "hive_refresh_capabilities",
  "worker_list", "worker_list_active", "worker_get", "model_list", "model_get"]);
/** Read-only operations (this page polls some of them): not shown as live jobs. */

const state = { status: null, devices: {}, models: {}, jobs: [], narration: {}, followed: new Set() };

function reachable() {
  return (state.status ? state.status.hives : []).filter((hive) => hive.reachable).map((hive) => hive.hive_id);
}

function hiveOf(select) {
  return select.value || reachable()[0] || "localhost";
}

const spawnHive = el("select", { id: "spawn-hive", "aria-label": "Hive" });
const spawn = spawnForm({
  before: [el("label", {}, "Hive", spawnHive)],
  hive: () => hiveOf(spawnHive),
  models: (hiveId) => state.models[hiveId] || [],
  devices: (hiveId) => state.devices[hiveId] || [],
  done: () => refresh(),
});

function renderHives() {
  const hives = state.status.hives;
  $("#hives .count").textContent = hives.length;
  const rows = hives.map((hive) => {
    const devices = state.devices[hive.hive_id] || [];
    return el("tr", { "data-hive": hive.hive_id },
      el("td", {}, el("strong", {}, hive.hive_id)),
      el("td", {}, el("code", {}, hive.url)),
      el("td", {}, badge(hive.reachable ? "reachable" : "unreachable"),
        hive.problem ? el("div", { class: "note" }, hive.problem) : null),
      el("td", {}, hive.url === "in-process" ? "in the queen" : hive.attached ? "attached over SSH"
        : hive.installed ? "installed by this queen" : "–"),
      el("td", {}, hive.version || "–"),
      el("td", {}, devices.map((device) => el("div", {},
        el("code", {}, device.id), ` ${bytes(device.memory_free_bytes)} free of ${bytes(device.memory_total_bytes)}`))),
    );
  });
  $("#hives .body").replaceChildren(table(["Hive", "URL", "Reachable", "Runs", "Version", "Devices"], rows,
    "No hives. Add one with `rbee-keeper hive add`, or run the queen with --local-hive."));
}

function renderWorkers() {
  const workers = state.status.workers;
  $("#workers .count").textContent = workers.length;
  $("#workers .body").replaceChildren(workersTable(workers, {
    showHive: true, rates: true,
    empty: "No workers. Spawn one below, or send a request: the queen starts one for its model.",
    onStop: (worker) => stopWorker(worker.hive_id, worker, refresh, $("#workers .error")),
  }));
  refill(spawnHive, reachable());
  spawn.refresh(hiveOf(spawnHive));
}

function renderQueues() {
  // Per model: its workers (and how many the queen added for its line), its line and how long the
  // first in it has waited; then the copies of models between hives under way.
  const status = state.status;
  const queues = status.queues || {};
  const counts = {};
  for (const worker of status.workers || []) counts[worker.model] = (counts[worker.model] || 0) + 1;
  const models = [...new Set([...Object.keys(counts), ...Object.keys(queues)])].sort();
  const rows = models.map((model) => el("tr", {},
    el("td", {}, model),
    el("td", { class: "num" }, `${counts[model] || 0}` + ((status.added || {})[model] ? ` (${status.added[model]} added)` : "")),
    el("td", { class: "num" }, queues[model] || 0),
    el("td", { class: "num" }, model in (status.oldest_wait_s || {}) ? `${status.oldest_wait_s[model]} s` : "")));
  const copies = (status.copies || []).map((copy) => el("tr", {},
    el("td", {}, copy.model), el("td", {}, `${copy.from_hive} → ${copy.hive_id}`), el("td", { class: "num" }, `${copy.since_s} s`)));
  $("#queues .body").replaceChildren(
    table(["Model", "Workers", "Waiting", "Oldest wait"], rows, "No worker, and no request waiting."),
    ...(copies.length ? [table(["Copying", "From → to", "For"], copies, "")] : []));
}

function renderModels() {
  const select = $("#model-hive");
  refill(select, reachable());
  $("#models .body").replaceChildren(modelsTable(state.models[hiveOf(select)] || []));
}

function refill(select, values) {
  const previous = select.value;
  select.replaceChildren(...values.map((value) => el("option", { value }, value)));
  if (values.includes(previous)) select.value = previous;
}

function renderJobs() {
  const shown = state.jobs.filter((job) => !QUIET.has(job.operation)).slice(0, 12);
  const running = shown.filter((job) => job.state === "running" || job.state === "queued").length;
  $("#jobs .count").textContent = `${running} running`;
  $("#jobs .body").replaceChildren(...(shown.length ? shown.map((job) => el("div", { class: "job", "data-job": job.job_id },
    el("div", { class: "head" }, el("span", { class: "op" }, job.operation), badge(job.state),
      el("code", { class: "note" }, job.job_id.slice(0, 12))),
    el("div", { class: "narration" }, state.narration[job.job_id] || (job.error ? job.error.message : "")),
  )) : [el("p", { class: "empty" }, "No job is running.")]));
}

function noteJobEvent({ detail: { jobId, event } }) {
  if (event.type === "narration") state.narration[jobId] = event.human;
  else if (event.type === "progress" && event.total) {
    state.narration[jobId] = `${event.what}: ${Math.floor((100 * event.done) / event.total)}%`;
  } else return;
  if (state.jobs.some((job) => job.job_id === jobId)) renderJobs();
}

function follow(job) {
  if (state.followed.has(job.job_id) || state.followed.size > 8) return;
  state.followed.add(job.job_id);
  followJob(job.job_id).catch(() => {}).finally(() => {
    state.followed.delete(job.job_id);
    refreshJobs();
  });
}

async function refreshJobs() {
  try {
    state.jobs = await getJson("/v1/jobs");
  } catch {
    return;
  }
  for (const job of state.jobs) {
    if (!QUIET.has(job.operation) && (job.state === "running" || job.state === "queued")) follow(job);
  }
  renderJobs();
}

async function refresh() {
  try {
    state.status = await runJob({ operation: "status" });
    $("#version").textContent = `version ${state.status.version}`;
    for (const hiveId of Object.keys(state.devices)) {  // an unreachable hive's devices are not known now
      if (!reachable().includes(hiveId)) delete state.devices[hiveId];
    }
    await Promise.all(reachable().map(async (hiveId) => {
      const [capabilities, models] = await Promise.all([
        runJob({ operation: "hive_refresh_capabilities", hive_id: hiveId }),
        runJob({ operation: "model_list", hive_id: hiveId }),
      ]);
      state.devices[hiveId] = capabilities.devices;
      state.models[hiveId] = models;
    }));
    showError($("#hives .error"), null);
  } catch (failure) {
    showError($("#hives .error"), failure);
    if (!state.status) return;
  }
  renderHives();
  renderWorkers();
  renderQueues();
  renderModels();
}

async function refreshModelChoice() {
  const select = $("#playground select[name=model]");
  try {
    const models = (await getJson("/v1/models")).data.map((model) => model.id);
    refill(select, models);
  } catch {
    // the hives list shows the problem
  }
}

// --- chat playground ---------------------------------------------------------------------

const conversation = [];

function message(role, text) {
  const node = el("div", { class: `message ${role}` }, text);
  $("#playground .messages").append(node);
  return node;
}

async function chat(event) {
  event.preventDefault();
  const form = event.target;
  const prompt = form.prompt.value.trim();
  const model = form.model.value;
  if (!prompt || !model) return;
  const send = $("button[type=submit]", form);
  send.disabled = true;
  showError($("#playground .error"), null);
  conversation.push({ role: "user", content: prompt });
  message("user", prompt);
  form.prompt.value = "";
  const answer = message("assistant", "");
  answer.classList.add("streaming");
  const stats = $("#playground .stats");
  const began = performance.now();
  let first = null;
  let pieces = 0;
  let usage = null;
  try {
    const response = await call("/v1/chat/completions", {
      method: "POST",
      body: { model, messages: conversation, stream: true, stream_options: { include_usage: true },
        max_tokens: Number(form.max_tokens.value) || 128 },
    });
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw Object.assign(new Error(chunk.error.message), { code: chunk.error.code });
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = performance.now();
        pieces += 1;
        answer.textContent += delta.content;
        stats.textContent = `first token after ${((first - began) / 1000).toFixed(2)} s · ${pieces} pieces`;
      }
    }
    conversation.push({ role: "assistant", content: answer.textContent });
    const seconds = (performance.now() - (first || began)) / 1000;
    const generated = usage ? usage.completion_tokens : pieces;
    stats.textContent = [
      first === null ? "no tokens" : `first token after ${((first - began) / 1000).toFixed(2)} s`,
      usage ? `${usage.prompt_tokens} prompt tokens` : null,
      `${generated} completion tokens`,
      seconds > 0 && generated > 1 ? `${((generated - 1) / seconds).toFixed(1)} tokens/s` : null,
    ].filter(Boolean).join(" · ");
    stats.dataset.completionTokens = String(generated);
  } catch (failure) {
    conversation.pop();
    showError($("#playground .error"), failure);
  } finally {
    answer.classList.remove("streaming");
    send.disabled = false;
    refresh();
  }
}

async function start() {
  window.addEventListener("rbee-job-event", noteJobEvent);
  tokenForm($("#token-form"), () => { refresh(); refreshModelChoice(); refreshJobs(); });
  spawnHive.addEventListener("change", () => spawn.refresh(hiveOf(spawnHive)));
  $("#workers .actions").append(spawn.node);
  $("#model-hive").addEventListener("change", renderModels);
  $("#models .actions").append(downloadForm({ hive: () => hiveOf($("#model-hive")), done: () => { refresh(); refreshModelChoice(); } }));
  $("#playground form").addEventListener("submit", chat);
  $("#playground .clear").addEventListener("click", () => {
    conversation.length = 0;
    $("#playground .messages").replaceChildren();
    $("#playground .stats").textContent = "";
  });
  await Promise.all([refresh(), refreshModelChoice(), refreshJobs()]);
  setInterval(refresh, 4000);
  setInterval(refreshJobs, 2000);
  setInterval(refreshModelChoice, 15000);
}

start();
