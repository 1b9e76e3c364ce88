"""The controller's checks on heartbeats and registrations (pure; the live attacks are in
``tests/integration/test_security_cluster.py``)."""

from __future__ import annotations

from typing import Any

import pytest

from deploy.runtime.controller import MAX_QUEUE_LENGTH, heartbeat_refusal, sent_by_worker, status_refusal

WORKER = "http://127.0.0.1:31020"


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"queue_length": 0},
        {"worker_name": 5, "queue_length": 0},
        {"worker_name": WORKER},
        {"worker_name": WORKER, "queue_length": "x"},
        {"worker_name": WORKER, "queue_length": 1.5},
        {"worker_name": WORKER, "queue_length": True},
        {"worker_name": WORKER, "queue_length": -1},
        {"worker_name": WORKER, "queue_length": 10**9},
    ],
)
def test_malformed_heartbeats_are_refused(body: Any) -> None:
    assert heartbeat_refusal(body) is not None


@pytest.mark.parametrize("queue_length", [0, 7, MAX_QUEUE_LENGTH])
def test_real_heartbeats_pass(queue_length: int) -> None:
    assert heartbeat_refusal({"worker_name": WORKER, "queue_length": queue_length}) is None


@pytest.mark.parametrize(
    "status",
    [
        "x",
        {"model_names": "tiny", "speed": 1, "queue_length": 0},
        {"model_names": [1], "speed": 1, "queue_length": 0},
        {"model_names": ["tiny"], "speed": "1", "queue_length": 0},
        {"model_names": ["tiny"], "speed": 0, "queue_length": 0},
        {"model_names": ["tiny"], "speed": 1, "queue_length": "x"},
        {"model_names": ["tiny"], "speed": 1, "queue_length": 10**9},
    ],
)
def test_malformed_worker_status_is_refused(status: Any) -> None:
    assert status_refusal(status) is not None


def test_real_worker_status_passes_and_an_empty_model_list_withdraws() -> None:
    assert status_refusal(None) is None
    assert status_refusal({"model_names": ["tiny"], "speed": 1, "queue_length": 0}) is None
    assert status_refusal({"model_names": [], "speed": 1, "queue_length": 0}) is None


def test_a_heartbeat_counts_only_from_an_address_of_the_workers_host() -> None:
    assert sent_by_worker(WORKER, "127.0.0.1")
    assert sent_by_worker(WORKER, "::ffff:127.0.0.1")
    assert not sent_by_worker(WORKER, "127.0.0.5")
    assert not sent_by_worker("http://10.0.0.2:31020", "10.0.0.3")
    assert sent_by_worker("http://localhost:31020", "127.0.0.1")
    assert not sent_by_worker("not a url", "127.0.0.1")
    assert not sent_by_worker(WORKER, None)
