Feature: Queen Health Check
  Mirrors bin/00_rbee_keeper/bdd/tests/features/queen_health_check.feature
  through `rbee-keeper queen status` (exit 0 healthy, 1 not).

  Scenario: Queen is not running (connection refused)
    Given no queen is running
    When I run rbee-keeper with "queen status"
    Then the keeper exits 1
    And the output contains "queen-rbee is not running"

  Scenario: Queen is running and healthy
    Given a running queen
    When I run rbee-keeper with "queen status"
    Then the keeper exits 0
    And the output contains "queen-rbee is running and healthy"

  Scenario: Queen health check with a custom port
    Given a running queen on a port of its own
    When I run rbee-keeper with "queen status"
    Then the keeper exits 0
    And the output contains the queen's URL with that port

  Scenario: Queen health check timeout
    Given a queen address that accepts connections and never answers
    When I run rbee-keeper with "queen status"
    Then the keeper exits 1 within 3 seconds
    And the output contains "queen-rbee is not running"
