Feature: SSE Streaming (Dual-Call Pattern)
  Mirrors bin/00_rbee_keeper/bdd/tests/features/sse_streaming.feature.
  A job is created with one call (POST /v1/jobs) and followed with a second
  (GET its sse_url). The old `rbee-keeper test-sse` is `rbee-keeper -v status`.

  Scenario: Submit job and establish SSE connection
    Given no queen is running
    When I run rbee-keeper with "-v status"
    Then the output contains "queen is asleep, waking queen"
    And the output contains "queen is awake and healthy"
    And the output contains "Job created: job-"
    And the output contains "SSE URL: /v1/jobs/job-"
    And the command exits 0 and prints the queen's status
    And the queen the keeper started is shut down

  Scenario: POST /v1/jobs returns job_id and sse_url
    Given a running queen
    When I submit the operation "status"
    Then the response status is 201
    And the job_id starts with "job-"
    And the sse_url is "/v1/jobs/{job_id}/stream"

  Scenario: GET /v1/jobs/{job_id}/stream establishes SSE connection
    Given a running queen
    When I submit the operation "status"
    And I open the job's SSE stream
    Then the first event is a narration event
    And the stream ends with "[DONE]"

  Scenario: SSE stream handles missing job gracefully
    Given a running queen
    When I open the SSE stream of a job that does not exist
    Then the response status is 404
    And the error code is "JOB_NOT_FOUND"

  Scenario: Full dual-call pattern flow
    Given no queen is running
    When I run rbee-keeper with "-v status"
    Then the output shows, in this order:
      | line                          |
      | queen is asleep, waking queen |
      | queen is awake and healthy    |
      | Job created: job-             |
      | SSE URL: /v1/jobs/job-        |
      | Checking                      |
      | Shutting down queen           |
      | Queen shutdown via HTTP       |
