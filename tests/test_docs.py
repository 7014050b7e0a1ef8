"""Every shell and Python block of README.md and docs/*.md runs as written, against a relay this module starts.

The convention (docs/README.md says it too): a block fenced as ``sh``, ``bash``, ``shell`` or ``python`` is a
snippet and runs, with ``127.0.0.1:8080`` meaning the relay this module started (its port replaces 8080). Its
first line may say otherwise, visibly:

* ``# not run: <why>``: it cannot run offline or here (a real API key, a Redis elsewhere, the whole test suite);
  reported as a skip with the reason, so ``pytest -ra`` lists what did not run.
* ``# serves: <path>``: it starts a server that runs until stopped; it runs until ``<path>`` on its port answers
  200, then it is stopped.

Blocks fenced without a language (outputs, wire bytes) or as ``js`` (browser code) are not snippets. Each snippet is
a test case named by its file and line; pytest's summary says how many ran and how many were skipped.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .processes import ROOT, clean_env, free_port, start_server

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"sh", "bash", "shell"}
LANGUAGES = SHELLS | {"python"}
RUN_TIMEOUT = 60.0
FENCE = re.compile(r"^```(\S*)")


@dataclass(frozen=True, slots=True)
class Snippet:
    path: Path
    line: int
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def marker(self) -> tuple[str, str] | None:
        """("not run" | "serves", its argument) from the first line, or None."""
        first = self.code.split("\n", 1)[0]
        match = re.fullmatch(r"#\s*(not run|serves):\s*(.+)", first.strip())
        return (match.group(1), match.group(2).strip()) if match else None


def snippets_in(path: Path) -> Iterator[Snippet]:
    language: str | None = None
    start = 0
    body: list[str] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if language is None:
            match = FENCE.match(line)
            if match:
                language, start, body = match.group(1).lower(), number, []
        elif line.startswith("```"):
            if language in LANGUAGES:
                yield Snippet(path, start, "bash" if language in SHELLS else "python", "\n".join(body) + "\n")
            language = None
        else:
            body.append(line)


SNIPPETS = [snippet for path in DOCS for snippet in snippets_in(path)]


def _environment(tmp_path: Path) -> dict[str, str]:
    # The checkout's `server` (not an installed copy), and this interpreter's venv first on PATH, so `python`,
    # `llm-relay` and `pip` are the ones the tests run with.
    bin_dir = str(Path(sys.executable).parent)
    return clean_env(
        PYTHONPATH=str(ROOT), PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", HOME=str(tmp_path)
    )


def _command(snippet: Snippet, code: str) -> list[str]:
    if snippet.language == "bash":
        return ["bash", "-euo", "pipefail", "-c", code]
    return [sys.executable, "-c", code]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def _wait_for(url: str, process: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _get(url) == 200:
            return True
        if process is not None and process.poll() is not None:
            return False
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def relay_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """The relay the snippets talk to: ``python -m server`` with the demo model, fast, without admission limits."""
    port = free_port()
    stderr = tmp_path_factory.mktemp("relay") / "stderr"
    process = start_server(port, "--demo-delay", "0.001", "--limits", "false", stderr=stderr)
    try:
        assert _wait_for(f"http://127.0.0.1:{port}/healthz", process, 30), stderr.read_text()[-2000:]
        yield port
    finally:
        process.kill()
        process.wait(10)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[snippet.name for snippet in SNIPPETS])
def test_snippet_runs_as_written(snippet: Snippet, relay_port: int, tmp_path: Path) -> None:
    marker = snippet.marker
    if marker is not None and marker[0] == "not run":
        pytest.skip(f"{snippet.name} not run: {marker[1]}")
    env = _environment(tmp_path)
    if marker is None:
        code = snippet.code.replace("8080", str(relay_port))
        done = subprocess.run(
            _command(snippet, code), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT
        )
        assert done.returncode == 0, f"{snippet.name} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr}"
        # curl exits 0 on a refusal too: no snippet may print the relay's error body (a refusal or an in-band error).
        assert '{"error":' not in done.stdout, f"{snippet.name} printed an error:\n{done.stdout[-2000:]}"
        return
    port = free_port()
    code = snippet.code.replace("8080", str(port))
    with (tmp_path / "output").open("wb") as output:
        # A session of its own, so that stopping it stops what the shell started too.
        process = subprocess.Popen(
            _command(snippet, code), cwd=tmp_path, env=env, stdout=output, stderr=output, start_new_session=True
        )
    try:
        served = _wait_for(f"http://127.0.0.1:{port}{marker[1]}", process, RUN_TIMEOUT)
        assert served, f"{snippet.name} did not serve {marker[1]}:\n{(tmp_path / 'output').read_text()[-2000:]}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def test_the_convention_is_kept(capsys: pytest.CaptureFixture[str]) -> None:
    # Enough snippets run for the test to mean something, and every marker gives its reason or its path.
    run = [snippet for snippet in SNIPPETS if snippet.marker is None or snippet.marker[0] == "serves"]
    assert len(run) >= 8, [snippet.name for snippet in run]
    serving = sum(1 for snippet in run if snippet.marker is not None)
    with capsys.disabled():
        print(
            f"\ndocs: {len(SNIPPETS)} snippets in {len(DOCS)} files: {len(run) - serving} run to the end, "
            f"{serving} serve until stopped, {len(SNIPPETS) - len(run)} not run (marked)"
        )
    for snippet in SNIPPETS:
        first = snippet.code.split("\n", 1)[0]
        if re.match(r"#\s*(not run|serves)\b", first.strip()):
            assert snippet.marker is not None, f"{snippet.name}: write '# not run: <why>' or '# serves: <path>'"
        if snippet.marker is not None and snippet.marker[0] == "serves":
            assert snippet.marker[1].startswith("/"), snippet.name


def test_the_readme_is_a_five_minute_read_and_installs_this_project() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    for snippet in SNIPPETS:
        # "llm-relay" on the package index is another project: every install line installs this checkout.
        assert not re.search(r"pip install\s+['\"]?llm-relay\b", snippet.code), snippet.name
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for link in re.findall(r"\]\(((?!https?:|#)[^)#]+)", text):
            assert (path.parent / link).exists(), f"{path.name} links to a missing {link}"
