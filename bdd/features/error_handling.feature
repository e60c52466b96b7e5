Feature: Error Handling - Structured Errors
  Mirrors 320-error-handling.feature on the job API of queen-rbee. What the
  other areas mirror of it is named in bdd/COVERAGE.md.

  Background:
    Given a running queen

  Scenario: ERR-001 - No unchecked shortcuts in production code
    Then no package contains a bare "except:" or an assert statement

  Scenario: ERR-002 - Structured error responses (JSON format)
    When I submit a job with body '{"operation": "worker_spawn"}'
    Then the response status is 400
    And the error body has "code", "message" and "details"

  Scenario: ERR-003 - Error correlation IDs included
    When I submit a job with body '{'
    And I submit a job with body '{'
    Then each error has a correlation_id that is a UUID
    And the two correlation_ids differ

  Scenario: ERR-004 - Correlation IDs logged for debugging
    When I submit a job with body '{'
    Then the queen's log has a line with that correlation_id

  Scenario: ERR-006 - Safe error messages (no sensitive data)
    When I submit a job with body '{"operation": "sk-live-SECRET123456789"}'
    Then the response status is 400
    And the response does not contain "sk-live-SECRET123456789"

  Scenario: ERR-007 - Error messages don't contain raw tokens
    When I submit a job with body '{"operation": "worker_get", "worker_id": "Bearer abcdef0123456789abcdef"}'
    Then the response status is 400
    And the response does not contain "abcdef0123456789abcdef"

  Scenario: ERR-008 and ERR-009 - No file paths or internal addresses in errors
    When I send every kind of bad request
    Then no error message contains a path of the server or an IP address

  Scenario: ERR-011 - No crash under load with half the requests invalid
    When I send 100 concurrent job submissions, half of them invalid
    Then every valid one gets 201 and every invalid one a structured 400
    And the queen is still healthy

  Scenario: ERR-012 - Error response includes error_code field
    When I submit a job with body '{"operation": 42}'
    Then the error code is UPPER_SNAKE_CASE

  Scenario Outline: ERR-014 - HTTP status codes match error types
    When I send the bad request "<kind>"
    Then the response status is <status>
    And the error code is "<code>"

    Examples:
      | kind            | status | code              |
      | validation      | 400    | VALIDATION_FAILED |
      | malformed json  | 400    | MALFORMED_JSON    |
      | unknown job     | 404    | JOB_NOT_FOUND     |
      | unknown route   | 404    | ROUTE_NOT_FOUND   |
      | body too large  | 413    | PAYLOAD_TOO_LARGE |

  Scenario: ERR-014 - A job that fails carries its error type
    When I submit the operation "ssh_test" for the hive "nowhere"
    And I follow the job with the job client
    Then the job client raises the error "HIVE_NOT_FOUND"
    And the job's status shows the error code "HIVE_NOT_FOUND"

  Scenario: ERR-015 - Error audit logging
    When I submit a job with body '{'
    Then the queen's log has an error line with a timestamp, the component, the code and the correlation_id
