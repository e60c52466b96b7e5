Feature: Authentication
  Mirrors 300-authentication.feature. Bearer tokens on every endpoint but
  /health, compared in constant time; logs name a token by its fingerprint
  (DESIGN §8).

  Background:
    Given a running queen with an API token

  Scenario: AUTH-001 - Reject request without Authorization header
    When I send GET /v1/build-info to the queen without a token
    Then the response status is 401
    And the response asks for a Bearer token
    And the queen's log says "auth failed reason=missing_header"

  Scenario: AUTH-002, AUTH-014 - Reject request with invalid token, logged with its fingerprint
    When I send GET /v1/build-info to the queen with the token "wrong-token-0123456789abcdef"
    Then the response status is 401
    And the response error message is "Invalid or missing API key"
    And the queen's log has the fingerprint of "wrong-token-0123456789abcdef" but never the token

  Scenario: AUTH-003, AUTH-015 - Accept request with valid Bearer token
    When I send GET /v1/build-info to the queen with the right token
    Then the response status is 200
    And the queen's log says "authenticated identity=token:" with the fingerprint of the right token
    When I send GET /v1/build-info to the queen with the right token
    Then the response status is 200
    And the queen's log says "authenticated identity=token:" once, not once per request

  Scenario: AUTH-005 - Loopback bind without token works (dev mode)
    Given a running queen
    When I send GET /v1/build-info to the queen without a token
    Then the response status is 200
    And the queen's log says "dev mode"

  Scenario: AUTH-006 - Public bind requires token or fails to start
    When I start queen-rbee with "--host 0.0.0.0 --port 0"
    Then it refuses to start, naming "API token required for non-loopback bind"

  Scenario: AUTH-007 - Token fingerprinting in logs (never raw tokens)
    When I send GET /v1/build-info to the queen with the right token
    Then the queen's log has the fingerprint of the right token but never the token

  Scenario: AUTH-008 - Queen, hive and worker all require auth
    Given a worker spawned through the token queen
    Then the queen, its hive and the worker each answer 401 without a token

  Scenario Outline: AUTH-009, AUTH-017 - Every method on every endpoint but /health wants the token
    When I send <method> <path> to the queen without a token
    Then the response status is 401

    Examples:
      | method | path                |
      | GET    | /v1/jobs/job-x      |
      | POST   | /v1/jobs            |
      | DELETE | /v1/jobs/job-x      |
      | PUT    | /v1/jobs            |
      | PATCH  | /v1/jobs            |
      | POST   | /v1/worker-heartbeat |

  Scenario: AUTH-009 - /health is public
    When I send GET /health to the queen without a token
    Then the response status is 200

  Scenario: AUTH-010 - Invalid token format rejected
    When I send GET /v1/build-info to the queen with the header "Basic dXNlcjpwYXNz"
    Then the response status is 401
    And the error code is "INVALID_AUTH_FORMAT"
    And the queen's log says "reason=invalid_format"

  Scenario: AUTH-011 - Empty token rejected
    When I send GET /v1/build-info to the queen with an empty Bearer token
    Then the raw response is a 401 with "MISSING_API_KEY"
    And the queen's log says "reason=empty_token"

  Scenario: AUTH-012 - Token with special characters handled correctly
    Given a running queen whose token is "p!@#$%^&*()_+-=[]{}|;:,.<>?/~0123"
    When I send GET /v1/build-info to the queen with the right token
    Then the response status is 200
    And the queen's log has the fingerprint of the right token but never the token

  Scenario: AUTH-013 - Concurrent auth requests (no race conditions)
    When 50 requests with the right token and 50 with a wrong one arrive at once
    Then every right one is answered 200 and every wrong one 401

  Scenario Outline: AUTH-016 - Bearer token parsing edge cases
    When I send GET /v1/build-info to the queen with the header "<header>"
    Then the response status is 401

    Examples:
      | header                |
      | bearer RIGHT          |
      | BEARER RIGHT          |
      | Bearer  RIGHT         |
      | BearerRIGHT           |

  Scenario: AUTH-018 - Consistent error response format
    When I send GET /v1/build-info to the queen without a token
    Then the error body has code, message, details and a correlation id
    And the error code is "MISSING_API_KEY"

  Scenario: AUTH-019 - End-to-end auth flow (keeper, queen, hive)
    Given a token hive "lab-1" that the token queen knows
    When the keeper lists the workers of "lab-1" with the queen's token
    Then the keeper exits 0
    And the hive's log has the fingerprint of its own token, not the queen's
