Feature: rbee-hive Worker Registry
  Mirrors 060-rbee-hive-worker-registry.feature, the hive's side. Choosing a
  worker and retrying a hive are the queen's and keeper's (see COVERAGE.md).

  Background:
    Given a fake Hugging Face hub serving "test-org/unused-GGUF" with a 1 MB file "unused.Q4_0.gguf"
    And a running hive

  Scenario: Pool preflight health check succeeds
    When I ask the hive for /health
    Then it answers 200 with status "ok", its version and api_version "v1"

  Scenario: Worker registry returns an empty list
    When I run the hive operation {"operation": "worker_list"}
    Then the job succeeds
    And the result is an empty list

  Scenario: Worker registry returns a matching idle worker
    Given a worker of "smollm2-135m" spawned on "CPU-0"
    When I run the hive operation {"operation": "worker_list"}
    Then the result lists 1 worker of "smollm2-135m" in state "ready" with 0 slots busy

  Scenario: Worker registry returns a matching busy worker
    Given a worker of "smollm2-135m" spawned on "CPU-0"
    And every slot of the worker is busy with a long request
    When I run the hive operation {"operation": "worker_list"}
    Then the result lists 1 worker of "smollm2-135m" in state "busy" with every slot busy
