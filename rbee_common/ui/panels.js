// Panels both pages show: workers, models with downloads, devices, and the spawn form.
// Each operation runs as a job on this daemon; a queen forwards hive operations to `hive_id`.

import { badge, bytes, el, progressBar, runJob, showError, table } from "./api.js";

export function workersTable(workers, { onStop, showHive = false, rates = false, empty = "No workers." } = {}) {
  const columns = ["Worker", "Model", ...(showHive ? ["Hive"] : []), "Device", "State", "Slots busy",
    ...(rates ? ["Tokens/s"] : []), ""];
  const rows = workers.map((worker) => el("tr", { "data-worker": worker.worker_id },
    el("td", {}, el("code", {}, worker.worker_id)),
    el("td", {}, worker.model),
    showHive ? el("td", {}, worker.hive_id) : null,
    el("td", {}, worker.device),
    el("td", {}, badge(worker.state)),
    el("td", { class: "num" }, `${worker.slots_busy} / ${worker.slots_total}`),
    rates ? el("td", { class: "num" }, worker.tokens_per_s == null ? "–" : worker.tokens_per_s.toFixed(1)) : null,
    el("td", { class: "num" }, onStop && worker.state !== "draining"
      ? el("button", { class: "danger", type: "button", onclick: () => onStop(worker) }, "Stop")
      : null),
  ));
  return table(columns, rows, empty);
}

export function modelsTable(models) {
  const rows = models.map((model) => el("tr", {},
    el("td", {}, el("code", {}, model.id)),
    el("td", {}, model.format),
    el("td", {}, model.provider),
    el("td", { class: "num" }, bytes(model.size_bytes)),
  ));
  return table(["Model", "Format", "From", "Size"], rows, "No models in the catalog.");
}

export function devicesTable(devices) {
  const rows = devices.map((device) => el("tr", {},
    el("td", {}, el("code", {}, device.id)),
    el("td", {}, device.name),
    el("td", { class: "num" }, bytes(device.memory_free_bytes)),
    el("td", { class: "num" }, bytes(device.memory_total_bytes)),
    el("td", { class: "num" }, device.cores ? `${device.cores} cores` : device.compute_capability || ""),
  ));
  return table(["Device", "Name", "Free", "Total", ""], rows, "No devices reported.");
}

/** The log of one running job: its narration lines, newest last. */
export function jobLog(list) {
  return (event) => {
    if (event.type !== "narration") return;
    list.append(el("li", { class: event.level }, event.human));
    while (list.children.length > 40) list.firstChild.remove();
    list.scrollTop = list.scrollHeight;
  };
}

function choices(select, values, keep = true) {
  const previous = select.value;
  select.replaceChildren(...values.map(([value, label]) => el("option", { value }, label)));
  if (keep && values.some(([value]) => value === previous)) select.value = previous;
}

/**
 * The spawn form: model and device of a hive (`hive()` gives its id, `models(hiveId)` and
 * `devices(hiveId)` its catalog and devices). `done()` runs when a worker is up.
 */
export function spawnForm({ hive, models, devices, done, before = [] }) {
  const model = el("select", { name: "model", "aria-label": "Model" });
  const device = el("select", { name: "device", "aria-label": "Device" });
  const button = el("button", { type: "submit" }, "Spawn worker");
  const error = el("div", { class: "error" });
  const log = el("ol", { class: "log" });
  const form = el("form", { class: "inline spawn" }, before,
    el("label", {}, "Model", model), el("label", {}, "Device", device), button);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    showError(error, null);
    log.replaceChildren();
    try {
      await runJob({ operation: "worker_spawn", hive_id: hive(), model: model.value, device: device.value },
        { onEvent: jobLog(log) });
      done();
    } catch (failure) {
      showError(error, failure);
    } finally {
      button.disabled = false;
    }
  });
  return {
    node: el("div", {}, form, error, log),
    refresh(hiveId) {
      choices(model, models(hiveId).map((m) => [m.id, m.id]));
      choices(device, devices(hiveId).map((d) => [d.id, `${d.id} (${bytes(d.memory_free_bytes)} free)`]));
      button.disabled = !model.options.length || !device.options.length;
    },
  };
}

/** The download form: a model reference, downloaded on `hive()` with a progress bar. */
export function downloadForm({ hive, done, onCreated = () => {} }) {
  const reference = el("input", { name: "reference", placeholder: "hf:org/repo:Q4_K_M", size: 34, required: true,
    "aria-label": "Model reference" });
  const button = el("button", { type: "submit" }, "Download");
  const progress = el("div", { class: "download-progress" });
  const error = el("div", { class: "error" });
  const log = el("ol", { class: "log" });
  const form = el("form", { class: "inline download" }, el("label", {}, "Model reference", reference), button);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    showError(error, null);
    log.replaceChildren();
    progress.replaceChildren(progressBar(0, 1));
    const narrate = jobLog(log);
    try {
      const entry = await runJob({ operation: "model_download", hive_id: hive(), model: reference.value.trim() }, {
        onCreated,
        onEvent: (event) => {
          if (event.type === "progress" && event.total) {
            progress.replaceChildren(progressBar(event.done, event.total),
              el("div", { class: "note" }, `${bytes(event.done)} of ${bytes(event.total)}`));
          }
          narrate(event);
        },
      });
      progress.replaceChildren(progressBar(1, 1), el("div", { class: "note" }, `${entry.id}: ${bytes(entry.size_bytes)}`));
      done();
    } catch (failure) {
      progress.replaceChildren();
      showError(error, failure);
    } finally {
      button.disabled = false;
    }
  });
  return el("div", {}, form, progress, error, log);
}

export function stopWorker(hiveId, worker, done, errorNode) {
  showError(errorNode, null);
  runJob({ operation: "worker_stop", hive_id: hiveId, worker_id: worker.worker_id })
    .then(done, (failure) => showError(errorNode, failure));
}
