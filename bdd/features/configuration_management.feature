Feature: Configuration Management - TOML Config with Hot-Reload
  Mirrors 360-configuration-management.feature. One TOML file for every program,
  RBEE_<SECTION>__<KEY> variables over it, SIGHUP to read it again.

  Scenario: CFG-001, CFG-009 - The queen logs where its config came from, and no secret
    Given a config file with "queen.max_body_bytes=4096"
    When the queen starts with that config and the API token "s3cret-token-for-bdd-0123456789ab"
    Then the queen log says "config_load source=" with the config file
    And the queen log does not contain "s3cret-token-for-bdd-0123456789ab"

  Scenario: CFG-002, CFG-005, CFG-006 - A bad value stops the start with one line naming the key
    Given a config file with "queen.port='eighty'"
    When the queen starts with that config
    Then it exits with code 1 and says "queen.port"
    And it prints no traceback

  Scenario: CFG-003 - SIGHUP applies a changed limit without a restart
    Given a config file with "queen.max_body_bytes=2048"
    And the queen runs with that config
    And a body of 3000 bytes to /v1/jobs is refused with 413
    When the config file says "queen.max_body_bytes=8192"
    And the queen gets SIGHUP
    Then a body of 3000 bytes to /v1/jobs is not refused with 413
    And the queen log has a line with "config_reload" and "queen.max_body_bytes"
    And the queen's pid is the same

  Scenario: CFG-003 - SIGHUP adds a hive written to the file meanwhile
    Given a config file with "queen.max_body_bytes=4096"
    And the queen runs with that config
    When the config file gains the hive "gpu-node-7" at "10.231.99.7"
    And the queen gets SIGHUP
    Then the queen log has a line with "config_reload" and "hives.gpu-node-7"
    And the queen lists the hive "gpu-node-7"

  Scenario: CFG-003 - A broken file on SIGHUP is logged and changes nothing
    Given a config file with "queen.max_body_bytes=2048"
    And the queen runs with that config
    When the config file is not valid TOML
    And the queen gets SIGHUP
    Then the queen log says "config_reload failed"
    And a body of 3000 bytes to /v1/jobs is refused with 413
    And the queen still answers /health

  Scenario: CFG-003 - The hive reloads on SIGHUP too
    Given a config file with "hive.max_body_bytes=2048"
    And the hive runs with that config
    And a body of 3000 bytes to the hive's /v1/jobs is refused with 413
    When the config file says "hive.max_body_bytes=8192"
    And the hive gets SIGHUP
    Then a body of 3000 bytes to the hive's /v1/jobs is not refused with 413
    And the hive log has a line with "config_reload" and "hive.max_body_bytes"

  Scenario: CFG-004 - Environment variables override the file, and are named, not shown
    Given a config file with "queen.max_body_bytes=2048"
    When the queen starts with that config and "RBEE_QUEEN__MAX_BODY_BYTES=8192"
    Then a body of 3000 bytes to /v1/jobs is not refused with 413
    And the queen log says "env_overrides=RBEE_QUEEN__MAX_BODY_BYTES"

  Scenario: CFG-007 - The README's config example is valid
    Then the config example in the README loads without error
