"""One queen under load: concurrent streams held, heartbeats absorbed, time to stop.

Everything is real but the model: `queen-rbee --local-hive` on loopback, whose
hive starts `llm-worker-rbee --backend synthetic` workers (filler tokens at a
fixed rate; the backend exists for benchmarks and tests only). Three phases:

- streams: `--streams` chat completions (stream=true), all opened at once from
  a separate client process, each `--hold-s` long. Reports how many were held
  at the same time, every status other than 200, streams that did not end with
  `[DONE]`, workers the queen dropped meanwhile, the queen's RSS and CPU, and
  the first-token latency of one stream alone (HTTP/2 to the worker).
- heartbeats: `--heartbeat-workers` simulated workers beating every 5 s (the
  default period) and every 1 s, on a kept-alive connection each, as workers do; the
  queen's CPU share. (Their hive does not know them, so they stay unrouted;
  the queen asks it once and remembers the answer.)
- stop: SIGTERM while `--stop-streams` streams are open; the time until no
  process of the run is left, and whether every stream got its terminator.

    .venv/bin/python -m bench scale [--quick]
    .venv/bin/python bench/scale.py [--streams 10000] [--hold-s 120] [--heartbeat-workers 1000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.helpers import BIN, daemon, gone, job_result, run_job, wait_for
from rbee_common.daemon import raise_open_file_limit

MODEL = "synthetic"
PORT_MIN = 20000
RESULTS: dict[str, Any] = {}
"""What the running `run` has measured so far, phase by phase; `run` returns it."""


# --- the client: raw sockets, so that the client is not what we measure ------------------------

def _request(port: int, max_tokens: int) -> bytes:
    body = json.dumps({"model": MODEL, "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "hello there"}]}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def _streams(port: int, count: int, max_tokens: int, ramp_per_s: float, report: Any) -> None:
    """Open `count` streams at once; report counts while they run and at the end."""
    stats = {"opened": 0, "streaming": 0, "peak": 0, "done": 0, "no_terminator": 0, "reset": 0, "refused": 0}
    statuses: dict[str, int] = {}
    request = _request(port, max_tokens)

    async def one() -> None:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            stats["refused"] += 1
            return
        streaming = False
        async with stream:
            try:
                await stream.send_all(request)
                stats["opened"] += 1
                buffer = b""
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        break
                    if not streaming:
                        buffer += data
                        if b"\r\n" not in buffer:
                            continue
                        status = buffer.split(b" ", 2)[1].decode()
                        statuses[status] = statuses.get(status, 0) + 1
                        if status != "200":
                            return
                        streaming = True
                        stats["streaming"] += 1
                        stats["peak"] = max(stats["peak"], stats["streaming"])
                        data = buffer
                    buffer = (buffer + data)[-64:] if streaming else buffer
                    if b"data: [DONE]\n\n" in buffer:
                        stats["done"] += 1
                        return
                stats["no_terminator"] += 1
            except (OSError, trio.BrokenResourceError):
                stats["reset"] += 1
            finally:
                if streaming:
                    stats["streaming"] -= 1

    async def tell() -> None:
        while True:
            report.put(("progress", dict(stats), dict(statuses)))
            await trio.sleep(1.0)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tell)
        async with trio.open_nursery() as requests:
            for _ in range(count):
                requests.start_soon(one)
                # Paced: 10,000 connects at once overflow the kernel's accept queue (somaxconn,
                # often 4096), which resets some before the queen ever sees them.
                await trio.sleep(1 / ramp_per_s)
        nursery.cancel_scope.cancel()
    report.put(("end", dict(stats), dict(statuses)))


def client_process(port: int, count: int, max_tokens: int, ramp_per_s: float, report: Any) -> None:
    raise_open_file_limit()
    trio.run(_streams, port, count, max_tokens, ramp_per_s, report)


async def _beats(port: int, workers: int, seconds: float, period: float, report: Any) -> None:
    """`workers` fake workers of hive localhost, each beating every `period` s on a kept-alive connection."""
    async def beat(index: int) -> None:
        body = json.dumps({
            "worker_id": f"bench-{index}", "hive_id": "localhost",
            "url": f"http://127.0.0.1:{PORT_MIN + index}",
            "model": MODEL, "backend": "synthetic", "device": "CPU-0", "state": "ready",
            "slots_total": 1, "slots_busy": 0, "pid": 1_000_000 + index}).encode()
        request = (f"POST /v1/worker-heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        await trio.sleep(period * index / workers)  # spread over the period
        next_at = trio.current_time()
        end = next_at + seconds
        stream: trio.SocketStream | None = None
        while next_at < end:
            try:  # one kept-alive connection, as workers keep theirs
                if stream is None:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(request)
                answer = b""
                while b"\r\n\r\n" not in answer:  # a 204: no body
                    data = await stream.receive_some(4096)
                    if not data:
                        raise OSError("closed")
                    answer += data
                status = answer[9:12].decode()
            except (OSError, trio.BrokenResourceError):
                status = "reset"
                if stream is not None:
                    await stream.aclose()
                stream = None
            counts[status] = counts.get(status, 0) + 1
            next_at += period
            await trio.sleep_until(next_at)
        if stream is not None:
            await stream.aclose()

    counts: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        for index in range(workers):
            nursery.start_soon(beat, index)
    report.put(counts)


def beats_process(port: int, workers: int, seconds: float, period: float, report: Any) -> None:
    raise_open_file_limit()
    trio.run(_beats, port, workers, seconds, period, report)


# --- the run ------------------------------------------------------------------------------------

def queen_config(folder: Path, *, slots: int, rate: float) -> Path:
    config = folder / "rbee.toml"
    config.write_text(
        "[queen]\nqueue_size = 100000\n"
        "[hive]\nsynthetic_backend = true\n"
        f"synthetic_slots = {slots}\nsynthetic_tokens_per_s = {rate}\n"
        f"worker_port_min = {PORT_MIN}\nworker_port_max = {PORT_MIN + 9999}\n"
    )
    return config


def tree(pid: int) -> list[psutil.Process]:
    process = psutil.Process(pid)
    return [process, *process.children(recursive=True)]


def first_token_ms(url: str) -> float:
    started = time.monotonic()
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=30, json={
            "model": MODEL, "stream": True, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]},
    ) as response:
        for line in response.iter_lines():
            if '"content":"w0' in line.replace(" ", ""):
                return (time.monotonic() - started) * 1000
    raise RuntimeError("no token came back")


def run(args: argparse.Namespace) -> dict[str, Any]:
    RESULTS.clear()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        parts = ("STATE", "DATA", "CONFIG", "CACHE")
        env = {f"XDG_{part}_HOME": f"{folder}/{part.lower()}" for part in parts}
        slots = -(-args.streams // args.workers)
        config = queen_config(folder, slots=max(slots, args.stop_streams), rate=args.tokens_per_s)
        argv = [str(BIN / "queen-rbee"), "--port", "0", "--local-hive", "--config", str(config)]
        with daemon(argv, env=env) as queen:
            port = int(queen.url.rsplit(":", 1)[1])
            for _ in range(args.workers):
                run_job(queen.url, {"operation": "worker_spawn", "model": MODEL, "backend": "synthetic"})
            workers = job_result(queen.url, {"operation": "worker_list"})
            assert isinstance(workers, list) and len(workers) == args.workers
            print(f"{args.workers} synthetic worker(s), {slots} slots each, "
                  f"{args.tokens_per_s:g} tokens/s per stream")
            # One stream alone, on a fresh 1-token rate: what HTTP/2 to the worker costs a single stream.
            alone = [first_token_ms(queen.url) for _ in range(2)]
            RESULTS["alone_ttft_ms"] = round(statistics.median(alone))
            RESULTS["workers"], RESULTS["tokens_per_s"] = args.workers, args.tokens_per_s
            print(f"one stream alone: time to first token median {statistics.median(alone):.0f} ms "
                  f"(at {args.tokens_per_s:g} tokens/s the worker itself waits "
                  f"{1000 / args.tokens_per_s:.0f} ms)")

            streams_phase(args, queen, port)
            for period in args.heartbeat_periods:
                heartbeat_phase(args, queen, port, period)
            stop_phase(args, queen, port)
    return dict(RESULTS)

def queen_usage(pid: int) -> tuple[float, float]:
    process = psutil.Process(pid)
    times = process.cpu_times()
    return times.user + times.system, process.memory_info().rss / 1e6


def dropped_workers(log_path: Path) -> int:
    text = log_path.read_text(errors="replace")
    return sum(1 for line in text.splitlines() if "out of routing" in line and "bench-" not in line)


def streams_phase(args: argparse.Namespace, queen: Any, port: int) -> None:
    max_tokens = max(1, int(args.hold_s * args.tokens_per_s))
    report: Any = multiprocessing.Queue()
    client = multiprocessing.Process(
        target=client_process, args=(port, args.streams, max_tokens, args.ramp_per_s, report))
    cpu0, rss0 = queen_usage(queen.process.pid)
    started = time.monotonic()
    client.start()
    rss_peak, last = rss0, None
    held_since: float | None = None
    cpu_at_held = cpu0
    while True:
        kind, stats, statuses = report.get(timeout=args.hold_s * 4 + 120)
        _, rss = queen_usage(queen.process.pid)
        rss_peak = max(rss_peak, rss)
        if held_since is None and stats["streaming"] >= args.streams:
            held_since = time.monotonic()
            cpu_at_held, _ = queen_usage(queen.process.pid)
        if kind == "end":
            last = (stats, statuses)
            break
        if args.verbose:
            print(f"  {time.monotonic() - started:6.1f} s {stats} {statuses} rss {rss:.0f} MB", flush=True)
    client.join(30)
    took = time.monotonic() - started
    cpu1, _ = queen_usage(queen.process.pid)
    stats, statuses = last
    errors = {code: n for code, n in statuses.items() if code != "200"}
    RESULTS["streams"] = {
        "requested": args.streams, "held_at_once": stats["peak"], "done": stats["done"],
        "without_terminator": stats["no_terminator"], "reset": stats["reset"], "statuses": statuses,
        "five_xx": sum(n for code, n in errors.items() if code.startswith("5")), "hold_s": args.hold_s,
        "rss_idle_mb": round(rss0), "rss_peak_mb": round(rss_peak),
        "cpu_share": round((cpu1 - cpu0) / took, 3),
        "dropped_workers": dropped_workers(queen.log_path)}
    print(f"streams: {args.streams} requested, {stats['peak']} held at once, "
          f"{stats['done']} ended with [DONE], {stats['no_terminator']} without, {stats['reset']} reset; "
          f"statuses {statuses}; "
          f"5xx: {sum(n for code, n in errors.items() if code.startswith('5'))}")
    print(f"  queen RSS {rss0:.0f} MB idle, {rss_peak:.0f} MB peak; queen CPU {cpu1 - cpu0:.1f} s over "
          f"{took:.0f} s ({(cpu1 - cpu0) / took:.0%} of one core)")
    if held_since is not None:
        print(f"  all {args.streams} held after {held_since - started:.0f} s; queen CPU while they stream: "
              f"{(cpu1 - cpu_at_held) / max(time.monotonic() - held_since, 1e-9):.0%} of one core")
    print(f"  workers dropped from routing while streaming: {dropped_workers(queen.log_path)}")


def heartbeat_phase(args: argparse.Namespace, queen: Any, port: int, period: float) -> None:
    if not args.heartbeat_workers:
        return
    seconds, workers = args.heartbeat_s, args.heartbeat_workers
    report: Any = multiprocessing.Queue()
    beater = multiprocessing.Process(
        target=beats_process, args=(port, workers, seconds + period + 6, period, report))
    beater.start()
    time.sleep(period + 5)  # all registered, their first (costlier) beats done
    cpu0, _ = queen_usage(queen.process.pid)
    time.sleep(seconds)
    cpu1, rss = queen_usage(queen.process.pid)
    try:
        listed = job_result(queen.url, {"operation": "worker_list_active"}, timeout=30)
        count: object = len(listed) if isinstance(listed, list) else "?"
    except (httpx.HTTPError, AssertionError) as error:  # a saturated queen may not answer in time
        count = f"? (no answer: {type(error).__name__})"
    statuses = report.get(timeout=seconds + 60)
    beater.join(30)
    used = cpu1 - cpu0
    beats = seconds * workers / period
    RESULTS.setdefault("heartbeats", []).append({
        "workers": workers, "period_s": period, "seconds": seconds, "cpu_share": round(used / seconds, 3),
        "ms_per_beat": round(used / beats * 1e3, 3), "rss_mb": round(rss), "listed": count,
        "answers": statuses})
    print(f"heartbeats: {workers} workers beating every {period:g} s, for {seconds:g} s: queen CPU "
          f"{used / seconds:.0%} of one core ({used / beats * 1e3:.2f} ms a beat), RSS {rss:.0f} MB; "
          f"it listed {count} workers; answers {statuses}")


def stop_phase(args: argparse.Namespace, queen: Any, port: int) -> None:
    report: Any = multiprocessing.Queue()
    client = multiprocessing.Process(
        target=client_process, args=(port, args.stop_streams, 2000, args.ramp_per_s, report))
    client.start()
    while True:
        kind, stats, _ = report.get(timeout=120)
        if stats["streaming"] >= args.stop_streams or kind == "end":
            break
    pids = [p.pid for p in tree(queen.process.pid)]
    sent = time.monotonic()
    os.kill(queen.process.pid, signal.SIGTERM)
    wait_for(lambda: all(gone(pid) for pid in pids), timeout=60, interval=0.01)
    everything = time.monotonic() - sent
    while kind != "end":
        kind, stats, _ = report.get(timeout=60)
    client.join(30)
    RESULTS["stop"] = {"streams": args.stop_streams, "processes": len(pids),
                       "gone_after_s": round(everything, 2), "done": stats["done"],
                       "without": stats["no_terminator"] + stats["reset"]}
    print(f"stop: SIGTERM with {args.stop_streams} open streams: the queen and its {len(pids) - 1} "
          f"worker(s) gone after {everything:.2f} s; {stats['done']} streams ended with [DONE], "
          f"{stats['no_terminator'] + stats['reset']} without")


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2, help="synthetic workers (the streams are shared)")
    parser.add_argument("--tokens-per-s", type=float, default=0.05, help="per stream")
    parser.add_argument("--hold-s", type=float, default=400.0, help="how long each stream lasts")
    parser.add_argument("--ramp-per-s", type=float, default=60.0,
                        help="new connections a second (the queen sets up about that many a second here)")
    parser.add_argument("--heartbeat-workers", type=int, default=1000)
    parser.add_argument("--heartbeat-s", type=float, default=30.0, help="how long to measure")
    parser.add_argument("--heartbeat-periods", type=float, nargs="+", default=[5.0, 1.0],
                        help="beat periods to measure (5 s is the workers' default)")
    parser.add_argument("--stop-streams", type=int, default=100)
    parser.add_argument("--verbose", action="store_true")
    return parser.parse_args(argv)


def table(results: dict[str, Any]) -> str:
    streams, stop = results["streams"], results["stop"]
    lines = [
        "| phase | measured |", "|---|---|",
        f"| one stream alone | time to first token {results['alone_ttft_ms']} ms (the worker itself waits "
        f"{1000 / results['tokens_per_s']:.0f} ms for its first token) |",
        f"| {streams['requested']} streams at once, {streams['hold_s']:g} s each, on "
        f"{results['workers']} synthetic workers | {streams['held_at_once']} held at once; "
        f"{streams['done']} ended with `[DONE]`, {streams['without_terminator']} without, "
        f"{streams['reset']} reset; 5xx: {streams['five_xx']}; statuses {streams['statuses']}; "
        f"queen RSS {streams['rss_idle_mb']} MB idle, {streams['rss_peak_mb']} MB peak; "
        f"queen CPU {streams['cpu_share']:.0%} of one core; workers dropped: {streams['dropped_workers']} |",
    ]
    for beat in results.get("heartbeats", []):
        lines.append(f"| {beat['workers']} workers beating every {beat['period_s']:g} s | queen CPU "
                     f"{beat['cpu_share']:.0%} of one core, {beat['ms_per_beat']:.2f} ms a beat; "
                     f"RSS {beat['rss_mb']} MB; {beat['listed']} listed; answers {beat['answers']} |")
    lines.append(f"| SIGTERM with {stop['streams']} open streams | the queen and its "
                 f"{stop['processes'] - 1} worker(s) gone after {stop['gone_after_s']:.2f} s; "
                 f"{stop['done']} streams ended with `[DONE]`, {stop['without']} without |")
    return "\n".join(lines)


def main() -> None:
    run(options())


if __name__ == "__main__":
    main()
