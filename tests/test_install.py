"""The built wheel, installed outside the repository, serves the page and streams: in a venv (through the
``llm-relay`` console script), from a ``pip install --target`` folder on ``PYTHONPATH`` (a layout whose data is
not under ``sys.prefix``, like ``pip install --user``), and zipped (the wheel itself on ``PYTHONPATH``).

The wheel is built from a copy of the sources with ``pip wheel --no-build-isolation`` (setuptools and wheel come
with the test extra), so no step needs the network. The fresh venvs get the relay from the wheel alone; its
dependencies (aiohttp, openai, ...) are the test run's own, reached through a ``.pth`` line naming the test
run's site-packages, which Python reads as a plain path: the editable install of the checkout that lives there
is not loaded, and every test below checks where ``server`` was imported from.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Mapping
from pathlib import Path

import aiohttp
import pytest

from .processes import ROOT, clean_env, running_server
from .wire import ndjson_text, sse_events

PIP_TIMEOUT = 300


def _outside(**extra: str) -> dict[str, str]:
    """The environment of a process outside the checkout: no PYTHONPATH but what `extra` gives."""
    env = clean_env(**extra)
    if "PYTHONPATH" not in extra:
        env.pop("PYTHONPATH", None)
    return env


def _run(*argv: str | Path, cwd: Path, env: Mapping[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(arg) for arg in argv],
        cwd=cwd,
        env=_outside() if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=PIP_TIMEOUT,
    )
    assert done.returncode == 0, f"{argv}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("server", "web"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore)
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, ".", cwd=source)
    (built,) = dist.glob("*.whl")
    return built


def _venv(where: Path) -> Path:
    """A new venv at `where` that sees the test run's dependencies (not its `server`); returns its python."""
    _run(sys.executable, "-m", "venv", "--without-pip", where, cwd=where.parent)
    python = where / "bin" / "python"
    purelib = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=where).strip())
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (purelib / "zz_test_dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(deps)))
    return python


def _pip_install(python: Path, wheel: Path, *extra: str) -> None:
    # pip's --python installs into another interpreter's environment without a pip of its own there.
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", *extra, wheel,
         cwd=wheel.parent)  # fmt: skip


def _imported_from(python: Path, cwd: Path, env: Mapping[str, str]) -> str:
    return _run(python, "-c", "import server; print(server.__file__)", cwd=cwd, env=env).strip()


def test_the_wheel_holds_every_module_and_the_page(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "server").rglob("*.py")}
    assert modules <= names, f"setup.cfg [options] packages misses {sorted(modules - names)}"
    page = {"server/web/" + path.relative_to(ROOT / "web").as_posix() for path in (ROOT / "web").rglob("*.*")}
    assert page
    assert page <= names
    assert "server/py.typed" in names
    assert wheel.name.startswith("llm_stream_relay-")


async def _serves_page_and_streams(base: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/") as resp:
            assert resp.status == 200
            html = await resp.text()
        assert 'id="relay-settings"' in html
        for name in ("app.js", "ndjson.js", "style.css"):
            async with http.get(f"{base}/static/{name}") as resp:
                assert resp.status == 200
                assert await resp.read() == (ROOT / "web" / "static" / name).read_bytes()
        async with http.get(f"{base}/api/chat", params={"prompt": "installed"}) as resp:
            assert resp.status == 200
            events = sse_events(await resp.read())
        assert events[-1][0] == "done"
        assert "installed" in "".join(data["content"] for kind, data, _ in events if kind == "message")
        body = {"messages": [{"role": "user", "content": "hello"}]}
        async with http.post(f"{base}/api/chat", json=body, headers={"Accept": "application/x-ndjson"}) as resp:
            assert resp.status == 200
            assert "hello" in ndjson_text(await resp.read())


FAST = ("--demo-delay", "0", "--limits", "false")


async def test_installed_in_a_venv_the_console_script_serves(wheel: Path, tmp_path: Path) -> None:
    python = _venv(tmp_path / "venv")
    _pip_install(python, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert _imported_from(python, elsewhere, _outside()).startswith(str(tmp_path / "venv"))
    script = tmp_path / "venv" / "bin" / "llm-relay"
    assert _run(script, "--help", cwd=elsewhere).startswith("usage: llm-relay ")
    async with running_server(tmp_path, *FAST, command=(str(script),), cwd=elsewhere, env=_outside()) as relay:
        await _serves_page_and_streams(relay.base)


async def test_installed_with_target_outside_the_prefix_serves(wheel: Path, tmp_path: Path) -> None:
    # Like --user: the package is not under sys.prefix, where the page's files used to be looked for.
    python = _venv(tmp_path / "venv")
    target = tmp_path / "target"
    _pip_install(python, wheel, "--target", str(target))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _outside(PYTHONPATH=str(target))
    assert _imported_from(python, elsewhere, env).startswith(str(target))
    async with running_server(tmp_path, *FAST, command=(str(python), "-m", "server"), cwd=elsewhere, env=env) as relay:
        await _serves_page_and_streams(relay.base)


async def test_zipped_serves(wheel: Path, tmp_path: Path) -> None:
    # A pure-Python wheel is a zip that Python imports from: the page's files are zip members, not files.
    python = _venv(tmp_path / "venv")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _outside(PYTHONPATH=str(wheel))
    assert _imported_from(python, elsewhere, env).startswith(str(wheel))
    async with running_server(tmp_path, *FAST, command=(str(python), "-m", "server"), cwd=elsewhere, env=env) as relay:
        await _serves_page_and_streams(relay.base)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_run_installs_only_what_running_needs(tmp_path: Path) -> None:
    def commands(target: str) -> str:
        # -n prints what the target would run, -B as if nothing were installed yet; no directory lines when this
        # runs under make itself (make test).
        return _run("make", "--no-print-directory", "-n", "-B", target, f"VENV={tmp_path / 'venv'}", cwd=ROOT)

    run = commands("run")
    assert "pip install -q -e .\n" in run
    assert "[test]" not in run
    assert "llm-relay" in run.splitlines()[-1]
    assert "pip install -q -e '.[test]'" in commands("unit")
