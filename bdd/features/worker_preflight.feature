Feature: Worker Preflight Checks
  Mirrors 090-worker-resource-preflight.feature. The hive checks before it
  starts a worker: the model, the device, the backend, memory (1.2 x the
  model's size) and CPU threads; downloads check disk space first.

  Background:
    Given a fake Hugging Face hub serving "test-org/tiny-GGUF" with a 10 MB file "tiny.Q4_K_M.gguf"

  Scenario: Worker preflight RAM check passes
    Given a running hive
    When I spawn a worker of "smollm2-135m" on "CPU-0"
    Then the job succeeds
    And the preflight narration shows the RAM needed and available
    And the backend check passed for "llama-cpp"

  Scenario: EH-004a - Worker preflight RAM check fails
    Given a running hive
    And a sparse GGUF file as large as this machine's RAM
    When I spawn a worker of that file on "CPU-0"
    Then the job fails with "INSUFFICIENT_RAM"
    And the error details give required_bytes as 1.2 times the file and the available bytes
    And no worker was started

  Scenario: EH-004b - The worker crashes while loading the model
    Given a running hive
    And a file "broken.gguf" that llama.cpp cannot load
    When I spawn a worker of that file on "CPU-0"
    Then the job fails with "WORKER_START_FAILED"
    And the error says in one line "llama.cpp could not load the model", and the hive's log has the worker's last lines under its correlation id

  Scenario: Worker preflight backend check passes
    Given a running hive
    When I spawn a worker of "smollm2-135m" on "CPU-0"
    Then the backend check passed for "llama-cpp"

  Scenario: EH-009a - Backend not available
    Given a running hive
    When I run the hive operation {"operation": "worker_spawn", "model": "smollm2-135m", "device": "CPU-0", "backend": "mlx"}
    Then the job fails with "BACKEND_UNAVAILABLE"
    And the error lists the available backends

  Scenario: EH-005a, EC3 - Not enough VRAM on a GPU
    Given a running hive whose NVML reports "NVIDIA GeForce RTX 3050: 4000 MB, 100 MB free"
    When I run the hive operation {"operation": "worker_spawn", "model": "smollm2-135m", "device": "GPU-0"}
    Then the job fails with "INSUFFICIENT_VRAM"
    And the error details give the VRAM required and the 100 MB available on "GPU-0"
    And no worker was started

  Scenario: EH-009b - No CUDA on this machine
    Given a running hive with NVML hidden
    When I run the hive operation {"operation": "worker_spawn", "model": "smollm2-135m", "device": "GPU-0"}
    Then the job fails with "DEVICE_NOT_FOUND"
    And the error lists only the device "CPU-0"

  Scenario: EH-006a - Insufficient disk space for a model download
    Given a running hive with "disk_reserve_bytes=1000000000000000000"
    When I run the hive operation {"operation": "model_download", "model": "hf:test-org/tiny-GGUF"}
    Then the job fails with "INSUFFICIENT_DISK"
    And the error details give required_bytes 10000000, the available bytes and how much to free
    And nothing was downloaded

  Scenario: EH-006b - The disk fills up during a download
    Given the hub serves "test-org/big-GGUF" with a 40 MB file "big.Q4_K_M.gguf" at 10 MB/s
    And a running hive whose data dir is a 60 MB disk, with "disk_reserve_bytes=0"
    When a download of "hf:test-org/big-GGUF" is under way and another writer fills the disk
    Then the job fails with "INSUFFICIENT_DISK"
    And the error says "The disk filled up during the download"
    And the hive's catalog does not list "big-q4_k_m"
    And the hive still answers its health check

  Scenario: The CPU thread budget
    Given a running hive
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When I run the hive operation {"operation": "worker_spawn", "model": "smollm2-135m", "device": "CPU-0", "threads": 64}
    Then the job fails with "INSUFFICIENT_CPU"
    And the error hint mentions "fewer threads"
