Feature: rbee-hive Preflight Validation
  Mirrors 080-rbee-hive-preflight-validation.feature against a hive that the
  queen installed and started over SSH on a namespace host.

  Background:
    Given a fleet of namespace hosts and a queen with a token
    And the hive "h1" is installed and started

  Scenario: rbee-hive HTTP API health check succeeds
    When I run the keeper with "hive status h1"
    Then the keeper exits 0
    And the result says "reachable" is true
    And the output contains "Hive h1: reachable"

  Scenario: rbee-hive version compatibility check
    When I run the keeper with "hive status h1"
    Then the result's version is the queen's version

  Scenario: Backend catalog populated
    When I run the keeper with "hive refresh h1"
    Then the keeper exits 0
    And the result lists the backend "llama-cpp"
    And the result lists the device "CPU-0"

  Scenario: Sufficient resources available
    When I run the keeper with "hive refresh h1"
    Then the result reports RAM total and available and free disk, all above zero
