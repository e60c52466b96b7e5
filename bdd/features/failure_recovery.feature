Feature: Failure Detection and Recovery
  Mirrors 210-failure-recovery.feature.

  Scenario: Gap-F1 - Worker crash detection and registry cleanup
    Given a running queen with a local hive and "queen.worker_stale_s=1.5, hive.worker_heartbeat_s=0.4"
    And 2 workers of "smollm2-135m" spawned through the queen
    When the first worker is killed
    And I run the queen operation {"operation": "infer", "model": "smollm2-135m", "prompt": "Hello,", "max_tokens": 5}
    Then the job succeeds
    And within 5 seconds the queen lists only the second worker
    And no request is routed to the first worker any more

  Scenario: Gap-F2 - A corrupt catalog entry
    Given a fake Hugging Face hub serving "test-org/tiny-GGUF" with a 1 MB file "tiny.Q4_K_M.gguf"
    And a running hive
    And the hive has downloaded "hf:test-org/tiny-GGUF"
    When its catalog entry's meta.json is corrupted
    And I run the hive operation {"operation": "model_list"}
    Then the job succeeds
    And the corrupt entry is set aside as meta.json.corrupt and logged with how to recover
    And the hive still answers /health
    When I run the hive operation {"operation": "model_download", "model": "hf:test-org/tiny-GGUF"}
    Then the job succeeds

  Scenario: Gap-F4 - Partial download resume after a crash, through the queen
    Given a fake Hugging Face hub serving "test-org/tiny-GGUF" with a 10 MB file "tiny.Q4_K_M.gguf"
    And the hub cuts the connection once after 6 MB
    And a running queen with a local hive that downloads from the hub with "hive.download_attempts=1"
    When I run the queen operation {"operation": "model_download", "model": "hf:test-org/tiny-GGUF"}
    Then the job fails with "DOWNLOAD_FAILED"
    When I run the queen operation {"operation": "model_download", "model": "hf:test-org/tiny-GGUF"}
    Then the job succeeds
    And the job narrates "resuming at 6 MB"

  Scenario: Gap-F5 - A worker that goes silent mid-stream leaves routing; its request still finishes
    Given a running queen with a local hive and "queen.worker_stale_s=1.5, hive.worker_heartbeat_s=0.4, hive.worker_check_s=60, hive.synthetic_backend=true, hive.synthetic_tokens_per_s=20"
    And 1 worker of "smollm2-135m" spawned through the queen
    When an inference of 40 tokens through the queen has streamed 10 and its worker is frozen for 3 seconds
    Then while it was frozen the queen stopped routing to it
    And the job succeeds with all 40 tokens in order
    And within 5 seconds the queen lists the worker again

  Scenario: Gap-F6 - The queen restarts; workers of a persistent hive re-register
    Given a free port for the queen
    And a running hive that reports to that queen
    And a queen on that port
    And a worker of "smollm2-135m" spawned on "CPU-0"
    When the queen is killed with SIGKILL
    And a new queen starts on the same port
    Then within 5 seconds the new queen lists the worker again
    And the worker kept running

  Scenario: Gap-F7 - Graceful worker shutdown with a pending request
    Given a running queen with a local hive
    And 1 worker of "smollm2-135m" spawned through the queen
    And the worker is generating 100 tokens for a client
    When the worker receives SIGTERM
    Then the client's stream ends with an "end" event, then "[DONE]"
    And the queen saw the worker "draining"
    And the worker exits with code 0
