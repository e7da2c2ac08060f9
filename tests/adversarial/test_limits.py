"""Limits fuel cannot enforce: wall-clock deadlines on host-call loops, and log rate limits."""

from __future__ import annotations

import time

from _malicious import build, module

from ism.hypervisor.supervisor import MAX_LOG_PER_ACTIVATION, State

TICKER = (
    module(
        "log",
        """
  (data (i32.const 100) "tick ")
  (global $n (mut i32) (i32.const 0))
  (func (export "tick") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (i32.store8 (i32.const 105) (i32.add (i32.const 48) (global.get $n)))
    (call $log (i32.const 1) (i32.const 100) (i32.const 6))
    (i32.const 0))""",
    ),
    'resources = { timer = ["read"] }',
)

# Host calls cost fuel only for the few instructions around them: this loop would run for many
# seconds on its fuel budget alone.
HOST_CALL_LOOP = module(
    "self_id",
    """
  (func (export "tick") (result i32)
    (loop $forever (drop (call $self_id (i32.const 0))) (br $forever))
    (i32.const 0))""",
)

LOG_SPAM = module(
    "log",
    """
  (data (i32.const 0) "spam")
  (func (export "tick") (result i32) (local $i i32)
    (loop $more
      (call $log (i32.const 1) (i32.const 0) (i32.const 4))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $more (i32.lt_u (local.get $i) (i32.const 1000))))
    (i32.const 0))""",
)


def test_host_call_loop_hits_the_wall_clock_deadline() -> None:
    world = build(
        {
            "ticker": TICKER,
            "spinner": (HOST_CALL_LOOP, 'resources = { timer = ["read"] }\ndeadline_ms = 50\nfuel = 1000000000'),
        }
    )
    started = time.monotonic()
    world.run(1)
    elapsed = time.monotonic() - started
    assert world.state("spinner") is State.RESTARTING
    (record,) = world.records_of("spinner")
    assert record["rule"] == "sandbox.deadline"
    assert record["action"] == "restart in 100 ms"
    assert elapsed < 5, "the deadline did not bound the activation"
    assert world.lines("ticker") == ["tick 1"]  # the neighbour ran in the same step


def test_log_flood_is_rate_limited_and_neighbours_keep_their_lines() -> None:
    world = build({"ticker": TICKER, "spammer": (LOG_SPAM, 'resources = { timer = ["read"] }')})
    world.run(3)
    spam = world.lines("spammer")
    assert spam.count("spam") == 3 * MAX_LOG_PER_ACTIVATION
    dropped = [line for line in spam if "dropped" in line]
    assert len(dropped) == 3
    assert f"[{1000 - MAX_LOG_PER_ACTIVATION} log line(s) dropped" in dropped[0]
    assert world.lines("ticker") == ["tick 1", "tick 2", "tick 3"]
    assert world.state("spammer") is State.RUNNING  # rate limiting is not a violation
    assert list(world.sup.by_name["ticker"].logs)[-1] == (1, "tick 3")


def test_compiled_module_cache_is_keyed_by_the_code_not_by_a_claimed_measurement() -> None:
    """Two images claiming the same measurement still run their own code."""
    import dataclasses

    world = build({"ticker": TICKER, "spammer": (LOG_SPAM, 'resources = { timer = ["read"] }')})
    images = [dataclasses.replace(img, measurement=b"\0" * 32) for img in world.images.values()]
    from ism.hypervisor.supervisor import Supervisor

    sup = Supervisor(images, world.policy.by_uuid, world.peripherals, record=lambda r: 0)
    sup.start()
    sup.step()
    assert [text for who, _, text in sup.logs if who == "ticker"] == ["tick 1"]
    assert any(text == "spam" for who, _, text in sup.logs if who == "spammer")
