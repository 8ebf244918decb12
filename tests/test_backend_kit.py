"""qo.backend_kit: the helpers backends over HTTP share (server clock, secret scrubbing)."""

from __future__ import annotations

import logging
import time

from qo.backend_kit import SecretScrubber, ServerClock, scrub


def _date(server: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(server))


def test_the_server_clock_pins_a_skewed_offset_and_restarts_after_a_jump():
    clock = ServerClock()
    now = 1_800_000_000.0
    for i, frac in enumerate((0.1, 0.4, 0.68, 0.72, 0.95)):  # either side of the second boundary
        local = now + 10 * i + frac
        clock.observe(_date(int(local + 100.3)), local - 0.01, local + 0.01)
    assert abs(clock.offset - 100.3) < 0.1
    clock.observe(_date(now + 45), now + 50, now + 50.02)  # the server stepped back 105 s
    assert abs(clock.offset - (-4.5)) < 0.6
    for bad in (None, "", "not a date"):
        clock.observe(bad, now, now)
    assert abs(clock.offset - (-4.5)) < 0.6


def test_the_scrubber_removes_remembered_secrets_from_an_sdks_log_records(caplog):
    scrubber = SecretScrubber().install(["qo-test-sdk"])
    scrubber.remember(["s3cr3t-key", "abc", ""])  # shorter than 4: not a secret worth matching
    logger = logging.getLogger("qo-test-sdk")
    with caplog.at_level(logging.DEBUG, logger="qo-test-sdk"):
        logger.debug("Authorization: %s signed %s", "s3cr3t-key", "abc")
    assert caplog.records[0].getMessage() == "Authorization: *** signed abc"
    logging.getLogger("qo-test-sdk").removeFilter(scrubber)


def test_scrub_cuts_and_replaces():
    assert scrub("token=zzzz9 and zzzz9", ["zzzz9"]) == "token=*** and ***"
    assert scrub("x" * 500, []) == "x" * 300
    assert scrub("x" * 500, [], limit=None) == "x" * 500
