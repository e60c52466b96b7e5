Feature: Metrics & Observability - Prometheus metrics on every daemon
  Mirrors 350-metrics-observability.feature. The seed's `pool-managerd` on
  :9090 is, in our design, the queen, each hive and each worker: every one
  serves GET /metrics in Prometheus's text format, behind the API token like
  every other endpoint ([queen] / [hive] metrics_public = true opens it for a
  scraper on a trusted network). Names are `rbee_<daemon>_...`. One queen with
  a token serves these scenarios; its in-process hive starts synthetic workers
  (filler tokens at a fixed rate, no model) and downloads from a fake HF server.

  Scenario: MET-001 - Every daemon serves /metrics, and says so when it starts
    Given a synthetic worker of "met-a" started by a chat request
    When I scrape the queen and the worker
    Then both pages parse as Prometheus text
    And the queen's page holds the in-process hive's series too
    And /metrics on the queen without the token is refused with 401
    And the queen's log says "metrics served at /metrics (the API token is needed)"

  Scenario: MET-002 - Prometheus format compliance
    When I scrape the queen
    Then every metric family has a HELP and a TYPE line
    And every name is snake_case under "rbee_queen_" or "rbee_hive_"
    And counters end in "_total", and durations and sizes carry their unit

  Scenario: MET-003 - Workers by state, read from the registry at each scrape
    Given a synthetic worker of "met-b" started by a chat request
    When I scrape the queen
    Then "rbee_queen_workers" has a series for each of loading, ready, busy and draining
    And the "ready" workers number at least 1
    When I stop that worker through the queen
    Then the "ready" workers number one fewer

  Scenario: MET-004 - Request latency histogram
    Given a synthetic worker of "met-a" started by a chat request
    When I scrape the queen
    And I send 3 chat requests for "met-a"
    And I scrape the queen again
    Then the latency histogram of "/v1/chat/completions" has the buckets 0.001, 0.01, 0.1, 1 and 10
    And its count rose by 3

  Scenario: MET-005 - Errors counted by code, refused credentials by reason
    When I scrape the queen
    And I submit a job with an unknown operation
    And I send a request with the wrong token
    And I scrape the queen again
    Then "rbee_queen_errors_total" for the job's error code rose by 1
    And "rbee_queen_http_requests_total" for "/v1/jobs" with status 400 rose by 1
    And "rbee_queen_auth_failures_total" with reason "invalid_token" rose by 1

  Scenario: MET-006 - Device memory gauges: RAM from the machine, VRAM from NVML
    When I scrape the queen
    Then "rbee_hive_device_memory_total_bytes" of "CPU-0" is this machine's RAM
    And "rbee_hive_device_memory_free_bytes" of "CPU-0" is more than 0
    And a GPU that NVML reports shows as "GPU-0" of kind "cuda" with its total and free VRAM

  Scenario: MET-007 - Model download progress
    Given the hub serves "met-org/tiny-GGUF" with a 24 MB file at 12 MB/s
    When I scrape the queen
    And I start downloading "hf:met-org/tiny-GGUF" on the local hive
    Then while it runs, the download's progress ratio is between 0 and 1
    When the download job is done
    And I scrape the queen again
    Then "rbee_hive_download_bytes_total" rose by 24 MB
    And "rbee_hive_downloads_total" with outcome "completed" rose by 1
    And no download progress series is left

  Scenario: MET-008 - Health checks of workers, by result
    Given a synthetic worker of "met-health" started by a chat request
    Then within 5 seconds "rbee_hive_worker_health_checks_total" with result "success" rises
    When that worker's process is stopped with SIGSTOP
    Then within 10 seconds "rbee_hive_worker_health_checks_total" with result "failure" rises

  Scenario: MET-009 - Crashes counted by model
    Given a synthetic worker of "met-crash" started by a chat request
    When I scrape the queen
    And that worker's process is killed with SIGKILL
    Then within 10 seconds "rbee_hive_worker_crashes_total" of "met-crash" rose by 1

  Scenario: MET-010 - Request throughput: a counter to take the rate of
    Given a synthetic worker of "met-a" started by a chat request
    When I scrape the queen
    And I send 5 chat requests for "met-a"
    And I scrape the queen again
    Then "rbee_queen_http_requests_total" for "/v1/chat/completions" with status 200 rose by 5
    And "rbee_queen_inferences_total" of "met-a" with outcome "completed" rose by 5
    And "rbee_queen_completion_tokens_total" of "met-a" rose by 20

  Scenario: MET-012 - Correlation ids stay in logs and headers, never in labels
    When I submit a job with an unknown operation
    Then the answer's X-Correlation-Id is in the queen's log
    And no label on the queen's /metrics holds that correlation id

  Scenario: MET-013 - Secrets never reach a metric label
    Given a synthetic worker of "met-a" started by a chat request
    When I send a request with the wrong token
    And I send a chat request for "met-a" whose prompt holds "very-private-prompt-7731"
    Then neither the wrong token, the queen's token nor the prompt is on the queen's or the worker's /metrics
