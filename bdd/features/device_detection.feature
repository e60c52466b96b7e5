Feature: Hive Device Detection Endpoint
  Mirrors bin/20_rbee_hive/.../device_detection_endpoint.feature. Our
  endpoint is GET /v1/capabilities; devices are named as worker_spawn takes
  them (CPU-0, GPU-<n>, METAL-0), with memory in bytes. Where a scenario
  needs GPUs, or none, the hive reads a stand-in for NVML (nvidia-ml-py's
  pynvml, not ours), so the answer does not depend on this machine.

  Background:
    Given a fake Hugging Face hub serving "test-org/tiny-GGUF" with a 1 MB file "tiny.Q4_K_M.gguf"
    And the hub also serves "test-org/other-GGUF" with a 1 MB file "other.Q8_0.gguf"

  Scenario: Device detection returns CPU and GPU information
    Given a running hive whose NVML reports "NVIDIA GeForce RTX 3090: 24000 MB, 23000 MB free"
    When I ask the hive for its capabilities
    Then the answer is 200 JSON with a CPU-0 entry, a list of devices, and model and worker counts
    And the devices are "CPU-0, GPU-0"

  Scenario: Device detection with CUDA GPUs
    Given a running hive whose NVML reports "NVIDIA GeForce RTX 3060: 12000 MB, 11000 MB free; NVIDIA GeForce RTX 3090: 24000 MB, 20000 MB free"
    When I ask the hive for its capabilities
    Then the devices are "CPU-0, GPU-0, GPU-1"
    And GPU-0 is a cuda device "NVIDIA GeForce RTX 3060" with 12000 MB, 11000 MB free
    And GPU-1 is a cuda device "NVIDIA GeForce RTX 3090" with 24000 MB, 20000 MB free

  Scenario: Device detection with CPU only (no GPUs)
    Given a running hive with NVML hidden
    When I ask the hive for its capabilities
    Then the devices hold no GPU entry

  Scenario: Device detection includes the model catalog count
    Given a running hive
    And the hive has downloaded "hf:test-org/tiny-GGUF"
    And the hive has downloaded "hf:test-org/other-GGUF"
    When I ask the hive for its capabilities
    Then it counts 3 models and 0 workers

  Scenario: Device detection includes the worker count
    Given a running hive
    And 2 workers of "smollm2-135m" are running on the hive
    When I ask the hive for its capabilities
    Then it counts 1 models and 2 workers

  Scenario: Device detection with no models or workers
    Given a running hive
    When I ask the hive for its capabilities
    Then it counts 1 models and 0 workers

  Scenario: Device detection uses the real detection
    Given a running hive
    When I ask the hive for its capabilities
    Then CPU-0 has this machine's physical cores, logical cores and total RAM
    And its name is this machine's CPU model

  Scenario: Device detection without NVML
    Given a running hive with NVML hidden
    When I ask the hive for its capabilities
    Then the devices hold no GPU entry
    And the hive log holds no error

  Scenario: Device detection response has the documented JSON structure
    Given a running hive
    When I ask the hive for its capabilities
    Then it has hive_id, devices, backends, disk_free_bytes, models and workers
    And each device has id, kind, name, memory_total_bytes and memory_free_bytes

  Scenario: GPU ids follow the NVML index
    Given a running hive whose NVML reports 3 cards
    When I ask the hive for its capabilities
    Then the devices are "CPU-0, GPU-0, GPU-1, GPU-2"

  Scenario: Device detection with the maximum GPU count
    Given a running hive whose NVML reports 8 cards
    When I ask the hive for its capabilities
    Then the devices are "CPU-0, GPU-0, GPU-1, GPU-2, GPU-3, GPU-4, GPU-5, GPU-6, GPU-7"

  Scenario: Device detection is idempotent
    Given a running hive
    When I ask the hive for its capabilities twice
    Then both answers are the same apart from free memory and free disk

  Scenario: Device detection completes quickly
    Given a running hive
    When I ask the hive for its capabilities
    Then it answered within 10 seconds

  Scenario: Device detection handles concurrent requests
    Given a running hive
    When 5 clients ask the hive for its capabilities at once
    Then all 5 answer 200 and agree apart from free memory and free disk
