Feature: CLI Commands
  Mirrors 150-cli-commands.feature with our command names (DESIGN §9): the
  old `workers …` and `--node` are `worker …` and `--hive`.

  Scenario: Config file loading with XDG priority
    Given a config file in the XDG config dir naming the hive "from-xdg"
    And a config file named by RBEE_CONFIG naming the hive "from-rbee-config"
    When I run rbee-keeper with "hive list"
    Then the output contains "from-rbee-config"
    And the output does not mention "from-xdg"

  Scenario: Remote install path configuration
    Given no queen is running
    When I run rbee-keeper with "hive add lab-1 --host 10.231.0.5 --user bee --install-dir /opt/rbee"
    And I run rbee-keeper with "hive get lab-1"
    Then the output contains "/opt/rbee"
    And the output contains "10.231.0.5"

  Scenario: CLI command - basic inference
    Given no queen is running
    When I run rbee-keeper with "infer Why_is_the_sky_blue? --model smollm2-135m --max-tokens 20 --temperature 0.5"
    Then the keeper exits 0 with the answer alone on stdout
    And the output contains "queen is awake and healthy"

  Scenario: CLI command - list workers
    Given a running queen with a local hive
    And 2 workers of "smollm2-135m" spawned through the queen
    When I run rbee-keeper with "worker list --hive localhost"
    Then both workers are listed with their state "ready"

  Scenario: CLI command - check worker health
    Given a running queen with a local hive
    And 1 worker of "smollm2-135m" spawned through the queen
    When I ask the keeper for that worker
    Then the output shows its state "ready", its pid and its url

  Scenario: CLI command - manually shut down a worker
    Given a running queen with a local hive
    And 1 worker of "smollm2-135m" spawned through the queen
    When I stop that worker with the keeper
    Then the output says it stopped
    And its process is gone
