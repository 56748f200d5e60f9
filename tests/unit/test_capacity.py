"""The capacity model (bench/capacity.py): its arithmetic, and that docs/capacity.md quotes
exactly the figures and ceilings the code uses."""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest

from bench import capacity
from bench.capacity import Ceilings, Load, ceilings, size, workers_per_channel

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "capacity.md"

# Round numbers, so that the expected answers can be worked out by hand.
ROUND = Ceilings(
    headroom=0.5,
    worker_connections=10_000,
    worker_deliveries_per_s=50_000,
    worker_publishes_per_s=2_000,
    worker_received_per_s=5_000,
    connection_bytes=20_000,
    worker_base_bytes=80_000_000,
    redis_publishes_per_s=4_000,
    cluster_shard_publishes_per_s=2_000,
    cluster_worker_publishes_per_s=1_000,
    idle_cpu_us_per_connection_s=0.0,
)


def doc_table(title: str) -> dict[str, str]:
    """The rows of the table under the doc's heading `title`: first column (a `name`) ->
    second column."""
    text = DOC.read_text()
    heading = re.search(rf"^#+ {re.escape(title)}\s*$", text, re.MULTILINE)
    assert heading, f"docs/capacity.md has no section {title!r}"
    rows: dict[str, str] = {}
    started = False
    for line in text[heading.end() :].splitlines():
        if line.startswith("|"):
            started = True
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            name = re.fullmatch(r"`([a-z_]+)`", cells[0])
            if name:
                rows[name.group(1)] = cells[1]
        elif started:
            break
    assert rows, f"no table under {title!r}"
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_the_doc_quotes_every_measured_figure_the_code_uses() -> None:
    rows = doc_table("Measured figures")
    assert set(rows) == set(capacity.MEASURED)
    for name, figure in capacity.MEASURED.items():
        assert number(rows[name]) == figure.value, name


def test_the_doc_quotes_the_ceilings_the_code_derives() -> None:
    rows = doc_table("Per-unit ceilings")
    c = ceilings()
    assert number(rows.pop("headroom")) == capacity.HEADROOM
    assert set(rows) == set(Ceilings.__dataclass_fields__) - {"headroom"}
    for name, cell in rows.items():
        # As the doc rounds them: whole numbers, or two decimals below 100.
        assert number(cell) == pytest.approx(getattr(c, name), rel=0.001, abs=0.5), name


def test_cpu_ceilings_are_the_headroom_over_the_measured_cost() -> None:
    c = ceilings(0.5)
    delivery_us = capacity.MEASURED["delivery_cpu_us"].value
    assert c.worker_deliveries_per_s == pytest.approx(0.5e6 / delivery_us)
    assert ceilings(1.0).worker_deliveries_per_s == pytest.approx(2 * c.worker_deliveries_per_s)
    assert c.worker_connections == capacity.MEASURED["worker_connections"].value


def test_a_channel_spreads_over_the_workers_as_its_subscribers_land() -> None:
    assert workers_per_channel(1, 10) == 1
    assert workers_per_channel(2, 1) == pytest.approx(1)
    assert workers_per_channel(2, 2) == pytest.approx(1.5)  # both on one worker half the time
    assert workers_per_channel(10, 100_000) == pytest.approx(10)
    assert workers_per_channel(5, 0) == 0


def test_idle_connections_need_workers_for_connections_alone() -> None:
    sizing = size(Load(95_000, 1, 95_000, 0.0), ROUND)
    assert sizing.workers == sizing.workers_for_connections == 10
    assert sizing.workers_for_cpu == 1
    assert sizing.limit == "connections per worker"
    assert sizing.redis_shards == 1
    assert sizing.worker_memory_bytes == 80_000_000 + 9_500 * 20_000
    assert sizing.total_worker_memory_bytes == 10 * sizing.worker_memory_bytes


def test_a_big_fan_out_needs_workers_for_its_deliveries() -> None:
    # One channel, 100,000 subscribers, 5 messages/s: 500,000 deliveries/s. At n
    # workers each delivers 500,000/n against its ceiling of 50,000, takes 5/n publishes
    # and receives all 5 messages: 11 workers, one more than the connections need.
    load = Load(100_000, 1, 100_000, 5.0)
    sizing = size(load, ROUND)

    def share(n: int) -> float:
        return 0.5 * (500_000 / n / 50_000 + 5 / n / 2_000 + 5 / 5_000)

    assert sizing.workers == sizing.workers_for_cpu
    assert share(sizing.workers) <= 0.5 < share(sizing.workers - 1)
    assert sizing.workers == 11
    assert sizing.workers_for_connections == 10
    assert sizing.worker_cpu_share == pytest.approx(share(11))
    assert sizing.deliveries_per_s == 500_000
    assert sizing.limit.startswith("CPU")


def test_publishes_beyond_one_redis_need_a_cluster_of_three_primaries_or_more() -> None:
    assert size(Load(1_000, 1_000, 1, 4_000.0), ROUND).redis_shards == 1
    # Past one Redis: at least the three primaries a cluster needs, then one per 2,000/s.
    assert size(Load(1_000, 1_000, 1, 4_001.0), ROUND).redis_shards == 3
    assert size(Load(1_000, 1_000, 1, 10_000.0), ROUND).redis_shards == math.ceil(10_000 / 2_000)


def test_on_a_cluster_the_workers_plan_for_its_dearer_publishes() -> None:
    one = size(Load(1_000, 1_000, 1, 4_000.0), ROUND)
    cluster = size(Load(1_000, 1_000, 1, 4_001.0), ROUND)
    assert cluster.workers >= 2 * one.workers - 1


def test_no_number_of_workers_helps_when_each_receives_too_many_messages() -> None:
    # Every worker holds a subscriber of every channel: each receives all 20,000
    # messages a second, four times what it can, however many there are.
    sizing = size(Load(1_000_000, 1, 1_000_000, 20_000.0), ROUND, max_workers=1_000)
    assert sizing.warnings
    assert "split the channels" in sizing.warnings[0]


def test_open_connections_take_their_standing_share_of_a_core() -> None:
    # 100 us per connection per second: 20,000 idle connections take 2 cores, so at
    # half a core each they need 4 workers where their number alone needs 2.
    standing = Ceilings(**{**ROUND.__dict__, "idle_cpu_us_per_connection_s": 100.0})
    sizing = size(Load(20_000, 1, 20_000, 0.0), standing)
    assert sizing.workers_for_connections == 2
    assert sizing.workers == sizing.workers_for_cpu == 4
    assert sizing.worker_cpu_share == pytest.approx(0.5)


def test_network_is_frames_times_their_rate() -> None:
    sizing = size(Load(1_000, 10, 100, 10.0, message_bytes=1_000), ROUND)
    # 1,000 deliveries/s of frames a little over 1,000 bytes each.
    assert 8e6 < sizing.client_egress_bits_per_s < 8e6 * 1.15
    assert 8e4 < sizing.publish_ingress_bits_per_s < 8e4 * 1.15


def test_the_script_prints_the_sizing_and_the_ceilings_it_used() -> None:
    result = subprocess.run(
        [
            str(REPO / "scripts" / "capacity"),
            *("--connections", "100000", "--channels", "1000"),
            *("--subscribers-per-channel", "100", "--messages-per-second", "200"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.startswith("load: 100,000 connections")
    for label in ("workers ", "Redis shards ", "memory ", "network ", "per Redis Cluster shard:"):
        assert label in result.stdout
    assert f"{ceilings().worker_deliveries_per_s:,.0f} deliveries/s" in result.stdout
