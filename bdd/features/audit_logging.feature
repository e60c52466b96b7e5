Feature: Audit Logging - Tamper-Evident Security Logs
  Mirrors 330-audit-logging.feature: JSON lines under each daemon's state dir,
  each entry chained to the one before by an HMAC-SHA256 under a key kept
  outside the log; `rbee-keeper audit verify`. Refusals from one address are
  one entry per window (tests/test_hostile.py); these scenarios write each.

  Scenario: AUDIT-001, AUDIT-008 - A worker spawn is recorded with who, what and a correlation id
    Given a running queen with a local hive
    When I spawn a worker through the queen
    Then the queen's audit log has a "worker.spawn" entry with the actor, worker id, model, hive and the job's id

  Scenario: AUDIT-002 - Authentication events
    Given a running hive with an API token
    When I send GET /v1/capabilities to the hive without a token
    And I send GET /v1/capabilities to the hive with the right token
    Then the hive's audit log has "auth.failure" with reason "missing_header" and "auth.success" with a fingerprint

  Scenario: AUDIT-003, AUDIT-005 - Every entry is JSON, chained by SHA-256 from 64 zeros
    Given a running hive with an API token
    When I send GET /v1/capabilities to the hive without a token
    And I send GET /v1/capabilities to the hive with the right token
    Then every audit entry has timestamp, event_type, actor, details, previous_hash and entry_hash
    And the first entry's previous_hash is 64 zeros and each next one is the entry before's hash

  Scenario: AUDIT-004 - Detect log tampering
    Given a hive audit log with 5 entries
    When entry 3 is edited
    Then rbee-keeper audit verify names line 3 and exits 1

  Scenario: AUDIT-006 - Rotation preserves the hash chain
    Given a running hive with an API token and "audit_max_bytes=2048, audit_failure_window_s=0"
    When 40 requests without a token have been refused
    Then the audit log was archived at least once
    And rbee-keeper audit verify passes across the archives

  Scenario: AUDIT-007 - Disk space monitoring for audit logs
    Given a hive with an API token whose state dir is on a 1 MB disk that is 96% full
    When I send GET /v1/capabilities to the hive without a token
    Then the hive's log says "audit log disk is"
    And the audit log on the small disk has the "auth.failure" entry

  Scenario: AUDIT-009 - No secrets in audit logs
    Given a running hive with an API token
    When I send GET /v1/capabilities to the hive with the token "wrong-token-0123456789abcdef"
    And I send GET /v1/capabilities to the hive with the right token
    Then the audit log holds neither token

  Scenario: AUDIT-010 - The chain continues across a restart
    Given a running hive with an API token
    When I send GET /v1/capabilities to the hive without a token
    And the hive is restarted
    And I send GET /v1/capabilities to the hive without a token
    Then rbee-keeper audit verify passes
    And the audit log's entries are numbered without a gap
