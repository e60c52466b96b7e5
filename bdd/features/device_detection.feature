Feature: Hive Device Detection Endpoint
  Mirrors bin/20_rbee_hive/.../device_detection_endpoint.feature. Our
  endpoint is GET /v1/capabilities; devices are named as worker_spawn takes
  them (CPU-0, GPU-<n>, METAL-0), with memory in bytes. This machine has no
  GPU; the GPU-only scenarios are listed in COVERAGE.md.

  Background:
    Given a fake Hugging Face hub serving "test-org/tiny-GGUF" with a 1 MB file "tiny.Q4_K_M.gguf"
    And the hub also serves "test-org/other-GGUF" with a 1 MB file "other.Q8_0.gguf"
    And a running hive

  Scenario: Device detection returns CPU and GPU information
    When I ask the hive for its capabilities
    Then the answer is 200 JSON with a CPU-0 entry, a list of devices, and model and worker counts

  Scenario: Device detection with CPU only (no GPUs)
    When I ask the hive for its capabilities
    Then the devices hold no GPU entry

  Scenario: Device detection includes the model catalog count
    Given the hive has downloaded "hf:test-org/tiny-GGUF"
    And the hive has downloaded "hf:test-org/other-GGUF"
    When I ask the hive for its capabilities
    Then it counts 3 models and 0 workers

  Scenario: Device detection includes the worker count
    Given 2 workers of "smollm2-135m" are running on the hive
    When I ask the hive for its capabilities
    Then it counts 1 models and 2 workers

  Scenario: Device detection with no models or workers
    When I ask the hive for its capabilities
    Then it counts 1 models and 0 workers

  Scenario: Device detection uses the real detection
    When I ask the hive for its capabilities
    Then CPU-0 has this machine's physical cores, logical cores and total RAM
    And its name is this machine's CPU model

  Scenario: Device detection without NVML
    When I ask the hive for its capabilities
    Then the devices hold no GPU entry
    And the hive log holds no error

  Scenario: Device detection response has the documented JSON structure
    When I ask the hive for its capabilities
    Then it has hive_id, devices, backends, disk_free_bytes, models and workers
    And each device has id, kind, name, memory_total_bytes and memory_free_bytes

  Scenario: Device detection is idempotent
    When I ask the hive for its capabilities twice
    Then both answers are the same apart from free memory and free disk

  Scenario: Device detection completes quickly
    When I ask the hive for its capabilities
    Then it answered within 2 seconds

  Scenario: Device detection handles concurrent requests
    When 5 clients ask the hive for its capabilities at once
    Then all 5 answer 200 and agree apart from free memory and free disk
