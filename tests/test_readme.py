"""Every example of README.md runs as written, on files the repository ships.

- ``sh`` blocks: each command line runs in bash (``vtd-emu`` on PATH is this checkout's), from a copy of
  the checkout's ``traces/``; it must exit 0, or the status its comment names (``# exit status 1``).
  Blocks that run ``make`` (set-up, the test suite itself) are not run here.
- ``console`` blocks: ``$ command`` lines, each followed by the exact output it prints.
- ``pycon`` blocks: doctests (the output shown is the output printed).
- ``python`` blocks: scripts run in a fresh interpreter; a block that defines ``test_*`` functions is a
  test module and runs under pytest, with the vtd-emu plugin's fixtures.
"""

from __future__ import annotations

import doctest
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
_FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.S | re.M)
_STATUS = re.compile(r"#.*\bexit status (\d)\b")


def _blocks(lang: str) -> list[tuple[int, str]]:
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(2)) for m in _FENCE.finditer(text) if m.group(1) == lang]


def _commands() -> list[tuple[str, str, int]]:
    """(id, command, expected exit status) of every command line of the runnable sh blocks."""
    out = []
    for line0, body in _blocks("sh"):
        if re.search(r"^\s*(\S+=\S+\s+)*make\b", body, re.M):
            continue
        for i, line in enumerate(body.splitlines()):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            m = _STATUS.search(line)
            out.append((f"README.md:{line0 + 1 + i}", line, int(m.group(1)) if m else 0))
    return out


@pytest.fixture
def workdir(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A scratch directory with a copy of traces/ and an environment whose ``vtd-emu`` is this tree's."""
    shutil.copytree(REPO / "traces", tmp_path / "traces")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "vtd-emu"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m vtd_emu \"$@\"\n")
    shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    return tmp_path, env


def test_the_readme_has_examples_of_each_kind() -> None:
    assert len(_commands()) >= 12
    assert _blocks("console") and _blocks("pycon") and len(_blocks("python")) >= 2


def test_sh_commands_run_as_written(workdir: tuple[Path, dict[str, str]]) -> None:
    pytest.importorskip("zstandard")
    cwd, env = workdir
    # In order: later commands read what earlier ones wrote (record -> convert, import-qemu -> replay).
    for where, cmd, status in _commands():
        r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == status, f"{where}: {cmd}\nexit {r.returncode}, expected {status}\n{r.stderr}"
        assert "Traceback" not in r.stderr, f"{where}: {cmd}\n{r.stderr}"


def test_console_output_is_what_the_command_prints(workdir: tuple[Path, dict[str, str]]) -> None:
    pytest.importorskip("zstandard")
    cwd, env = workdir
    checked = 0
    for line0, body in _blocks("console"):
        cmd: str | None = None
        expected: list[str] = []
        for line in body.splitlines() + ["$ "]:
            if line.startswith("$ "):
                if cmd:
                    r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True,
                                       timeout=300)
                    m = _STATUS.search(cmd)
                    assert r.returncode == (int(m.group(1)) if m else 0), f"README.md:{line0}: {cmd}\n{r.stderr}"
                    assert r.stdout.splitlines() == expected, f"README.md:{line0}: {cmd}"
                    checked += 1
                cmd, expected = line[2:].strip(), []
            else:
                expected.append(line)
    assert checked >= 2


def test_pycon_examples_print_what_they_show(workdir: tuple[Path, dict[str, str]]) -> None:
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for line0, body in _blocks("pycon"):
        test = parser.get_doctest(body, {}, f"README.md:{line0}", str(README), line0)
        runner.run(test)
    res = runner.summarize(verbose=False)
    assert res.attempted > 5 and res.failed == 0


def test_python_examples_run(workdir: tuple[Path, dict[str, str]]) -> None:
    cwd, env = workdir
    for line0, body in _blocks("python"):
        script = cwd / f"readme_{line0}.py"
        if re.search(r"^def test_", body, re.M):
            script = cwd / f"test_readme_{line0}.py"
            script.write_text(body)
            argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(script)]
        else:
            script.write_text(body)
            argv = [sys.executable, str(script)]
        r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"README.md:{line0}\n{r.stdout}\n{r.stderr}"
        if "pytest" in argv:
            assert re.search(r"\b1 passed\b", r.stdout), r.stdout
