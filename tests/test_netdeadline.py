"""The overall deadline of an HTTP request (edentune.netdeadline), against real servers on 127.0.0.1."""

from __future__ import annotations

import time

import httpx
import pytest

from edentune.netdeadline import client_transport, deadline
from trickle_server import TrickleServer


def test_a_trickle_is_cut_off_at_the_deadline_although_each_byte_is_on_time(trickle_server):
    with httpx.Client(timeout=5.0, transport=client_transport()) as client:
        start = time.monotonic()
        with pytest.raises(httpx.TimeoutException), deadline(1.0) as limit:
            client.get(trickle_server.url + "/anything")
        elapsed = time.monotonic() - start
    assert limit.expired and elapsed < 5.0  # one read timeout would be 5 s; the body would take ~8 years


def test_outside_a_deadline_the_per_wait_timeouts_still_apply(trickle_server):
    with httpx.Client(timeout=0.1, transport=client_transport()) as client:
        with pytest.raises(httpx.ReadTimeout):  # 0.25 s between bytes > the 0.1 s read timeout
            client.get(trickle_server.url)


def test_progress_at_a_sane_rate_extends_the_deadline_and_a_trickle_does_not():
    # 1 MiB in 64 KiB chunks every 0.1 s: about 1.6 s, longer than the 0.5 s deadline, at 640 KiB/s.
    with TrickleServer(fast_bytes=1 << 20) as server, httpx.Client(timeout=5.0, transport=client_transport()) as client:
        with deadline(0.5, min_rate=256 << 10) as limit:
            assert len(client.get(server.url).content) == 1 << 20
        assert not limit.expired
        with pytest.raises(httpx.TimeoutException), deadline(0.5) as limit:  # without min_rate: no extension
            client.get(server.url)
        assert limit.expired
    with TrickleServer() as server, httpx.Client(timeout=5.0, transport=client_transport()) as client:
        with pytest.raises(httpx.TimeoutException), deadline(0.5, min_rate=256 << 10) as limit:
            client.get(server.url)  # one byte per 0.25 s earns 4 µs each
        assert limit.expired


def test_one_client_gives_each_request_its_own_deadline():
    with TrickleServer(fast_bytes=1000, chunk_interval=0) as server, httpx.Client(timeout=5.0, transport=client_transport()) as client:
        for _ in range(3):
            with deadline(2.0) as limit:
                assert client.get(server.url).status_code == 200
            assert not limit.expired
