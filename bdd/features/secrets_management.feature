Feature: Secrets Management
  Mirrors 310-secrets-management.feature: token files (one line, mode 0600),
  systemd credentials, rotation on SIGHUP, one token per component (DESIGN §8).

  Scenario: SEC-001 - Load API token from file with 0600 permissions
    Given a token file with mode 0600
    When I start queen-rbee with that token file
    Then the queen's log says "API token loaded identity=token:" with the fingerprint of the right token
    And the queen's log has the fingerprint of the right token but never the token

  Scenario Outline: SEC-002, SEC-003, SEC-007, SEC-008, SEC-015..017 - Bad token files stop the start
    Given a token file <problem>
    When I start queen-rbee with that token file
    Then it refuses to start, naming "<message>"
    And the output does not contain the file's content

    Examples:
      | problem                    | message                            |
      | with mode 0644             | insecure permissions               |
      | with mode 0640             | insecure permissions               |
      | that does not exist        | API token file not found           |
      | that is a directory        | Cannot read API token file         |
      | with two lines             | must contain exactly one line      |
      | that is empty              | is empty                           |
      | with only whitespace       | contains only whitespace           |

  Scenario: SEC-004 - Load from systemd credentials
    Given a systemd credential "api_token" with mode 0400
    When I start queen-rbee with that credentials directory
    Then requests with the credential's token are answered 200

  Scenario: SEC-009, SEC-010 - Secrets never appear in logs or error messages
    Given a running queen with an API token
    When 100 requests with the right token and wrong ones have been answered
    Then the queen's log has the fingerprint of the right token but never the token
    And no response contained either token

  Scenario: SEC-012 - Secret rotation without restart (SIGHUP)
    Given a running queen with an API token
    When the token file is replaced and the queen gets SIGHUP
    Then the old token gets 401 and the new one 200
    And the queen's log says "API token reloaded" without either token

  Scenario: SEC-013 - Each component has its own secret
    Given a running queen with an API token
    And a worker spawned through the token queen
    Then the worker's token is its own, neither the queen's nor usable at the queen

  Scenario: SEC-014 - The trailing newline is stripped
    Given a token file with mode 0600
    When I start queen-rbee with that token file
    Then requests with the token without its newline are answered 200
