Feature: SSH Preflight Validation
  Mirrors 070-ssh-preflight-validation.feature: `rbee-keeper hive ssh-test`
  (the queen's `ssh_test` operation) against namespace hosts.

  Background:
    Given a fleet of namespace hosts and a queen with a token

  Scenario: SSH connection validation succeeds
    Given the hive "pre-1" is added for host "h1"
    When I run the keeper with "hive ssh-test pre-1"
    Then the keeper exits 0
    And the output contains "SSH preflight: connection OK"

  Scenario: EH-001a - SSH connection timeout
    Given the hive "pre-ghost" points at an address where no machine answers, with a 1 s timeout
    When I run the keeper with "hive ssh-test pre-ghost"
    Then the keeper exits 1
    And the output contains "pre-ghost"
    And the output contains "no answer within 1 s"

  Scenario: EH-001b - SSH authentication failure
    Given the hive "pre-badkey" uses a key the host does not accept
    When I run the keeper with "hive ssh-test pre-badkey"
    Then the keeper exits 1
    And the output contains "SSH authentication failed on pre-badkey"
    And the output contains "authorized_keys"

  Scenario: SSH command execution test
    Given the hive "pre-2" is added for host "h2"
    When I run the keeper with "hive ssh-test pre-2"
    Then the keeper exits 0
    And the result says the echo answered "test"

  Scenario: Network latency check
    Given the hive "pre-3" is added for host "h2"
    When I run the keeper with "hive ssh-test pre-3"
    Then the keeper exits 0
    And the network round trip is under 100 ms and logged

  Scenario: rbee-hive binary exists on remote node
    Given the hive "h1" is installed and started
    When I run the keeper with "hive ssh-test h1"
    Then the keeper exits 0
    And the output contains "venv/bin/rbee-hive"
