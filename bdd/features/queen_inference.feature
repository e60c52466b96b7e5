Feature: Inference Execution through the queen
  Mirrors the queen's part of 130-inference-execution.feature: the queen
  queues instead of passing a worker's 503 on (DESIGN §3), reports a worker
  that dies mid-answer, and cancels on the worker when a job is cancelled.

  Scenario: EH-018a / EC6 - Every slot busy: the queen queues the request
    Given a running queen with a local hive
    And 1 worker of "smollm2-135m" spawned through the queen
    And every slot of the worker is busy with requests through the queen for 2 seconds
    When I run the queen operation {"operation": "infer", "model": "smollm2-135m", "prompt": "Hello,", "max_tokens": 5}
    Then the job succeeds
    And the job narrates "waiting for a slot"

  Scenario: The queue is full - 429 with Retry-After
    Given a running queen with a local hive and "queen.queue_size=0, queen.cold_start=false"
    And 1 worker of "smollm2-135m" spawned through the queen
    And every slot of the worker is busy with requests through the queen for 5 seconds
    When I ask the queen's OpenAI API for a completion
    Then the response status is 429
    And the OpenAI error code is "queue_full" with a Retry-After header

  Scenario: EH-013a / EC4 - The worker crashes during inference
    Given a running queen with a local hive
    And 1 worker of "smollm2-135m" spawned through the queen
    When an inference through the queen has streamed tokens and its worker is killed
    Then the job fails with "WORKER_DIED"
    And the tokens that arrived before stay in the job's stream
    And the worker is gone from the queen's list within 1 second

  Scenario: Gap-G12a - Cancelling the job cancels on the worker
    Given a running queen with a local hive
    And 1 worker of "smollm2-135m" spawned through the queen
    When an inference through the queen has streamed tokens and I cancel its job
    Then the job ends with "[CANCELLED]"
    And the worker is "ready" again within 2 seconds

  Scenario: Gap-R1 - A cold start picks the GPU with the most free memory
    Given a running queen whose local hive serves synthetic workers and whose NVML reports "Stand-in A: 24000 MB, 2000 MB free; Stand-in B: 12000 MB, 10000 MB free"
    When I run the queen operation {"operation": "infer", "model": "smollm2-135m", "prompt": "Hello,", "max_tokens": 3}
    Then the job succeeds
    And the job narrates "starting one on hive localhost (GPU-1)"
    And the queen lists one worker of "smollm2-135m", on "GPU-1"
