Feature: Model Provisioner
  Mirrors 030-model-provisioner.feature. Progress is the download job's
  `progress` events (DESIGN §2), not a separate progress endpoint.

  Background:
    Given a fake Hugging Face hub serving "test-org/tiny-GGUF" with a 10 MB file "tiny.Q4_K_M.gguf"

  Scenario: Model download with progress tracking
    Given a running hive
    And the hub sends at most 20 MB per second
    When I run the hive operation {"operation": "model_download", "model": "hf:test-org/tiny-GGUF"}
    Then the job succeeds
    And it streamed rising progress events in bytes up to 10000000 of 10000000, with a rate
    And the result's path holds the complete file
    And the stream ended with "[DONE]"

  Scenario: EH-007a - Model not found on Hugging Face
    Given a running hive
    When I run the hive operation {"operation": "model_download", "model": "hf:test-org/no-such-model"}
    Then the job fails with "MODEL_NOT_FOUND"
    And the error hint mentions "Check the name on the Hub"

  Scenario: EH-007b - Model repository is private
    Given the repo "test-org/tiny-GGUF" is gated behind the token "hf_bdd_token_0123456789"
    And a running hive
    When I run the hive operation {"operation": "model_download", "model": "hf:test-org/tiny-GGUF"}
    Then the job fails with "ACCESS_DENIED"
    And the error hint mentions "HF_TOKEN"

  Scenario: EH-008a - Model download stalls
    Given the hub stops sending after 3 MB
    And a running hive with "download_stall_s=0.5, download_attempts=3"
    When I run the hive operation {"operation": "model_download", "model": "hf:test-org/tiny-GGUF"}
    Then the job fails with "DOWNLOAD_STALLED"
    And the job narrates "Retrying (attempt 3 of 3)"
    And the model is not in the catalog

  Scenario: EH-008b - Model download fails and is retried from the checkpoint
    Given the hub cuts the connection once after 4 MB
    And a running hive
    When I run the hive operation {"operation": "model_download", "model": "hf:test-org/tiny-GGUF"}
    Then the job succeeds
    And the job narrates "Retrying (attempt 2 of 5)"
    And the second request resumed at byte 4000000
    And the hub sent every byte once

  Scenario: EH-008c - Downloaded model checksum mismatch
    Given the hub corrupts the next file it serves
    And a running hive
    When I run the hive operation {"operation": "model_download", "model": "hf:test-org/tiny-GGUF"}
    Then the job succeeds
    And the job narrates "did not match its checksum; deleted, downloading it again"
    And the result's path holds the complete file

  Scenario: EH-008c - A second checksum mismatch fails the download
    Given the hub corrupts every file it serves
    And a running hive
    When I run the hive operation {"operation": "model_download", "model": "hf:test-org/tiny-GGUF"}
    Then the job fails with "DOWNLOAD_CORRUPT"
    And the hub served the file twice
    And the hive's catalog does not list "tiny-q4_k_m"

  Scenario: GGUF model detection by file extension
    Given the hub serves the built-in SmolLM2 GGUF as "test-org/smol-GGUF"
    And a running hive
    And the hive has downloaded "hf:test-org/smol-GGUF"
    When I spawn a worker of "hf:test-org/smol-GGUF" on "CPU-0"
    Then the job succeeds
    And the worker runs on backend "llama-cpp"

  Scenario: GGUF metadata extraction
    Given a running hive
    And a worker of "smollm2-135m" spawned on "CPU-0"
    Then the worker reports vocab_size 49152, eos_token_id 2 and quantization "Q4_1"

  Scenario Outline: GGUF quantization formats supported
    Given SmolLM2 requantized to "<quant>" with llama.cpp
    And a running hive
    When I spawn a worker of the requantized file on "CPU-0"
    Then the job succeeds
    And the worker reports quantization "<quant>"
    And the worker completes "The capital of France is" with "Paris"

    Examples:
      | quant  |
      | Q4_K_M |
      | Q5_K_M |
      | Q8_0   |

  Scenario: Bigger quantizations take more memory
    Given SmolLM2 requantized to "Q4_K_M" with llama.cpp
    And SmolLM2 requantized to "Q5_K_M" with llama.cpp
    And SmolLM2 requantized to "Q8_0" with llama.cpp
    Then their sizes grow in the order Q4_K_M, Q5_K_M, Q8_0

  Scenario: EC2 - Model download failure with retry
    Given the hub cuts every connection after 2 MB
    And a running hive with "download_attempts=3"
    When I run the hive operation {"operation": "model_download", "model": "hf:test-org/tiny-GGUF"}
    Then the job fails with "DOWNLOAD_FAILED"
    And the job narrates "Retrying (attempt 3 of 3)"
    And the model is not in the catalog
