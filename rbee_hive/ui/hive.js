// The hive's page: its devices, its model catalog (with downloads) and its workers.

import { bytes, el, followJob, getJson, progressBar, runJob, showError, tokenForm } from "./api.js";
import { devicesTable, downloadForm, modelsTable, spawnForm, stopWorker, workersTable } from "./panels.js";

const state = { hiveId: "localhost", devices: [], models: [], workers: [], downloads: new Map(), own: new Set() };
/** downloads: job id -> {model, done, total} of downloads this page follows; own: the ones it started. */
const $ = (selector) => document.querySelector(selector);

const spawn = spawnForm({
  hive: () => state.hiveId,
  models: () => state.models,
  devices: () => state.devices,
  done: () => refresh(),
});

function render() {
  $("#devices .body").replaceChildren(devicesTable(state.devices));
  $("#models .count").textContent = state.models.length;
  $("#models .body").replaceChildren(modelsTable(state.models));
  $("#workers .count").textContent = state.workers.length;
  $("#workers .body").replaceChildren(workersTable(state.workers, {
    empty: "No workers on this hive. Spawn one below.",
    onStop: (worker) => stopWorker(state.hiveId, worker, refresh, $("#workers .error")),
  }));
  spawn.refresh(state.hiveId);
}

function renderDownloads() {
  $("#models .downloads").replaceChildren(...[...state.downloads.values()].map((download) =>
    el("div", { class: "download" }, el("div", { class: "note" }, `Downloading ${download.model}`,
      download.total ? ` (${bytes(download.done)} of ${bytes(download.total)})` : ""),
    progressBar(download.done, download.total || 1))));
}

/** Downloads started elsewhere (the queen, the API): shown with their progress as they run. */
async function followDownloads() {
  let jobs;
  try {
    jobs = await getJson("/v1/jobs");
  } catch {
    return;
  }
  for (const job of jobs) {
    if (job.operation !== "model_download" || job.state !== "running") continue;
    if (state.own.has(job.job_id) || state.downloads.has(job.job_id)) continue;
    const download = { model: "a model", done: 0, total: 0 };
    state.downloads.set(job.job_id, download);
    renderDownloads();
    followJob(job.job_id, {
      onEvent: (event) => {
        if (event.type === "narration" && event.fields && event.fields.model) download.model = event.fields.model;
        if (event.type === "progress" && event.total) Object.assign(download, { done: event.done, total: event.total });
        renderDownloads();
      },
    }).catch(() => {}).finally(() => {
      state.downloads.delete(job.job_id);
      renderDownloads();
      refresh();
    });
  }
}

async function refresh() {
  try {
    const [capabilities, models, workers] = await Promise.all([
      getJson("/v1/capabilities"),
      runJob({ operation: "model_list", hive_id: state.hiveId }),
      runJob({ operation: "worker_list", hive_id: state.hiveId }),
    ]);
    state.devices = capabilities.devices;
    state.models = models;
    state.workers = workers;
    showError($("#workers .error"), null);
    render();
  } catch (failure) {
    showError($("#workers .error"), failure);
  }
}

async function start() {
  const health = await getJson("/health");
  state.hiveId = health.hive_id;
  $("#hive-id").textContent = health.hive_id;
  $("#version").textContent = `version ${health.version}`;
  document.title = `rbee hive ${health.hive_id}`;
  $("#models .actions").append(downloadForm({ hive: () => state.hiveId, done: refresh,
    onCreated: (jobId) => state.own.add(jobId) }));
  $("#workers .actions").append(spawn.node);
  tokenForm($("#token-form"), refresh);
  await Promise.all([refresh(), followDownloads()]);
  setInterval(refresh, 3000);
  setInterval(followDownloads, 1000);
}

start();
