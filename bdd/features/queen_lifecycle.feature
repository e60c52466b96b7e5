Feature: queen-rbee Daemon Lifecycle
  Mirrors 120-queen-rbee-lifecycle.feature. The client that comes and goes
  is a separate process using the official openai client, and
  `rbee-keeper status` (`rbee-keeper infer` itself is in cli_commands).

  Scenario: The client exits after inference; the daemons live on
    Given a running queen with a local hive
    When a separate client process asks the queen for a chat completion and exits
    Then the client exited 0 and printed the answer
    And the queen still answers /health
    And the queen still lists the worker the request started

  Scenario: Persistent mode - the keeper uses a queen that is already running
    Given a running queen with a local hive
    And 1 worker of "smollm2-135m" spawned through the queen
    When I run rbee-keeper with "status"
    Then the keeper exited 0 without starting a queen
    And the queen still answers /health
    And the queen still lists the worker the request started

  Scenario: Stopping the queen stops what it started
    Given a running queen with a local hive
    And 2 workers of "smollm2-135m" spawned through the queen
    When the queen receives SIGTERM
    Then the queen exits 0 within 6 seconds
    And none of its workers is left
