Feature: rbee-hive Daemon Lifecycle
  Mirrors 110-rbee-hive-lifecycle.feature. Intervals are configured short
  (checks every 0.3 s, idle timeout 1 s, grace 1 s); the behaviour is the same.
  A "frozen" worker is a real worker stopped with SIGSTOP: its process lives,
  its HTTP does not answer, and it ignores every signal but SIGKILL.

  Scenario: Rbee-hive remains running as a persistent HTTP daemon
    Given a running hive
    And a worker of "smollm2-135m" spawned on "CPU-0"
    Then the hive still answers /health
    And the hive lists the worker as "ready"

  Scenario: Rbee-hive monitors worker health
    Given a running hive with "worker_check_s=0.3"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When the worker freezes
    Then within 5 seconds the worker is gone from the hive
    And the hive log shows "failed health check 3 of 3"
    And the hive still answers /health

  Scenario: Rbee-hive enforces the idle timeout (worker dies, hive lives)
    Given a running hive with "worker_check_s=0.3, worker_idle_timeout_s=1"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    Then within 5 seconds the worker is gone from the hive
    And the hive log shows "idle for"
    And the hive still answers /health

  Scenario: Cascading shutdown when rbee-hive receives SIGTERM
    Given a fake Hugging Face hub serving "test-org/tiny-GGUF" with a 1 MB file "tiny.Q4_K_M.gguf"
    And a running hive
    And the hive has downloaded "hf:test-org/tiny-GGUF"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When I send SIGTERM to the hive
    Then the hive exits with code 0 within 6 seconds
    And the hive log shows "/v1/admin/shutdown" for each worker
    And no worker process is left
    And a new hive still lists "hf:test-org/tiny-GGUF" in its catalog

  Scenario: EH-014a - Worker ignores the shutdown request
    Given a running hive with "worker_stop_grace_s=1"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When the worker freezes
    And I send SIGTERM to the hive
    Then the hive exits with code 0 within 5 seconds
    And the hive log shows "SIGKILL"
    And the hive log shows "All workers stopped"
    And no worker process is left

  Scenario: EH-014b - Graceful shutdown with an active request
    Given a running hive
    And a worker of "smollm2-135m" spawned on "CPU-0"
    And the worker is generating 100 tokens for a client
    When I stop the worker through the hive without waiting
    Then a new request to the worker gets 503 "DRAINING"
    And the client's stream ends with an "end" event, then "[DONE]"
    And the hive log shows "stopped with exit code 0"

  Scenario: EC10 - Idle timeout and worker auto-shutdown
    Given a running hive with "worker_check_s=0.3, worker_idle_timeout_s=1"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    Then within 5 seconds the worker is gone from the hive
    And the hive log shows "stopped with exit code 0"

  Scenario: LIFE-001 - Store worker PID on spawn
    Given a running hive
    And a worker of "smollm2-135m" spawned on "CPU-0"
    Then the worker's pid is a live llm-worker-rbee process, a child of the hive

  Scenario: LIFE-002 - Track PID across the worker's lifecycle
    Given a running hive
    When I spawn a worker of "smollm2-135m" on "CPU-0"
    Then the pid narrated while loading is the pid of the ready worker and of worker_list

  Scenario: LIFE-003 - Force-kill the worker after the graceful timeout
    Given a running hive with "worker_stop_grace_s=1"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When the worker freezes
    And I stop the worker through the hive
    Then the job succeeds
    And the job narrates "sending SIGKILL to pid"
    And the worker's process is gone

  Scenario: LIFE-004 - Force-kill a hung worker
    Given a running hive with "worker_stop_grace_s=1"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When the worker freezes
    And I stop the worker through the hive
    Then the hive log shows "(pid" and "SIGKILL" on one line
    And the hive lists no workers

  Scenario: LIFE-005 - Liveness is the process and HTTP
    Given a running hive with "worker_check_s=0.3"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When the first worker is killed with SIGKILL
    And the second worker freezes
    Then within 1 seconds the first worker is gone from the hive
    And within 5 seconds the second worker is gone from the hive

  Scenario: LIFE-006 - Ready timeout kills a worker stuck loading
    Given a running hive with "worker_ready_timeout_s=0.05"
    When I spawn a worker of "smollm2-135m" on "CPU-0"
    Then the job fails with "WORKER_READY_TIMEOUT"
    And the started worker's process is gone
    And the hive lists no workers

  Scenario: LIFE-007 - Parallel worker shutdown
    Given a running hive with "cpu_threads=5"
    And 5 workers of "smollm2-135m" spawned on "CPU-0"
    When I send SIGTERM to the hive
    Then the hive exits with code 0 within 15 seconds
    And no worker process is left

  Scenario: LIFE-008 - Shutdown deadline enforcement
    Given a running hive with "worker_stop_grace_s=1"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When the first worker freezes
    And I send SIGTERM to the hive
    Then the hive exits with code 0 within 5 seconds
    And no worker process is left

  Scenario: LIFE-009 - Shutdown progress is logged
    Given a running hive
    And a worker of "smollm2-135m" spawned on "CPU-0"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When I send SIGTERM to the hive
    Then the hive exits with code 0 within 6 seconds
    And the hive log shows, in this order:
      | line                     |
      | Shutting down 2 worker(s) |
      | 1/2 workers stopped      |
      | 2/2 workers stopped      |
      | All workers stopped      |

  Scenario: LIFE-010 - PID cleanup on worker removal
    Given a running hive
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When I stop the worker through the hive
    Then the hive lists no workers
    And worker_get of that worker fails with "WORKER_NOT_FOUND"

  Scenario: LIFE-011 - Detect a worker crash via its process
    Given a running hive
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When the first worker is killed with SIGKILL
    Then within 1 seconds the first worker is gone from the hive
    And the hive log shows the worker's id and pid with "died with exit code -9"

  Scenario: LIFE-012 - Zombie process cleanup
    Given a running hive
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When the first worker is killed with SIGKILL
    Then within 1 seconds the worker's process is reaped, not a zombie

  Scenario: LIFE-013 - Multiple workers force-killed in parallel
    Given a running hive with "cpu_threads=3, worker_stop_grace_s=1"
    And 3 workers of "smollm2-135m" spawned on "CPU-0"
    When every worker freezes
    And I send SIGTERM to the hive
    Then the hive exits with code 0 within 5 seconds
    And the hive log shows 3 "killing worker" lines within half a second of each other
    And no worker process is left

  Scenario: LIFE-014 - Force-kill audit logging
    Given a running hive with "worker_stop_grace_s=1"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When the worker freezes
    And I stop the worker through the hive
    Then the hive's SIGKILL log line has a timestamp, the worker id, the pid and the reason

  Scenario: LIFE-015 - Graceful shutdown preferred over force-kill
    Given a running hive
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When I stop the worker through the hive
    Then the hive log shows "stopped with exit code 0"
    And the hive log does not show "SIGKILL"
