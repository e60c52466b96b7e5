Feature: queen-rbee Global Registry Concurrency
  Mirrors 200-concurrency-scenarios.feature. The registry is fed by heartbeats
  (POST /v1/worker-heartbeat); here the test sends them itself, many at once,
  as the hives' workers would. The queen handles them on one trio thread, so
  each update is whole: there is no lock to deadlock on.

  Background:
    Given a running queen that knows the hives "hive-a, hive-b, hive-c"

  Scenario: Gap-C1 - Concurrent worker registration
    When the hives "hive-a, hive-b, hive-c" register the worker "worker-001" at the same moment
    Then exactly one registration answers 204 and the others 409 "WORKER_ALREADY_REGISTERED"
    And the queen lists exactly one "worker-001"

  Scenario: Gap-C2 - Race on worker state updates
    Given the worker "worker-001" of "hive-a" has registered
    When 20 heartbeats of "worker-001" with alternating states arrive at once
    And one more heartbeat says "ready"
    Then every heartbeat answered 204
    And the queen lists exactly one "worker-001" in state "ready"

  Scenario: Gap-C6 - Registry cleanup during an active registration
    Given the queen drops workers silent for 1 second
    And the worker "worker-old" of "hive-a" has registered
    When 2 seconds pass
    And the worker "worker-new" of "hive-b" registers while the registry is listed
    Then the queen lists only "worker-new"

  Scenario: Gap-C7 - Heartbeat during a state transition
    Given the worker "worker-001" of "hive-a" has registered
    When heartbeats and listings of "worker-001" run at once for 1 second
    Then every heartbeat answered 204 and every listing succeeded
    And the queen lists exactly one "worker-001", last seen under 1 second ago
