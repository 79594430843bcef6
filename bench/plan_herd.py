"""A fleet job starting at once: time to plan for one rank and for N ranks, on SQLite and PostgreSQL.

Every rank of a fleet job asks for its plan at start-up, so a cold workload meets a herd of
identical `POST /v1/plans?wait=300` within a second. Each measurement starts `tuner serve` (the
API and its local estimate worker, the one-machine deployment) on a fresh database, waits until
the worker serves, and asks for the plan of a cold workload (a tiny GPT-2 on a 4 GiB card,
checkpointing `auto`: two probes): once from one client, and once from N clients at once.

Reported per database: seconds until the last client has its plan, that time as a multiple of
the lone request's (the goal: N = 512 within 1.3×), and the SQL statements the API process sent
(its `tuner_db_statements_total`): in all, and per second while every client was waiting. The
herd's answers are checked as well: N answers 200 naming one plan, one job, one probe result
per checkpointing choice, every waiter row resolved to that plan (a rank that asked after the
job ended found the plan cached and waited on nothing: the table says how many waited).

    python bench/plan_herd.py [--ranks 512] [--repeat 1] [--no-postgres] [--json]

`--repeat R` measures R rounds (lone and herd back to back per database, the order alternating
between rounds) and reports the median of each cell; the ratio is the median of the rounds'
ratios. CPU seconds are reported too, of the API process and of the worker with its probes: on a
machine shared with other work they move far less than wall time does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from storage.db import make_engine  # noqa: E402
from storage.models import JobRow, JobWaiterRow, ProbeRow  # noqa: E402
from tests.servers import (  # noqa: E402
    TUNER,
    clean_env,
    free_port,
    fresh_postgres_database,
    postgres_reachable,
    start_server,
    wait_until,
)

DEVICE = {"name": "Bench GPU 4GiB", "total_memory_bytes": 4 << 30}
PLAN_REQUEST: dict[str, Any] = {
    "workload": {
        "model": {
            "family": "transformers",
            "config": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 256},
        },
        "inputs": {"kind": "tokens", "seq_len": 256},
        "precision": "bf16-mixed",
    },
    "effective_batch_size": 512,
    "device": DEVICE,
    "backend": "estimate",
    "policy": {"gradient_checkpointing": "auto"},
}
WAIT_SECONDS = 300
SCRAPE_SECONDS = 1.0
"""How often the statement counter is read while the clients wait."""


@dataclass
class Measurement:
    database: str
    ranks: int
    waited: int
    """Ranks that waited on the probe job (the others came after it and found the plan cached)."""
    seconds: float
    """Until the last client had its plan."""
    api_cpu_seconds: float
    """CPU the API process used meanwhile (the worker and its probes are other processes): what
    the herd costs the cores the probe runs on, steadier than wall time on a shared machine."""
    worker_cpu_seconds: float
    """CPU the local worker and its probe processes used meanwhile: the probe's own work."""
    statements: int
    """SQL statements the API process sent, from the first request to the last answer."""
    statements_per_second_waiting: float | None
    """While every client was waiting (None when the wait was too short to tell)."""


@contextmanager
def tuner_serve(database_url: str, log_dir: Path) -> Iterator[tuple[str, int]]:
    """`tuner serve` (API + local worker) on a free port; yields its base URL and the API
    process's pid once the worker serves."""
    port = free_port()
    log_path = log_dir / f"serve-{port}.log"
    server = start_server(
        [*TUNER, "serve", "--port", str(port), "--db", database_url],
        port=port,
        env=clean_env({"TUNER_DATABASE_URL": database_url, "TUNER_LOG_LEVEL": "INFO"}),
        log_path=log_path,
        timeout=120,
    )
    try:
        wait_until(
            lambda: "serving estimate jobs" in server.log(),
            timeout=120,
            what="the local worker",
            interval=0.2,
        )
        yield server.base_url, server.process.pid
    finally:
        server.stop(timeout=60)


def cpu_seconds(pid: int, *, with_children: bool = False) -> float:
    """User + system CPU seconds process `pid` has used so far: its own, plus with
    `with_children` those of its children that have ended (a worker's probe processes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(field) for field in fields[11 : 15 if with_children else 13])
    return ticks / os.sysconf("SC_CLK_TCK")


def worker_pid(api_pid: int) -> int:
    """The local worker: the `tuner serve` process's child."""
    # Any of its threads may have started it (`tuner serve` supervises it from a thread).
    children = [
        child
        for task in Path(f"/proc/{api_pid}/task").iterdir()
        for child in (task / "children").read_text().split()
    ]
    if len(children) != 1:
        raise RuntimeError(f"expected one local worker under pid {api_pid}, found {children}")
    return int(children[0])


