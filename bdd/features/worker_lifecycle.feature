Feature: worker-rbee Daemon Lifecycle
  Mirrors 100-worker-rbee-lifecycle.feature where it concerns the worker
  itself. Spawning, the hive's worker registry and the loading timeout belong
  to the hive (see COVERAGE.md). The old ready callback to the hive is our
  ready line on stdout (read by the parent) plus heartbeats to the queen.

  Scenario: Worker startup sequence
    Given a running queen
    When I start a worker for "smollm2-135m" on "CPU-0" that reports to the queen
    Then the worker prints one ready line with its worker_id and url
    And the worker answers on that url
    And the queen lists the worker with its url, model, backend and device

  Scenario: Worker health check while loading
    When I start a worker for the tiny MLX model on a fixed port
    Then /v1/ready answers "loading" before the worker announces it is ready
    And /v1/ready answers "ready" once it has announced it

  Scenario: Worker health check when ready
    Given a running worker with 1 slot
    Then /v1/ready answers "ready" with 0 of 1 slots busy
    And a chat inference request streams tokens

  Scenario: EH-012b - Worker port already in use
    Given a port that another process holds
    When I start a worker on that port
    Then the worker exits with code 1 within 30 seconds
    And its log says in one line that the port is taken and how to fix it

  Scenario: EH-012c - Worker crashes during startup
    Given a file named "broken.gguf" that is not a model
    When I start a worker for that file
    Then the worker exits with code 1 within 30 seconds
    And its log says in one line that llama.cpp could not load the model
