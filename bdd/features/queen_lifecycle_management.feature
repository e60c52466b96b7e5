Feature: Queen Lifecycle Management
  Mirrors bin/05_rbee_keeper_crates/queen-lifecycle/.../queen_lifecycle.feature:
  the keeper's ephemeral mode (seed 002) and `queen stop`.

  Scenario: Queen is already running
    Given a running queen
    When I run rbee-keeper with "status"
    Then the keeper exits 0
    And the output does not contain "waking queen"
    And only one queen runs on that port

  Scenario: Queen is not running (auto-start)
    Given no queen is running
    When I run rbee-keeper with "status"
    Then the output contains "queen is asleep, waking queen"
    And the output contains "queen is awake and healthy"
    And the keeper exits 0

  Scenario: Queen startup with health check
    Given no queen is running
    When I run rbee-keeper with "queen start"
    Then the keeper exits 0 within 30 seconds
    And the queen's /health says "ok"

  Scenario: Cleanup when we started the queen
    Given no queen is running
    When I run rbee-keeper with "status"
    Then the output contains "Shutting down queen"
    And no queen answers on that port

  Scenario: No cleanup when the queen was already running
    Given a running queen
    When I run rbee-keeper with "-v status"
    Then the output contains "Queen was already running, not shutting down"
    And the queen's /health says "ok"

  Scenario: Graceful shutdown via HTTP
    Given no queen is running
    When I run rbee-keeper with "queen start"
    And I run rbee-keeper with "queen stop"
    Then the output contains "Queen shutdown via HTTP"
    And the output does not contain "SIGTERM"
    And no queen answers on that port

  Scenario: Fallback to SIGTERM when HTTP fails
    Given a queen whose pid file is known but whose URL does not answer
    When I run rbee-keeper with "queen stop"
    Then the output contains "HTTP shutdown failed, sending SIGTERM"
    And that queen process exits 0
