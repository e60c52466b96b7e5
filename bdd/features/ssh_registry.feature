Feature: SSH Registry Management
  Mirrors 010-ssh-registry-management.feature. The registry is the config
  file (`[hives.<alias>]`, DESIGN §7) that `rbee-keeper hive add` edits; the
  queen reaches the hosts over SSH. The hosts are network namespaces with
  their own sshd, and the queen listens on the bridge with a token.

  Background:
    Given a fleet of namespace hosts and a queen with a token

  Scenario: Add remote rbee-hive node to registry
    When I run the keeper with "hive add reg-1 --host {h1} --user root --identity-file {key_tilde}"
    Then the keeper exits 0
    And the config has the hive "reg-1" with host "{h1}", ssh_port 22, ssh_user "root" and the key path expanded
    When I run the keeper with "hive ssh-test reg-1"
    Then the keeper exits 0
    And the output contains "SSH preflight: connection OK"

  Scenario: EH-001a - SSH connection timeout
    Given the hive "ghost" points at an address where no machine answers, with a 1 s timeout
    When I run the keeper with "hive install ghost"
    Then the keeper exits 1
    And the output contains "SSH attempt 1 of 3"
    And the output contains "retrying in 0.2 s"
    And the output contains "retrying in 0.4 s"
    And the output contains "Cannot reach ghost"
    And the hive "ghost" is not registered as installed

  Scenario: EH-001b - SSH authentication failure
    Given the hive "loose-key" uses a key readable by others
    When I run the keeper with "hive install loose-key"
    Then the keeper exits 1
    And the output contains "chmod 600"
    And the hive "loose-key" is not registered as installed

  Scenario: EH-001c - SSH command execution failure
    Given the hive "bare" is added for host "h2"
    When I run the keeper with "hive start bare"
    Then the keeper exits 1
    And the output contains "not installed"
    And the output contains "rbee-keeper hive install bare"

  Scenario: Install rbee-hive on remote node
    Given the hive "h1" is added for host "h1"
    When the hive "h1" is installed
    Then the install narrated "Python 3."
    And the install narrated "Uploading"
    And the install narrated "rbee-hive --version"
    And the install narrated "installed in"

  Scenario: List registered rbee-hive nodes
    Given the hive "listed" is added for host "h2"
    When I run the keeper with "hive list"
    Then the keeper exits 0
    And the output contains "listed"
    And the output contains "{h2}"
    And the output contains the install dir of "listed"

  Scenario: Remove node from rbee-hive registry
    Given the hive "gone-1" is added for host "h2"
    When I run the keeper with "hive remove gone-1"
    Then the keeper exits 0
    And the output contains "hive gone-1 removed"
    And the config has no hive "gone-1"

  Scenario: EH-011a - Invalid SSH key path
    When I run the keeper with "hive add nokey --host {h1} --identity-file /nonexistent/id_ed25519"
    Then the keeper exits 1
    And the output contains "SSH key not found"
    And the config has no hive "nokey"

  Scenario: EH-011b - Duplicate node name
    Given the hive "twice" is added for host "h2"
    When I run the keeper with "hive add twice --host {h2}"
    Then the keeper exits 1
    And the output contains "already configured"
    And the output contains "rbee-keeper hive remove twice"

  Scenario: Inference fails when node not in registry
    When I run the keeper with "infer hello --hive nowhere --max-tokens 4"
    Then the keeper exits 1
    And the output contains "No hive with that id is configured"
    And the output contains "rbee-keeper hive list"
