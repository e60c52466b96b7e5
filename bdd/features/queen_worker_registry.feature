Feature: queen-rbee Worker Registry
  Mirrors 050-queen-rbee-worker-registry.feature and the queen's heartbeat
  scenarios. Our registry is built from the workers' own heartbeats
  (POST /v1/worker-heartbeat, DESIGN §1); hives send none.

  Scenario: Register a worker from its first heartbeat
    Given a running queen with a local hive and "hive.worker_heartbeat_s=0.4"
    And 1 worker of "smollm2-135m" spawned through the queen
    Then the queen lists that worker with its url, hive, model, backend, device and slots
    And after 3 more heartbeats the queen's log says once that the worker registered

  Scenario: Query all workers
    Given a running queen with a local hive
    And 2 workers of "smollm2-135m" spawned through the queen
    When I run the queen operation {"operation": "worker_list_active"}
    Then the result lists 2 workers, each with worker_id, hive_id, url, model, device and state

  Scenario: Filter workers by device
    Given a running queen with a local hive
    And 1 worker of "smollm2-135m" spawned through the queen
    When I run the queen operation {"operation": "worker_list_active", "device": "CPU-0"}
    Then the result lists 1 workers, each with worker_id, hive_id, url, model, device and state
    When I run the queen operation {"operation": "worker_list_active", "device": "GPU-0"}
    Then the result lists 0 workers, each with worker_id, hive_id, url, model, device and state

  Scenario: A heartbeat updates the worker's state
    Given a running queen with a local hive
    And 1 worker of "smollm2-135m" spawned through the queen
    When every slot of the worker is busy with a long request
    Then within 2 seconds the queen lists the worker as "busy"

  Scenario: Remove a worker
    Given a running queen with a local hive
    And 1 worker of "smollm2-135m" spawned through the queen
    When I stop that worker through the queen
    Then the queen lists no workers

  Scenario: Stale worker cleanup
    Given a running queen with a local hive and "queen.worker_stale_s=1.5, hive.worker_heartbeat_s=0.4"
    And 2 workers of "smollm2-135m" spawned through the queen
    When the first worker stops sending heartbeats
    Then within 5 seconds the queen lists only the second worker
    And the queen log says the first worker is out of routing after missed heartbeats

  Scenario: Subsequent heartbeats refresh the timestamp
    Given a running queen with a local hive
    And 1 worker of "smollm2-135m" spawned through the queen
    Then the worker was last seen less than 3 seconds ago, twice over 3 seconds

  Scenario: A heartbeat from an unknown hive is rejected
    Given a running queen
    When a worker of the hive "nowhere" sends a heartbeat
    Then the response status is 404
    And the error code is "HIVE_NOT_FOUND"

  Scenario: A hive that goes offline is reported unreachable, and its workers leave
    Given a free port for the queen
    And a running hive that reports to that queen with "worker_heartbeat_s=0.4"
    And a queen on that port with "queen.worker_stale_s=1.5"
    And a worker of "smollm2-135m" spawned on "CPU-0"
    And within 5 seconds the queen lists 1 worker
    When the hive is killed with SIGKILL
    Then the queen's status reports the hive "localhost" unreachable
    And within 10 seconds the queen lists 0 workers