def statements(client: httpx.Client) -> int:
    """The API's `tuner_db_statements_total` (the scrape itself costs a few, counted once)."""
    text = client.get("/metrics").text
    found = re.search(r"^tuner_db_statements_total (\S+)$", text, re.M)
    if found is None:
        raise RuntimeError("the API exports no tuner_db_statements_total")
    return int(float(found.group(1)))


class StatementSampler:
    """Reads the statement counter every `SCRAPE_SECONDS` in a thread: (monotonic time, count)."""

    def __init__(self, base_url: str) -> None:
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._client = httpx.Client(base_url=base_url, timeout=30)
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StatementSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._client.close()

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_SECONDS):
            self.samples.append((time.monotonic(), statements(self._client)))

    def rate_between(self, start: float, end: float, scrape_cost: int) -> float | None:
        inside = [(t, n) for t, n in self.samples if start <= t <= end]
        if len(inside) < 2:
            return None
        (t0, n0), (t1, n1) = inside[0], inside[-1]
        scrapes = len(inside) - 1
        return max(0.0, (n1 - n0 - scrapes * scrape_cost) / (t1 - t0))


@dataclass
class Answer:
    """One HTTP answer, as the bench's client read it."""

    status_code: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


async def post_plan(host: str, port: int, body: bytes) -> Answer:
    """One `POST /v1/plans?wait=…` on a connection of its own, in plain HTTP/1.1.

    The ranks of a fleet ask from their own machines; here they share the server's cores, so
    the client is as light as a client can be (a general-purpose client spent more CPU on 512
    connections than the server did answering them)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        head = (
            f"POST /v1/plans?wait={WAIT_SECONDS} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        response = await reader.read()  # the server closes after the answer
    finally:
        writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    _headers, _, content = rest.partition(b"\r\n\r\n")
    return Answer(int(status_line.split()[1]), content)


async def ask_all(base_url: str, ranks: int) -> tuple[list[Answer], list[float], float]:
    """`ranks` identical plan requests at once; the answers, each one's arrival time, and the
    time the last request was sent (all `time.monotonic()`)."""
    url = httpx.URL(base_url)
    host, port = url.host, url.port or 80
    body = json.dumps(PLAN_REQUEST).encode()
    sent: list[float] = []
    arrived: list[float] = []

    async def ask() -> Answer:
        sent.append(time.monotonic())
        answer = await post_plan(host, port, body)
        arrived.append(time.monotonic())
        return answer

    answers = await asyncio.gather(*(ask() for _ in range(ranks)))
    return list(answers), arrived, max(sent)


def check_answers(database_url: str, answers: list[Answer]) -> int:
    """Every answer 200 with one plan; one job; one probe per checkpointing choice; every waiter
    row resolved to that plan. Returns how many ranks waited on the job (waiter rows): a rank
    that asked after the job had ended found the plan cached and needed none."""
    statuses = sorted({answer.status_code for answer in answers})
    if statuses != [200]:
        bad = next(answer for answer in answers if answer.status_code != 200)
        raise RuntimeError(f"answers with status {statuses}, e.g. {bad.status_code} {bad.text[:300]}")
    plan_ids = {answer.json()["id"] for answer in answers}
    if len(plan_ids) != 1:
        raise RuntimeError(f"{len(answers)} ranks got {len(plan_ids)} plans: {sorted(plan_ids)}")
    engine = make_engine(database_url)
    try:
        with engine.connect() as db:
            jobs = db.execute(select(func.count()).select_from(JobRow)).scalar_one()
            probes = db.execute(select(func.count()).select_from(ProbeRow)).scalar_one()
            waiters = db.execute(select(JobWaiterRow.status, JobWaiterRow.plan_id)).all()
    finally:
        engine.dispose()
    resolved = sum(1 for status, plan_id in waiters if status == "resolved" and plan_id in plan_ids)
    if (jobs, probes, resolved) != (1, 2, len(waiters)) or not waiters:
        raise RuntimeError(
            f"expected 1 job, 2 probes and every waiter resolved to the plan; found {jobs} job(s), "
            f"{probes} probe(s), {len(waiters)} waiter(s), {resolved} resolved to it"
        )
    return len(waiters)


def measure(database: str, database_url: str, ranks: int, log_dir: Path) -> Measurement:
    with (
        tuner_serve(database_url, log_dir) as (base_url, api_pid),
        httpx.Client(base_url=base_url, timeout=30) as client,
    ):
        before = statements(client)
        scrape_cost = statements(client) - before
        before += scrape_cost
        worker = worker_pid(api_pid)
        with StatementSampler(base_url) as sampler:
            started, cpu_before = time.monotonic(), cpu_seconds(api_pid)
            probe_before = cpu_seconds(worker, with_children=True)
            answers, arrived, last_sent = asyncio.run(ask_all(base_url, ranks))
            cpu = cpu_seconds(api_pid) - cpu_before
            probe_cpu = cpu_seconds(worker, with_children=True) - probe_before
        seconds = max(arrived) - started
        total = statements(client) - before - (len(sampler.samples) + 1) * scrape_cost
        waited = check_answers(database_url, answers)
        # "Waiting": from a second after the last request went out until the first answer came.
        rate = sampler.rate_between(last_sent + 1.0, min(arrived), scrape_cost)
    print(
        f"  {database:10} {ranks:4} rank(s), {waited:4} waited: {seconds:6.1f} s, API CPU {cpu:5.2f} s, "
        f"worker CPU {probe_cpu:5.1f} s, "
        f"{total:6d} statements" + (f", {rate:.1f}/s while waiting" if rate is not None else ""),
        file=sys.stderr,
    )
    return Measurement(database, ranks, waited, seconds, cpu, probe_cpu, total, rate)


@contextmanager
def fresh_database(database: str, directory: Path) -> Iterator[str]:
    if database == "sqlite":
        with tempfile.TemporaryDirectory(dir=directory) as sub:
            yield f"sqlite:///{Path(sub) / 'tuner.db'}"
    else:
        with fresh_postgres_database("tuner_herd") as url:
            yield url


def median_of(runs: list[Measurement]) -> Measurement:
    rates = [
        run.statements_per_second_waiting for run in runs if run.statements_per_second_waiting is not None
    ]
    return Measurement(
        runs[0].database,
        runs[0].ranks,
        round(statistics.median(run.waited for run in runs)),
        statistics.median(run.seconds for run in runs),
        statistics.median(run.api_cpu_seconds for run in runs),
        statistics.median(run.worker_cpu_seconds for run in runs),
        round(statistics.median(run.statements for run in runs)),
        statistics.median(rates) if rates else None,
    )


def round_ratios(runs: dict[tuple[str, int], list[Measurement]]) -> dict[tuple[str, int], float]:
    """Per database and herd size: the median over rounds of the herd's time over the lone
    request's time in the same round (measured back to back, so a slow spell of the machine
    falls on both)."""
    ratios: dict[tuple[str, int], float] = {}
    for (database, ranks), herds in runs.items():
        lones = runs.get((database, 1))
        if ranks > 1 and lones:
            ratios[(database, ranks)] = statistics.median(
                herd.seconds / lone.seconds for herd, lone in zip(herds, lones, strict=True)
            )
    return ratios


def table(cells: list[Measurement], ratios: dict[tuple[str, int], float]) -> str:
    lines = [
        "| database | ranks | waited on the job | seconds to plan (last rank) | × one rank "
        "| API CPU s | worker CPU s | API SQL statements | statements/s while waiting |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cells:
        ratio = ratios.get((c.database, c.ranks), 1.0)
        rate = "–" if c.statements_per_second_waiting is None else f"{c.statements_per_second_waiting:,.1f}"
        lines.append(
            f"| {c.database} | {c.ranks} | {c.waited} | {c.seconds:.1f} | {ratio:.2f}× "
            f"| {c.api_cpu_seconds:.2f} | {c.worker_cpu_seconds:.1f} | {c.statements:,} | {rate} |"
        )
    return "\n".join(lines)


def verdict(ratios: dict[tuple[str, int], float], goal: float = 1.3) -> str:
    parts = [
        f"{database} {ranks} ranks {ratio:.2f}× ({'met' if ratio <= goal else 'NOT met'})"
        for (database, ranks), ratio in ratios.items()
    ]
    return f"Goal: the herd within {goal}× the lone request's time. " + "; ".join(parts) + "."


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=512, help="clients asking at once")
    parser.add_argument("--repeat", type=int, default=1, help="rounds (medians reported)")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON")
    args = parser.parse_args()
    databases = ["sqlite"]
    if not args.no_postgres:
        if postgres_reachable():
            databases.append("postgresql")
        else:
            print("PostgreSQL not reachable: SQLite only", file=sys.stderr)
    runs: dict[tuple[str, int], list[Measurement]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for round_index in range(args.repeat):
            # Lone first in even rounds, herd first in odd ones: a machine that grows busier
            # during the run does not always fall on the same one.
            order = (1, args.ranks) if round_index % 2 == 0 else (args.ranks, 1)
            for database in databases:
                for ranks in order:
                    with fresh_database(database, workdir) as url:
                        runs.setdefault((database, ranks), []).append(measure(database, url, ranks, workdir))
    cells = [median_of(found) for found in runs.values()]
    ratios = round_ratios(runs)
    if args.json:
        print(json.dumps([asdict(c) for c in cells], indent=2))
    else:
        print(table(cells, ratios))
        print()
        print(verdict(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
