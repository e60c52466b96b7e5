Feature: End-to-End Integration Flows
  Mirrors 160-end-to-end-flows.feature. The hive is a separate rbee-hive
  process reached over HTTP (starting it over SSH is the SSH issue); the
  model comes from the fake Hub; everything else is the whole path.

  Background:
    Given a fake Hugging Face hub serving the built-in SmolLM2 GGUF as "test-org/smol-GGUF"
    And a running hive that reports to a queen
    And that queen, which reaches the hive over HTTP

  Scenario: Happy path - cold start inference on a remote node
    When I run the queen operation {"operation": "worker_list", "hive_id": "localhost"}
    Then the job succeeds
    And the result is an empty list
    When I run the queen operation {"operation": "model_download", "model": "hf:test-org/smol-GGUF"}
    Then the job succeeds
    And the job relayed the hive's download progress up to the file's size
    When I run the queen operation {"operation": "infer", "model": "hf:test-org/smol-GGUF", "messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 20, "temperature": 0}
    Then the job succeeds
    And the job narrates "starting one on hive localhost"
    And the job relayed the hive's narration "Preflight passed"
    And the job streamed 20 tokens in order
    And the hive lists one worker of that model

  Scenario: Warm start - reuse an existing idle worker
    Given the hive has downloaded "hf:test-org/smol-GGUF"
    And I have run one inference on "hf:test-org/smol-GGUF" through the queen
    When I run the queen operation {"operation": "infer", "model": "hf:test-org/smol-GGUF", "prompt": "Hello,", "max_tokens": 5}
    Then the job succeeds
    And the job did not start a worker
    And the same worker served both requests
