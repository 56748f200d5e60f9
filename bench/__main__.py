"""`python -m bench`: run the benchmark's scenarios and report (bench/README.md).

Each scenario starts its own redis-server and workers on free loopback ports, drives
them with the Node load generator, stops them, and adds a row to the table. Results go
to results.json and plot.png in the output folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import report, scenarios
from bench.servers import REDIS_MODES

# Settings every benchmark worker gets: the generator's publishers send far more than
# the per-connection default of 20 a second that protects a public service.
BENCH_SETTINGS = {"PUBLISH_RATE": "1000000", "PUBLISH_BURST": "1000000"}
# Scenarios bench/floor.py cannot serve: resuming needs history reads.
FLOOR_CANNOT = {"storm"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    names = [s.name for s in scenarios.FULL]
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the service: fan-out, many channels, idle memory, connect "
        "burst, reconnect storm. Prints a table; writes results.json and plot.png.",
    )
    parser.add_argument(
        "--scenarios",
        default=None,
        help=f"comma-separated, from: {', '.join(names)} (default: all; with --floor, "
        "all but storm)",
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny versions of the scenarios (CI: seconds)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a worker setting, e.g. --set WS_PER_MESSAGE_DEFLATE=true (repeatable)",
    )
    parser.add_argument(
        "--uvicorn",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="replace one of uvicorn's options, to compare by measurement: ws=wsproto, "
        "ws=websockets, loop=asyncio, http=h11 (repeatable; the service itself always "
        "runs websockets-sansio, uvloop and httptools)",
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="run bench/floor.py's framework-free workers instead of the service, to "
        "measure what the topology itself costs on this machine (not the storm scenario)",
    )
    parser.add_argument(
        "--compare",
        type=Path,
        default=None,
        metavar="CHECKOUT",
        help="run every second worker (1, 3, ...) from another checkout of this project, "
        "the others from this one, and report each side's CPU and their ratio: two "
        "versions measured in the same run, on the same machine at the same moment",
    )
    parser.add_argument(
        "--redis",
        choices=REDIS_MODES,
        default="single",
        help="single: one redis-server (default); cluster: a local Redis Cluster of 3 "
        "primaries and 3 replicas; workers get BROADCAST_URL=redis-cluster://...",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default bench/results/<time>)"
    )
    args = parser.parse_args(argv)
    if args.floor and args.uvicorn:
        parser.error("--floor runs no uvicorn: leave out --uvicorn")
    if args.floor and args.redis != "single":
        parser.error("--floor talks to one redis-server: leave out --redis cluster")
    if args.compare is not None:
        if args.floor:
            parser.error("--floor runs no service: leave out --compare")
        if args.workers < 2 or args.workers % 2:
            parser.error("--compare needs an even number of workers (two sides, same load)")
        args.compare = args.compare.resolve()
        if not (args.compare / "service" / "__main__.py").is_file():
            parser.error(f"--compare: no service/__main__.py in {args.compare}")
    if args.floor and any(i.split("=", 1)[0].upper() == "WS_PER_MESSAGE_DEFLATE" for i in args.set):
        parser.error("--floor never compresses: leave out WS_PER_MESSAGE_DEFLATE")
    if args.scenarios is None:
        args.scenarios = ",".join(n for n in names if not (args.floor and n in FLOOR_CANNOT))
    unknown = set(args.scenarios.split(",")) - set(names)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    unable = set(args.scenarios.split(",")) & FLOOR_CANNOT if args.floor else set()
    if unable:
        parser.error(f"the floor cannot run {', '.join(sorted(unable))}: it has no resume")
    for item in [*args.set, *args.uvicorn]:
        if "=" not in item:
            parser.error(f"--set and --uvicorn take NAME=VALUE, not {item!r}")
    unknown_options = {item.split("=", 1)[0] for item in args.uvicorn} - {"ws", "loop", "http"}
    if unknown_options:
        parser.error(f"--uvicorn takes ws, loop or http, not {', '.join(sorted(unknown_options))}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen scenarios; exit status 1 if any of them lost or repeated messages."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out: Path = args.out or Path(__file__).resolve().parent / "results" / stamp
    out.mkdir(parents=True, exist_ok=True)
    settings = dict(BENCH_SETTINGS)
    settings.update(item.split("=", 1) for item in args.set)
    uvicorn_overrides = dict(item.split("=", 1) for item in args.uvicorn)
    chosen = [s for s in scenarios.FULL if s.name in args.scenarios.split(",")]
    if args.smoke:
        chosen = [scenarios.smoke(s) for s in chosen]
    measurements = []
    for n, scenario in enumerate(chosen, 1):
        print(
            f"[{n}/{len(chosen)}] {scenario.name}: {scenario.description} "
            f"({scenario.subscribers} clients, {args.workers} workers)",
            flush=True,
        )
        started = time.monotonic()
        measurement = scenarios.run(
            scenario,
            args.workers,
            settings,
            out / scenario.name,
            uvicorn_overrides,
            floor=args.floor,
            compare=args.compare,
            redis=args.redis,
        )
        measurements.append(measurement)
        print(f"      done in {time.monotonic() - started:.0f} s", flush=True)
    print()
    if args.floor:
        print("THE FLOOR (bench/floor.py), not the service: what the topology itself costs")
    print(report.table(measurements))
    if args.compare is not None:
        print()
        print(report.comparison(measurements, args.compare))
    document_settings = {
        "workers": args.workers,
        **settings,
        "uvicorn": uvicorn_overrides,
        "floor": args.floor,
        "compare": None if args.compare is None else str(args.compare),
        "redis": args.redis,
    }
    report.write_json(measurements, out / "results.json", document_settings)
    report.plot(measurements, out / "plot.png")
    print(f"\nresults: {out / 'results.json'}\nplot:    {out / 'plot.png'}")
    broken = [
        m.scenario.name for m in measurements if m.result.get("lost") or m.result.get("duplicates")
    ]
    if broken:
        print(f"LOST OR REPEATED MESSAGES in: {', '.join(broken)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
