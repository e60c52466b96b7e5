"""The hive's series (`/metrics`): its machine, its workers, its downloads.

Devices' memory (RAM from psutil, VRAM from NVML), CPU use, workers by state
and running downloads are read at each scrape; spawns, crashes, health checks
and downloaded bytes are counted where they happen. Under `--local-hive` the
queen's `/metrics` serves these too, after its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import psutil
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from rbee_common.metrics import Metrics
from rbee_common.wire import Device, WorkerRecord


class HiveMetrics(Metrics):
    def __init__(self) -> None:
        super().__init__("rbee_hive")
        self.spawns = self.counter(
            "worker_spawns", "Worker starts, by backend and outcome (completed, failed).",
            ["backend", "outcome"])
        self.start_duration = self.histogram(
            "worker_start_duration_seconds", "From spawning a worker to its ready line (model load).",
            ["backend"])
        self.crashes = self.counter(
            "worker_crashes", "Workers that exited without being asked to, by model.", ["model"])
        self.health_checks = self.counter(
            "worker_health_checks", "Health checks of workers, by result (success, failure).", ["result"])
        self.downloads = self.counter(
            "downloads", "Model downloads finished, by outcome (completed, failed).", ["outcome"])
        self.download_failures = self.counter(
            "download_failures", "Failed model downloads, by error code.", ["code"])
        self.download_bytes = self.counter("download_bytes", "Bytes received from the model hub.")

    def watch(
        self, devices: Callable[[], list[Device]], workers: Callable[[], list[WorkerRecord]],
        downloads: Callable[[], dict[str, tuple[int, int | None]]],
    ) -> None:
        """Devices, CPU, workers and running downloads (model -> bytes done, total): read at each
        scrape."""
        psutil.cpu_percent(None)  # the first call only starts the interval

        def collect() -> Iterable[Metric]:
            total = GaugeMetricFamily(self.name("device_memory_total_bytes"),
                                      "Memory of each device (RAM for CPU-0, VRAM for a GPU).",
                                      labels=["device", "kind"])
            free = GaugeMetricFamily(self.name("device_memory_free_bytes"),
                                     "Memory available on each device now.", labels=["device", "kind"])
            for device in devices():
                total.add_metric([device.id, device.kind], device.memory_total_bytes)
                free.add_metric([device.id, device.kind], device.memory_free_bytes)
            cpu = GaugeMetricFamily(self.name("cpu_utilization_ratio"),
                                    "CPU use of the whole machine since the previous scrape (0 to 1).")
            cpu.add_metric([], psutil.cpu_percent(None) / 100)
            running = workers()
            by_state = self.workers_by_state(running, "Workers on this hive, by state.")
            busy = GaugeMetricFamily(self.name("worker_slots_busy"),
                                     "Busy slots per worker (as of its last health check).",
                                     labels=["worker_id", "model", "device"])
            for worker in running:
                busy.add_metric([worker.worker_id, worker.model, worker.device], worker.slots_busy)
            progress = GaugeMetricFamily(self.name("download_progress_ratio"),
                                         "Downloads under way: the part received (0 to 1).", labels=["model"])
            for model, (done, size) in sorted(downloads().items()):
                progress.add_metric([model], done / size if size else 0.0)
            return [total, free, cpu, by_state, busy, progress]

        self.collect_with(collect)
