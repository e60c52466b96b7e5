Feature: Daemon Lifecycle Management
  Mirrors bin/99_shared_crates/daemon-lifecycle (placeholder.feature). The
  daemons our programs start: the queen (started by rbee-keeper) and the
  workers (started by rbee-hive). Finding binaries in cargo's target/ folders
  has no counterpart in Python; see COVERAGE.md.

  Scenario: A started daemon does not hold its parent's stdout and stderr
    When I run "rbee-keeper queen start" with stdout and stderr captured by pipes
    Then the command returns within 10 seconds with exit code 0
    And the queen keeps running without the pipes

  Scenario: SSH_AUTH_SOCK is propagated to the daemon
    When I run "rbee-keeper queen start" with SSH_AUTH_SOCK set to "/tmp/rbee-bdd-agent.sock"
    Then the queen's environment has SSH_AUTH_SOCK "/tmp/rbee-bdd-agent.sock"

  Scenario: Daemon spawn with a missing binary fails gracefully
    Given a running hive with "worker_binary=/nonexistent/bin/llm-worker-rbee"
    When I spawn a worker of "smollm2-135m" on "CPU-0"
    Then the job fails with "WORKER_BINARY_NOT_FOUND"
    And the error message mentions "not found at /nonexistent/bin/llm-worker-rbee"

  Scenario: Daemon spawn returns a valid PID
    Given a running hive
    When I spawn a worker of "smollm2-135m" on "CPU-0"
    Then the worker's pid is greater than 0 and belongs to a running process

  Scenario: The worker binary is found next to the Python that runs the hive
    Given a running hive
    When I spawn a worker of "smollm2-135m" on "CPU-0"
    Then the worker runs the llm-worker-rbee next to the hive's Python

  Scenario: Spawn 5 daemons concurrently
    Given a running hive with "cpu_threads=5"
    When 5 workers are spawned at once
    Then all 5 spawns succeed with unique pids and ports

  Scenario: Daemon spawn with an absolute path
    Given a running hive whose worker_binary is the absolute path of llm-worker-rbee
    When I spawn a worker of "smollm2-135m" on "CPU-0"
    Then the job succeeds

  Scenario: Daemon spawn with a relative path
    Given a running hive started in the scripts folder with worker_binary "./llm-worker-rbee"
    When I spawn a worker of "smollm2-135m" on "CPU-0"
    Then the job succeeds

  Scenario: Daemon spawn with a symlink path
    Given a running hive whose worker_binary is a symlink to llm-worker-rbee
    When I spawn a worker of "smollm2-135m" on "CPU-0"
    Then the job succeeds
    And the worker process runs the symlink's target
