Feature: Inference Execution
  Mirrors 130-inference-execution.feature where it concerns the worker: the
  SSE stream, slots, auth and cancellation. The queen's part is
  queen_inference.feature; what is not mirrored is in bdd/COVERAGE.md.

  Scenario: Inference request with SSE streaming
    Given a running worker with 1 slot
    When I send a chat inference request for 30 tokens and watch the worker's state
    Then the response is an event stream
    And it streams "started", tokens indexed from 0, "end" with counts, then "[DONE]"
    And the worker was "busy" while streaming and is "ready" after

  Scenario: The inference route wants the worker's token
    Given a worker with 1 slot that wants the token "worker-token-0123456789abcdef"
    When I send an inference request without a token
    Then the response status is 401
    When I send an inference request with the token "wrong-token-0123456789abcdef0"
    Then the response status is 401
    When I send an inference request with the token "worker-token-0123456789abcdef"
    Then the response status is 200

  Scenario: EH-018a - Worker busy with all slots occupied
    Given a running worker with 1 slot
    And 1 long request occupying its slots
    When I send another inference request
    Then the response status is 503
    And the error code is "ALL_SLOTS_BUSY"
    And the error details say 1 of 1 slots are busy
    And the response asks to retry after 1 second

  Scenario: Gap-G12a - Client cancellation (the worker's part)
    Given a running worker with 1 slot
    And 1 long request occupying its slots
    When I cancel the first long request with DELETE
    Then its stream ends with an "end" event whose stop_reason is "cancelled"
    And the worker is "ready" again within 1 second

  Scenario: Gap-G12b - Client disconnects during inference
    Given a running worker with 1 slot
    And 1 long request occupying its slots
    When the client of the first long request disconnects
    Then the worker is "ready" again within 1 second
    And the worker's log says the client went away

  Scenario: Gap-G12c - Explicit cancellation endpoint
    Given a running worker with 1 slot
    And 1 long request occupying its slots
    When I cancel the first long request with DELETE
    Then the DELETE answers 204
    And a repeated DELETE answers 204 too
    And a DELETE of a request that never existed answers 404

  Scenario: Gap-C4 - Worker slot allocation race condition
    Given a running worker with 4 slots
    And 3 long requests occupying its slots
    When 2 inference requests arrive at once
    Then exactly one of them streams and the other gets 503 "ALL_SLOTS_BUSY"
    And the worker reports 4 of 4 slots busy
