Feature: Input Validation
  Mirrors 140-input-validation.feature (090-input-validation plus VAL-001..025).
  Ids and aliases are [A-Za-z0-9._-] (DESIGN §8), model references as in
  DESIGN §5; errors name the field and never echo the value.

  Scenario: EH-015a - Invalid model reference format
    When I run the keeper with "model download 'hf:bad repo'"
    Then the keeper exits 1
    And the output contains "model"

  Scenario: EH-015b - Invalid backend name
    When I run the keeper with "worker spawn --model smollm2-135m --backend quantum"
    Then the keeper exits 1
    And the output contains "backend"

  Scenario: EH-015c - Device number out of range
    Given a running hive
    When I spawn a worker of "smollm2-135m" on "GPU-5"
    Then the job fails with "DEVICE_NOT_FOUND"
    And the error hint mentions "CPU-0"

  Scenario: EH-017a - Missing API key
    Given a running hive with an API token
    When I send GET /v1/capabilities to the hive without a token
    Then the response status is 401
    And the error code is "MISSING_API_KEY"
    When I run rbee-keeper against the token hive with no token
    Then the keeper exits 1
    And the output contains "Missing API key"

  Scenario: EH-017b - Invalid API key
    Given a running hive with an API token
    When I send GET /v1/capabilities to the hive with the token "wrong-token-0123456789abcdef"
    Then the response status is 401
    And the error code is "INVALID_API_KEY"

  Scenario: Error response structure validation
    Given a running hive
    When I send the hive job '{"operation": "worker_get", "worker_id": "w;id"}'
    Then the response status is 400
    And the error body has code, message, details and a correlation id

  Scenario Outline: VAL-001..003 - Log injection is refused and never reaches the log
    Given a running hive
    When I send the hive a worker_spawn whose model holds <what>
    Then the response status is 400
    And the error names the field "model" and not the value
    And no line of the hive's log starts with the injected text

    Examples:
      | what          |
      | a newline     |
      | an ANSI escape |
      | a null byte   |

  Scenario: VAL-004 - Prevent path traversal (../../etc/passwd)
    Given a running hive
    When I send the hive job '{"operation": "worker_spawn", "model": "file://../../etc/passwd"}'
    Then the job fails with "VALIDATION_FAILED"

  Scenario: VAL-005 - Absolute paths outside the model folders are refused
    Given a running hive
    When I send the hive job '{"operation": "worker_spawn", "model": "file:///etc/passwd"}'
    Then the job fails with "MODEL_PATH_NOT_ALLOWED"

  Scenario: VAL-006 - A symlink out of the model folder is not followed
    Given a running hive
    And a symlink in the hive's model folder that points to "/etc/hostname"
    When I spawn a worker of that symlink
    Then the job fails with "MODEL_PATH_NOT_ALLOWED"

  Scenario Outline: VAL-007..009 - Shell characters in a worker id
    Given a running hive
    When I send the hive job '{"operation": "worker_get", "worker_id": "<id>"}'
    Then the response status is 400
    And the error names the field "worker_id" and not the value

    Examples:
      | id         |
      | w;rm -rf x |
      | w`id`      |
      | w\|cat     |

  Scenario: VAL-010 - Validate model reference format (hf:org/repo)
    Given a running hive
    When I send the hive job '{"operation": "model_get", "model": "hf:org/repo"}'
    Then the job fails with "MODEL_NOT_FOUND"
    When I send the hive job '{"operation": "model_get", "model": "invalid format"}'
    Then the response status is 400

  Scenario Outline: VAL-011, VAL-018, VAL-019, VAL-021 - Special characters, SQL, script and non-ASCII in a model reference
    Given a running hive
    When I send the hive job '{"operation": "model_get", "model": "<model>"}'
    Then the response status is 400
    And the response does not contain "<echo>"
    And the hive still lists the built-in model

    Examples:
      | model                      | echo      |
      | !@#$%                      | !@#$%     |
      | '; DROP TABLE models; --   | DROP      |
      | <script>alert(1)</script>  | <script>  |
      | modèle-🐝                  | 🐝        |

  Scenario: VAL-020, VAL-025 - Random hostile values in every job field: never a 5xx, never an echo
    Given a running hive
    When I send the hive 300 jobs whose fields hold random hostile values
    Then every answer is a 400 naming its field, or a job that fails with an error code
    And no answer is a 5xx and none repeats its value
    And the hive still lists the built-in model

  Scenario: VAL-012 - Worker ids are letters, digits, '.', '_' and '-'
    Given a running hive
    When I send the hive job '{"operation": "worker_get", "worker_id": "worker_123_abc"}'
    Then the job fails with "WORKER_NOT_FOUND"
    When I send the hive job '{"operation": "worker_get", "worker_id": "worker 123"}'
    Then the response status is 400

  Scenario: VAL-013 - Validate worker ID length (max 128 chars)
    Given a running hive
    When I send a worker_get for an id of 129 characters
    Then the response status is 400

  Scenario: VAL-014 - Validate backend name
    Given a running hive
    When I send the hive job '{"operation": "worker_spawn", "model": "smollm2-135m", "backend": "quantum"}'
    Then the response status is 400
    And the error names the field "backend" and not the value

  Scenario: VAL-015 - Validate device ID (non-negative integer)
    Given a running hive
    When I send the hive job '{"operation": "worker_spawn", "model": "smollm2-135m", "device": "GPU--1"}'
    Then the response status is 400
    When I spawn a worker of "smollm2-135m" on "GPU-5"
    Then the job fails with "DEVICE_NOT_FOUND"

  Scenario: VAL-016 - Validate port number
    When I start queen-rbee with "--port 70000"
    Then it refuses to start, naming "port"

  Scenario: VAL-017 - Validate node name (DNS-safe characters)
    When I run the keeper with "hive add workstation --host workstation.home.arpa"
    Then the keeper exits 0
    When I run the keeper with "hive add other --host work@station"
    Then the keeper exits 1
    And the output contains "host"
