"""Latency and throughput of the tuner API's cached paths, next to a bare FastAPI endpoint.

Starts a real uvicorn server (one process) on SQLite, and on PostgreSQL when one is reachable,
seeds probe results through the repository so that one plan is cached, then drives, with `wrk`
at 1, 16 and 64 concurrent connections for a few seconds each:

- `bare`: a FastAPI endpoint returning a constant JSON (`bench/bare_app.py`), served the same way;
- `POST /v1/plans`: the same plan request again and again (a cache hit, token checked);
- `GET /v1/plans`: the first page of plans.

Prints a table (requests/s, p50, p99) and the issue's figure at 16 clients on SQLite: the cached
POST's requests/s as a share of the bare endpoint's, and its p99 as a multiple of the bare p99.

    python bench/api_latency.py [--duration 5] [--clients 1,16,64] [--repeat 1] [--no-postgres] [--json]

Needs `wrk` (Debian: `apt-get install wrk`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from storage import repository  # noqa: E402
from storage.db import ensure_schema, make_engine  # noqa: E402
from tests.servers import (  # noqa: E402
    API_APP,
    ServerProcess,
    free_port,
    fresh_postgres_database,
    postgres_reachable,
    start_server,
    uvicorn_command,
)
from tuner.results import ProbeResult  # noqa: E402
from tuner.search_types import MemoryLine, Trial  # noqa: E402
from tuner.spec import DeviceSpec, parse_workload  # noqa: E402

TOKEN = "bench-token"
DEVICE = DeviceSpec(name="NVIDIA H100 80GB HBM3", total_memory_bytes=85_017_493_504)
WORKLOAD = parse_workload(
    {
        "model": {"family": "transformers", "config": {"model_type": "gpt2", "n_layer": 12}},
        "inputs": {"kind": "tokens", "seq_len": 1024},
        "precision": "bf16-mixed",
    }
)
PLAN_REQUEST = {
    "workload": WORKLOAD.model_dump(mode="json"),
    "effective_batch_size": 512,
    "world_size": 1,
    "device": DEVICE.model_dump(mode="json"),
    "backend": "cuda",
    "policy": {"gradient_checkpointing": "auto"},
}


@dataclass
class Cell:
    database: str
    endpoint: str
    clients: int
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    non_2xx: int


@contextmanager
def uvicorn_server(target: list[str], env: dict[str, str], log_dir: Path, health_path: str) -> Iterator[str]:
    """`python -m uvicorn <target>` on a free port, one process, no access log; yields its base URL."""
    port = free_port()
    server: ServerProcess = start_server(
        [*uvicorn_command(target, port), "--no-access-log"],
        port=port,
        env=env,
        log_path=log_dir / f"uvicorn-{port}.log",
        health_path=health_path,
    )
    try:
        yield server.base_url
    finally:
        server.stop()


def seed(database_url: str) -> None:
    """Both checkpointing choices probed, so that the plan request is answered from the cache."""
    engine = make_engine(database_url)
    ensure_schema(engine)
    for checkpointing, per_sample in ((False, 1.55e9), (True, 0.42e9)):
        line = MemoryLine(fixed_bytes=2.1e9, per_sample_bytes=per_sample)
        largest = line.largest_batch_under(DEVICE.total_memory_bytes * 0.95)
        trials = [
            Trial(
                batch_size=b, ok=b <= largest, peak_reserved_bytes=int(line.at(b)) if b <= largest else None
            )
            for b in (8, largest, largest + 1)
        ]
        result = ProbeResult(
            fingerprint=WORKLOAD.fingerprint(),
            workload=WORKLOAD,
            device=DEVICE,
            backend="cuda",
            gradient_checkpointing=checkpointing,
            max_batch_size=largest,
            trials=trials,
            memory_line=line,
            versions={"torch": "2.13.0"},
        )
        repository.save_probe(engine, result=result)
    engine.dispose()


@contextmanager
def postgres_database() -> Iterator[str | None]:
    """A fresh PostgreSQL database for the run (dropped after), or None when none is reachable."""
    if not postgres_reachable():
        yield None
        return
    with fresh_postgres_database("tuner_bench") as url:
        yield url


def wrk(url: str, *, clients: int, duration: float, script: Path | None) -> tuple[float, float, float, int]:
    """requests/s, p50 ms, p99 ms and non-2xx responses of one `wrk` run."""
    command = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(duration))}s", "--latency", "--timeout", "10s"]
    if script is not None:
        command += ["-s", str(script)]
    output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _latency_ms(re.search(r"^\s+50%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    p99 = _latency_ms(re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    return rps, p50, p99, int(non_2xx.group(1)) if non_2xx else 0


def _latency_ms(value: str) -> float:
    number, unit = re.match(r"([\d.]+)(us|ms|s|m)", value).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}[unit]


def post_script(directory: Path) -> Path:
    script = directory / "post_plan.lua"
    body = json.dumps(PLAN_REQUEST)
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {TOKEN}"\n'
    )
    return script


def run_database(
    database: str, url: str, *, clients: list[int], duration: float, repeat: int, workdir: Path
) -> list[Cell]:
    seed(url)
    env = {**os.environ, "TUNER_DATABASE_URL": url, "TUNER_API_TOKEN": TOKEN, "TUNER_TORCH_MINOR": "2.13"}
    script = post_script(workdir)
    cells: list[Cell] = []
    with (
        uvicorn_server(["bench.bare_app:app"], env, workdir, "/") as bare,
        uvicorn_server(API_APP, env, workdir, "/healthz") as api,
    ):
        first = httpx.post(f"{api}/v1/plans", json=PLAN_REQUEST, headers={"Authorization": f"Bearer {TOKEN}"})
        if first.status_code != 200 or not first.json()["cache_hit"]:
            raise RuntimeError(f"the seeded plan is not cached: {first.status_code} {first.text}")
        targets = [("bare", bare + "/", None), ("POST /v1/plans", api + "/v1/plans", script)]
        targets.append(("GET /v1/plans", api + "/v1/plans", None))
        for count in clients:
            runs: dict[str, list[tuple[float, float, float, int]]] = {name: [] for name, _, _ in targets}
            for _name, target, lua in targets:
                wrk(target, clients=count, duration=1, script=lua)  # warm-up
            # Rounds interleave the endpoints, so that a burst of load from elsewhere on the
            # machine falls on all of them alike; each cell reports its median round.
            for _ in range(repeat):
                for name, target, lua in targets:
                    runs[name].append(wrk(target, clients=count, duration=duration, script=lua))
            for name, _, _ in targets:
                rps, p50, p99, errors = sorted(runs[name])[len(runs[name]) // 2]
                cells.append(Cell(database, name, count, rps, p50, p99, errors))
                print(f"  {database:10} {name:16} {count:3} clients: {rps:8.0f} req/s  p50 {p50:6.2f} ms  "
                      f"p99 {p99:6.2f} ms", file=sys.stderr)  # fmt: skip
    return cells


def table(cells: list[Cell]) -> str:
    lines = [
        "| database | endpoint | clients | requests/s | p50 ms | p99 ms |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for c in cells:
        flag = f" ({c.non_2xx} non-2xx)" if c.non_2xx else ""
        lines.append(
            f"| {c.database} | {c.endpoint} | {c.clients} | {c.requests_per_second:,.0f}{flag} | "
            f"{c.p50_ms:.2f} | {c.p99_ms:.2f} |"
        )
    return "\n".join(lines)


def target_figure(cells: list[Cell], clients: int = 16) -> str:
    by = {(c.database, c.endpoint, c.clients): c for c in cells}
    bare, post = by.get(("sqlite", "bare", clients)), by.get(("sqlite", "POST /v1/plans", clients))
    if bare is None or post is None:
        return ""
    share = post.requests_per_second / bare.requests_per_second
    p99 = post.p99_ms / bare.p99_ms
    met = "met" if share >= 0.6 and p99 <= 1.5 else "NOT met"
    return (
        f"At {clients} clients on SQLite, cached POST /v1/plans serves {share:.0%} of the bare endpoint's "
        f"requests/s (target ≥ 60 %) with p99 {p99:.2f}× the bare p99 (target ≤ 1.5×): {met}."
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per cell")
    parser.add_argument("--clients", default="1,16,64", help="comma-separated connection counts")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds per cell (median kept)")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--json", action="store_true", help="print the cells as JSON")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian: apt-get install wrk)", file=sys.stderr)
        return 2
    clients = [int(part) for part in args.clients.split(",")]
    cells: list[Cell] = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        cells += run_database(
            "sqlite",
            f"sqlite:///{workdir / 'tuner.db'}",
            clients=clients,
            duration=args.duration,
            repeat=args.repeat,
            workdir=workdir,
        )
        if not args.no_postgres:
            with postgres_database() as url:
                if url is None:
                    print("PostgreSQL not reachable: SQLite only", file=sys.stderr)
                else:
                    cells += run_database(
                        "postgresql",
                        url,
                        clients=clients,
                        duration=args.duration,
                        repeat=args.repeat,
                        workdir=workdir,
                    )
    if args.json:
        print(json.dumps([asdict(c) for c in cells], indent=2))
    else:
        print(table(cells))
        print()
        print(target_figure(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
