Feature: Model Catalog
  Mirrors 020-model-catalog.feature. The catalog is files, not SQLite:
  one folder per model with an atomically written meta.json (DESIGN §5).

  Background:
    Given a fake Hugging Face hub serving "test-org/tiny-GGUF" with a 2 MB file "tiny.Q4_K_M.gguf"
    And a running hive

  Scenario: Model found in the catalog
    Given the hive has downloaded "hf:test-org/tiny-GGUF"
    When I run the hive operation {"operation": "model_download", "model": "hf:test-org/tiny-GGUF"}
    Then the job succeeds
    And the job narrates "already in the catalog"
    And the hub served the file 1 time

  Scenario: Model not found in the catalog
    When I run the hive operation {"operation": "model_get", "model": "hf:test-org/tiny-GGUF"}
    Then the job fails with "MODEL_NOT_FOUND"
    When I run the hive operation {"operation": "model_download", "model": "hf:test-org/tiny-GGUF"}
    Then the job succeeds
    And the hub served the file 1 time

  Scenario: Model catalog registration after download
    When I run the hive operation {"operation": "model_download", "model": "hf:test-org/tiny-GGUF"}
    Then the result is a catalog entry of provider "hf" with size_bytes 2000000
    And model_get of "hf:test-org/tiny-GGUF" returns the same entry
    And the entry's meta.json lies in the folder of its file

  Scenario: Query models by provider
    Given the hub also serves "test-org/other-GGUF" with a 1 MB file "other.Q8_0.gguf"
    And the hive has downloaded "hf:test-org/tiny-GGUF"
    And the hive has downloaded "hf:test-org/other-GGUF"
    When I run the hive operation {"operation": "model_list", "provider": "hf"}
    Then the result lists 2 models, all of provider "hf"
    When I run the hive operation {"operation": "model_list"}
    Then the result lists 3 models

  Scenario: GGUF model size calculation
    Given the hub serves the built-in SmolLM2 GGUF as "test-org/smol-GGUF"
    And the hive has downloaded "hf:test-org/smol-GGUF"
    Then the catalog's size_bytes of "hf:test-org/smol-GGUF" is its file's size on disk
    When I spawn a worker of "hf:test-org/smol-GGUF" on "CPU-0"
    Then the preflight required 1.2 times that size in RAM plus the KV cache of its slots and its prompt cache
