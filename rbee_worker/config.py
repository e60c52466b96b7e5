"""The worker's settings, all from its command line (the hive starts it)."""

from __future__ import annotations

import msgspec


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    model_name: str | None = None
    """The name it reports (the hive's catalog id); the reference itself by default."""
    device: str = "CPU-0"
    backend: str = "auto"
    host: str = "127.0.0.1"
    port: int = 0
    worker_id: str = "worker-local"
    hive_id: str = "localhost"
    queen_url: str | None = None
    threads: int = 1
    ctx: int = 2048
    slots: int = 1
    cache_ram_mib: int = 0
    """Host RAM for saved prompt prefixes (llama.cpp only; 0: none)."""
    lifeline_fd: int | None = None
    heartbeat_s: float = 5.0
    drain_s: float = 5.0
    max_body_bytes: int = 1 << 20
    synthetic_tokens_per_s: float = 20.0
    synthetic_prefill_tokens_per_s: float = 0.0
    """--backend synthetic only: prompt tokens not in its modelled cache cost 1/this s each (0: free)."""
    """--backend synthetic only (benchmarks and tests): its fixed token rate."""
    script: str | None = None
    """--backend synthetic only (tests): a JSON file of scripted replies
    (`rbee_worker/backends/synthetic.py`)."""
    tensor_split: list[float] = []
    """llama.cpp: each device's share of the layers (this machine's, then each RPC server's)."""
    rpc: list[str] = []
    """llama.cpp: RPC servers (127.0.0.1:port, tunnels) that hold part of the layers."""
    metrics_public: bool = False
    """Serve /metrics without the token (its hive's `metrics_public`)."""
    api_token: str | None = None
    """Wanted on every endpoint but /health, and presented on heartbeats ($RBEE_API_TOKEN)."""

    @property
    def served_name(self) -> str:
        return self.model_name or self.model
