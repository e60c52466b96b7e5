Feature: Worker Provisioning, as our install
  Mirrors 040-worker-provisioning.feature. There is no cargo build: the
  worker is part of the one rbee distribution, so "building the worker" is
  `hive install` putting rbee (rbee-hive and llm-worker-rbee) into a venv on
  the host from the wheelhouse (DESIGN §7).

  Background:
    Given a fleet of namespace hosts and a queen with a token

  Scenario: Build worker from git succeeds
    Given the hive "h1" is installed and started
    Then llm-worker-rbee in h1's venv reports the queen's version

  Scenario: Worker binary registered in catalog
    Given the hive "h1" is installed and started
    Then the queen's install record of "h1" names its version, Python, platform and install dir

  Scenario: Query available worker types
    Given the hive "h1" is installed and started
    When I run the keeper with "hive refresh h1"
    Then the result lists the backend "llama-cpp"

  Scenario: EH-020a - Cargo build failure
    Given the hive "broken" is added for host "h2" with a wheelhouse that lacks msgspec
    When I run the keeper with "hive install broken"
    Then the keeper exits 1
    And the output contains "pip failed on broken"
    And the output contains "msgspec"
    And the hive "broken" is not registered as installed

  Scenario: EH-020c - Binary verification failed
    Given the hive "h1" is installed and started
    And the hive "verify" is added for host "h1" sharing h1's install dir
    And rbee-hive in h1's venv is not executable
    When I run the keeper with "hive install verify"
    Then the keeper exits 1
    And the output contains "reports nothing"
    And the hive "verify" is not registered as installed

  Scenario: Version mismatch - rbee-hive on the host reports another version
    Given the hive "h1" is installed and started
    And the hive "verify" is added for host "h1" sharing h1's install dir
    And rbee-hive in h1's venv reports version "9.9.0"
    When I run the keeper with "hive install verify"
    Then the keeper exits 1
    And the output contains "reports 9.9.0"
    And the output contains this queen's version
    And the output contains "rbee-keeper hive install verify"
    And the hive "verify" is not registered as installed
