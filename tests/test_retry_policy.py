"""The one retry policy of every call the queen makes to a worker (`worker_client.should_retry`):
another worker only while nothing reached the client and no worker held the request and died or
hung with it (the process-level behaviour is in test_queen_openai.py and test_hostile.py)."""

from __future__ import annotations

import pytest

from rbee_queen.worker_client import Failure, should_retry


@pytest.mark.parametrize(("failure", "retried"), [
    ("unreachable", True),   # it never got the request
    ("refused", True),       # 503: no slot, loading, draining
    ("failed_early", True),  # an internal error before any token
    ("too_small", True),     # a worker with a longer context will take it
    ("died", False),         # the request may be what killed it
    ("silent", False),       # it holds the request: busy or hung, not gone
])
def test_a_failure_before_any_token_goes_to_another_worker_only_if_no_worker_held_it(
    failure: Failure, retried: bool,
) -> None:
    assert should_retry(failure, sent_any=False) is retried


@pytest.mark.parametrize("failure", ["unreachable", "refused", "failed_early", "too_small", "died", "silent"])
def test_nothing_is_retried_once_the_client_has_part_of_the_answer(failure: Failure) -> None:
    assert should_retry(failure, sent_any=True) is False
