Feature: Deadline Propagation
  Mirrors 340-deadline-propagation.feature. A deadline is one absolute time
  (X-Request-Deadline, ISO-8601; or the client's timeout, X-Stainless-Timeout,
  as the OpenAI clients send it), computed once and forwarded unchanged:
  queen -> hive (a cold start's spawn job) -> worker. Past it, everyone stops
  and the answer is 408 REQUEST_TIMEOUT. The workers are synthetic (filler
  tokens at a fixed rate, for tests), so the timing is the test's, not a model's.

  Scenario: DEAD-001, DEAD-004, DEAD-006 - The same deadline reaches the worker, which stops at it
    Given a running queen whose local hive serves synthetic workers at 2 tokens/s
    And a synthetic worker spawned through the queen
    When I stream a chat completion of 40 tokens with X-Request-Deadline 2 seconds from now
    Then the stream ends early with the error "request_timeout"
    And the worker's log says "request timeout" with that very deadline
    And within 5 seconds the worker has no busy slot

  Scenario: DEAD-002, DEAD-005 - A job past its deadline fails with 408 REQUEST_TIMEOUT and the deadline
    Given a running queen whose local hive serves synthetic workers at 2 tokens/s
    And a synthetic worker spawned through the queen
    When I submit an infer job of 40 tokens with X-Request-Deadline 2 seconds from now
    Then the job fails with "REQUEST_TIMEOUT"
    And the error message mentions "Request exceeded deadline"
    And the error details give that very deadline and the status 408

  Scenario: DEAD-003 - A worker started for the request works to the request's deadline
    Given a running queen whose local hive serves synthetic workers at 2 tokens/s
    When I stream a chat completion of 40 tokens with X-Request-Deadline 4 seconds from now
    Then the stream ends early with the error "request_timeout"
    And the worker's log says "request timeout" with that very deadline

  Scenario: DEAD-007 - A deadline cannot be extended
    Given a running queen whose local hive serves synthetic workers at 2 tokens/s
    And a synthetic worker spawned through the queen
    When I ask for a chat completion of 40 tokens with X-Request-Deadline 2 seconds from now and a 60 s client timeout
    Then the response status is 408
    And the queen log says "deadline cannot be extended"

  Scenario: DEAD-008 - A default deadline when the client sets none
    Given a running queen whose local hive serves synthetic workers at 2 tokens/s and "queen.default_deadline_s=2"
    And a synthetic worker spawned through the queen
    When I ask for a chat completion of 40 tokens
    Then the response status is 408
    And the OpenAI error code is "request_timeout"
