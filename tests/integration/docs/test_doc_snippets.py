"""Every snippet of README.md and docs/ runs as written (see `snippets.py` for what each fence
language means): the python of a page as one script, each bash block and console command in a
fresh directory against a real `tuner serve` (API and estimate worker) where it names
127.0.0.1:8000, servers started until healthy, JSON workloads validated."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.docs.snippets import (
    LANGUAGES,
    PAGES,
    REPO,
    Snippet,
    all_snippets,
    console_commands,
    documented_rows,
)
from tests.servers import ServerProcess, clean_env, free_port, start_server, stop_process
from tuner.spec import parse_workload

pytestmark = pytest.mark.slow

SNIPPETS = all_snippets()
BIN = Path(sys.executable).parent
DOCUMENTED_PORT = 8000


def _id(snippet: Snippet) -> str:
    return f"{snippet.where}-{snippet.language}"


def test_every_block_names_a_language_the_test_knows() -> None:
    unknown = [s.where for s in SNIPPETS if s.language not in LANGUAGES]
    assert unknown == [], f"fences without a known language ({sorted(LANGUAGES)}): {unknown}"
    assert {"README.md", "docs/api.md", "docs/training.md"} <= {s.page for s in SNIPPETS}


def _skip_reason(snippet: Snippet) -> str | None:
    if snippet.not_run:
        return snippet.not_run
    if snippet.needs == "gpu":
        import torch

        return None if torch.cuda.is_available() else "needs a GPU; this machine has none"
    if snippet.needs == "docker":
        ok = (
            shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
        )
        return None if ok else "needs a running Docker daemon; this machine has none"
    return None


def _environment(workdir: Path, **extra: str) -> dict[str, str]:
    env = clean_env({"PYTHONPATH": str(REPO), "TUNER_LOG_LEVEL": "WARNING", **extra})
    env.pop("TUNER_SERVER", None)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["HOME"] = str(workdir)  # nothing the snippets write lands outside the test's directory
    return env


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A fresh directory with the repository's `examples/`, as a clone has it."""
    (tmp_path / "examples").symlink_to(REPO / "examples")
    return tmp_path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`tuner serve` with its local (estimate) worker on a free port: what `make run` serves."""
    directory = tmp_path_factory.mktemp("snippet-service")
    port = free_port()
    server = start_server(
        [str(BIN / "tuner"), "serve", "--port", str(port), "--db", f"sqlite:///{directory / 'tuner.db'}"],
        port=port,
        env=_environment(directory),
        log_path=directory / "serve.log",
        timeout=120,
    )
    yield server
    server.stop()


def _on_service(code: str, service: ServerProcess) -> str:
    address = service.base_url.removeprefix("http://")
    return code.replace(f"127.0.0.1:{DOCUMENTED_PORT}", address).replace(
        f"localhost:{DOCUMENTED_PORT}", address
    )


def _run(command: str, workdir: Path, *, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", command],
        cwd=workdir,
        env=_environment(workdir),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# A page's python is one script that may plan several times (training.md's loops, custom-code
# models): minutes on a loaded two-core machine; the subprocess still stops at 600 s.
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "page", [p for p in PAGES if any(s.page == p and s.language == "python" for s in SNIPPETS)]
)
def test_the_python_of_a_page_runs_as_one_script(page: str, workdir: Path) -> None:
    blocks = [s for s in SNIPPETS if s.page == page and s.language == "python" and _skip_reason(s) is None]
    script = "\n\n".join(f"# --- {s.where}\n{s.code}" for s in blocks)
    (workdir / "snippets.py").write_text(script, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "snippets.py"],
        cwd=workdir,
        env=_environment(workdir, TUNER_DATABASE_URL=f"sqlite:///{workdir / 'tuner.db'}"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{page}'s python failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.language == "bash"], ids=_id)
def test_a_bash_block_runs(snippet: Snippet, workdir: Path, request: pytest.FixtureRequest) -> None:
    reason = _skip_reason(snippet)
    if reason is not None:
        pytest.skip(reason)
    if snippet.starts_server:
        _start_and_stop(snippet, workdir)
        return
    code = snippet.code
    if f":{DOCUMENTED_PORT}" in code:
        code = _on_service(code, request.getfixturevalue("service"))
    done = _run(code, workdir)
    assert done.returncode == 0, f"{snippet.where} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    if "curl" in code and "/v1/plans" in code:
        plan = json.loads(done.stdout)
        assert plan["micro_batch_size"] * plan["accumulation_steps"] == plan["effective_batch_size"], plan


def _start_and_stop(snippet: Snippet, workdir: Path) -> None:
    """Run a block that starts a server, on a free port where it names one, until it is healthy."""
    ports = [p for p in (DOCUMENTED_PORT, 8080) if f"--port {p}" in snippet.code]
    code = snippet.code
    if ports:
        port = free_port()
        code = code.replace(f"--port {ports[0]}", f"--port {port}")
    else:
        port = DOCUMENTED_PORT  # the default the block relies on
        if not _port_free(port):
            pytest.skip(f"port {port}, which {snippet.where} listens on, is in use here")
    log = workdir / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            ["bash", "-c", code], cwd=workdir, env=_environment(workdir), stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, f"{snippet.where} exited:\n{log.read_text()[-3000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (
                f"{snippet.where} never became healthy:\n{log.read_text()[-3000:]}"
            )
            time.sleep(0.3)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        stop_process(process, timeout=30)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


# A documented plan may probe several times (docs/planner.md's worked example: four estimate probes
# of an 8-layer decoder), minutes on a small machine; `_run` still stops each command at 600 s.
@pytest.mark.timeout(900)
@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.language == "console"], ids=_id)
def test_a_console_command_runs_and_prints_what_is_shown(snippet: Snippet, workdir: Path) -> None:
    commands = console_commands(snippet.code)
    assert commands, f"{snippet.where} shows no `$ ` command"
    for command in commands:
        done = _run(command, workdir)
        assert done.returncode == 0, (
            f"{snippet.where}: {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
        printed = [
            " ".join(cell.strip() for cell in line.strip("│ ").split("│"))
            for line in done.stdout.splitlines()
        ]
        for row in documented_rows(snippet.code, "micro-batch size"):
            assert row in printed, f"{snippet.where} documents {row!r}; the command printed:\n{done.stdout}"


@pytest.mark.parametrize("snippet", [s for s in SNIPPETS if s.language == "json"], ids=_id)
def test_a_json_block_parses_and_a_workload_validates(snippet: Snippet) -> None:
    document = json.loads(snippet.code)
    if "model" in document:
        parse_workload(document)
