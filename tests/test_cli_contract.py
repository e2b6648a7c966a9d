"""The command line's bad-input contract, under mutation of every input kind it reads.

Each shipped input (YAML, JSON Lines and .npz traces, QEMU reference scenarios, QEMU logs, raw and zstd
RAM images, command-line values, the specs directory) is mutated as a hostile user would: truncation,
byte flips, wrong types, unknown keys, huge values, dropped and extra arrays.  Every command that reads
that kind runs on every mutant, and the contract holds:

- the exit status is 0, 1 or 2, and no exception escapes ``main()``;
- on 2, stderr is exactly one line, and no output file was left behind;
- no traceback is printed, whatever the status.

Mutants come from a fixed-seed generator, so a failure reproduces; ``main()`` runs in-process for speed,
with a few subprocess checks (the specs directory, ``--version``) where only a fresh process can tell.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import yaml

from vtd_emu.cli import main

REPO = Path(__file__).resolve().parents[1]
TRACES = REPO / "traces"
HUGE = [-1, 2**64, 2**80, 0xFFFFFFFF, 2**63, 0x1_0000, 0x10_0000, 1 << 40]
WRONG = ["x", "0xZZ", None, True, [], {}, [1, 2], {"a": 1}, 1.5, ""]


def _rng(name: str) -> random.Random:
    return random.Random(f"cli-contract-{name}")


# -- checking one run ---------------------------------------------------------------------------------


def run_contract(argv: list[str], outputs: list[Path], capsys: pytest.CaptureFixture[str]) -> int:
    for o in outputs:
        if o.exists():
            o.unlink()
    try:
        rc = main(argv)
    except BaseException as exc:  # noqa: BLE001 - the contract is that nothing escapes
        pytest.fail(f"{type(exc).__name__} escaped main({argv}): {exc}")
    cap = capsys.readouterr()
    assert rc in (0, 1, 2), (argv, rc)
    assert "Traceback" not in cap.err and "Traceback" not in cap.out, (argv, cap.err)
    if rc == 2:
        lines = cap.err.strip("\n").splitlines()
        assert len(lines) == 1, (argv, cap.err)
        assert lines[0].startswith("vtd-emu"), (argv, cap.err)
        left = [o for o in outputs if o.exists()]
        assert not left, (argv, left)
        assert not list(outputs[0].parent.glob(f".{outputs[0].name}.*")) if outputs else True
    return rc


# -- mutations ----------------------------------------------------------------------------------------


def byte_mutants(data: bytes, rng: random.Random, n: int) -> Iterator[bytes]:
    """Truncations and 1-3 byte flips."""
    for _ in range(n):
        if rng.random() < 0.4:
            yield data[:rng.randrange(0, max(1, len(data)))]
        else:
            b = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(b))
                b[i] ^= 1 << rng.randrange(8)
            yield bytes(b)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, prefix + (i,))


def mutate_doc(doc: Any, rng: random.Random) -> Any:
    """A deep copy of ``doc`` with one value replaced by a wrong type or a huge number, a key added or a key
    dropped."""
    doc = json.loads(json.dumps(doc))
    paths = [p for p in _paths(doc) if p]
    if not paths:
        return {"unknown": 1}
    path = rng.choice(paths)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    r = rng.random()
    if r < 0.35:
        parent[key] = rng.choice(HUGE)
    elif r < 0.55:
        parent[key] = rng.choice(WRONG)
    elif r < 0.7:
        parent[key] = hex(rng.choice([h for h in HUGE if h >= 0]))
    elif r < 0.85 and isinstance(parent, dict):
        parent[f"unknown_{rng.randrange(100)}"] = 1
    elif isinstance(parent, dict):
        del parent[key]
    else:
        parent.insert(key, rng.choice(WRONG + HUGE))
    return doc


def yaml_mutants(text: str, rng: random.Random, n: int) -> Iterator[bytes]:
    doc = yaml.safe_load(text)
    for i in range(n):
        if i % 3 == 0:
            yield from byte_mutants(text.encode(), rng, 1)
        else:
            yield yaml.safe_dump(mutate_doc(doc, rng), sort_keys=False).encode()


def jsonl_mutants(text: str, rng: random.Random, n: int) -> Iterator[bytes]:
    lines = text.splitlines()
    for i in range(n):
        if i % 3 == 0:
            yield from byte_mutants(text.encode(), rng, 1)
            continue
        j = rng.randrange(len(lines))
        out = list(lines)
        out[j] = json.dumps(mutate_doc(json.loads(lines[j]), rng))
        yield ("\n".join(out) + "\n").encode()


def npz_mutants(path: Path, rng: random.Random, n: int) -> Iterator[bytes]:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    raw = path.read_bytes()
    for i in range(n):
        kind = i % 6
        if kind in (0, 1):
            yield from byte_mutants(raw, rng, 1)
            continue
        a = dict(arrays)
        name = rng.choice(sorted(a))
        if kind == 2:
            del a[name]
        elif kind == 3:
            a[f"extra_{i}"] = np.zeros(3, np.uint8)
        elif kind == 4:
            a[name] = a[name][:-1] if len(a[name]) else a[name]
        else:
            a[name] = a[name].astype(np.float64) if a[name].dtype != np.float64 else a[name]
        buf = io.BytesIO()
        np.savez_compressed(buf, **a)
        yield buf.getvalue()


def deflate_damage(path: Path) -> bytes:
    """The .npz with one byte inside a compressed member's data flipped (a zlib error, not a zip one)."""
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = max(zf.infolist(), key=lambda i: i.compress_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start + info.compress_size // 2] ^= 0xFF
    return bytes(raw)


def log_mutants(text: str, rng: random.Random, n: int) -> Iterator[bytes]:
    import re

    lines = text.splitlines()
    for i in range(n):
        if i % 4 == 0:
            yield from byte_mutants(text.encode(), rng, 1)
            continue
        out = list(lines)
        j = rng.randrange(len(out))
        if i % 4 == 1:
            out[j] = re.sub(r"0x[0-9a-f]+|\b\d+\b", lambda m: rng.choice(["0x" + "f" * 20, "-1", "zz", "4294967295"]),
                            out[j], count=rng.randint(1, 3))
        elif i % 4 == 2:
            del out[j: j + rng.randint(1, 5)]
        else:
            out.insert(j, out[rng.randrange(len(out))])
        yield ("\n".join(out) + "\n").encode()


def small_npz(tmp: Path) -> Path:
    """legacy-dma.yaml as .npz, with its DMA notes dropped so the DMAs become columns with expectations."""
    doc = yaml.safe_load((TRACES / "legacy-dma.yaml").read_text())
    for ev in doc["events"]:
        if ev.get("op") == "dma":
            ev.pop("note", None)
    plain = tmp / "plain.yaml"
    plain.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = tmp / "small.npz"
    assert main(["convert", str(plain), str(out)]) == 0
    with np.load(out) as z:
        assert len(z["exp_flags"]) > 3
    return out


# -- traces: replay, record, convert, timeline --------------------------------------------------------


def _trace_commands(src: Path, tmp: Path) -> list[tuple[list[str], list[Path]]]:
    return [
        (["replay", "--check", str(src)], []),
        (["replay", "--json", "--sanitize", str(src)], []),
        (["record", str(src), "-o", str(tmp / "rec.jsonl")], [tmp / "rec.jsonl"]),
        (["convert", str(src), str(tmp / "conv.npz")], [tmp / "conv.npz"]),
        (["timeline", str(src), "-o", str(tmp / "tl.json")], [tmp / "tl.json"]),
    ]


def _run_mutants(mutants: Iterator[bytes], name: str, tmp: Path, capsys: pytest.CaptureFixture[str],
                 commands: Callable[[Path, Path], list[tuple[list[str], list[Path]]]]) -> dict[int, int]:
    seen: dict[int, int] = {0: 0, 1: 0, 2: 0}
    for i, data in enumerate(mutants):
        src = tmp / f"m{i}-{name}"
        src.write_bytes(data)
        for argv, outs in commands(src, tmp):
            seen[run_contract(argv, outs, capsys)] += 1
        src.unlink()
    return seen


@pytest.mark.parametrize("name", ["legacy-dma.yaml", "forgot-to-invalidate.yaml", "host-passthrough.yaml"])
def test_yaml_trace_mutants(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (TRACES / name).read_text()
    seen = _run_mutants(yaml_mutants(text, _rng(name), 24), name, tmp_path, capsys, _trace_commands)
    assert seen[2] > 0 and seen[0] + seen[1] > 0  # the mutants reach both outcomes


def test_jsonl_trace_mutants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    name = "first-stage-5level.jsonl"
    text = (TRACES / name).read_text()
    seen = _run_mutants(jsonl_mutants(text, _rng(name), 30), name, tmp_path, capsys, _trace_commands)
    assert seen[2] > 0 and seen[0] + seen[1] > 0


def test_npz_trace_mutants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = small_npz(tmp_path)
    capsys.readouterr()
    mutants = list(npz_mutants(small, _rng("npz"), 30)) + [deflate_damage(small)]
    seen = _run_mutants(iter(mutants), "t.npz", tmp_path, capsys, _trace_commands)
    assert seen[2] > 0


def test_npz_damage_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The three .npz cases of the issue: a bad deflate member, an unknown array, a short exp_flags."""
    small = small_npz(tmp_path)
    with np.load(small) as z:
        arrays = {k: z[k] for k in z.files}
    bad = tmp_path / "bad.npz"
    bad.write_bytes(deflate_damage(small))
    capsys.readouterr()
    assert main(["replay", str(bad)]) == 2
    assert str(bad) in capsys.readouterr().err
    np.savez_compressed(bad, **arrays, surprise=np.zeros(1))
    assert main(["replay", "--check", str(bad)]) == 2
    assert "surprise: unknown array" in capsys.readouterr().err
    np.savez_compressed(bad, **{**arrays, "exp_flags": arrays["exp_flags"][:-1]})
    assert main(["replay", "--check", str(bad)]) == 2
    assert "exp_flags" in capsys.readouterr().err


# -- QEMU reference scenarios -------------------------------------------------------------------------


def test_oracle_scenario_mutants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Scenarios are validated by their importer, which turns them into traces on load (issue 8, item 5);
    # the unvalidated vtd_emu.trace.oracle runner it replaces is not held to this contract.
    pytest.importorskip("vtd_emu.importers.qemu_scenario")
    lines = (TRACES / "qemu-7.2" / "legacy_faults.jsonl").read_text().splitlines()[:2]
    text = "\n".join(lines) + "\n"

    def commands(src: Path, tmp: Path) -> list[tuple[list[str], list[Path]]]:
        return [(["replay", "--check", str(src)], []), (["replay", "--json", str(src)], [])]

    seen = _run_mutants(jsonl_mutants(text, _rng("oracle"), 30), "s.jsonl", tmp_path, capsys, commands)
    assert seen[2] > 0


# -- QEMU logs ----------------------------------------------------------------------------------------


def test_qemu_log_mutants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("zstandard")
    d = TRACES / "qemu-import"
    text = (d / "edu-legacy.log").read_text()

    def commands(src: Path, tmp: Path) -> list[tuple[list[str], list[Path]]]:
        out = tmp / "imp.yaml"
        return [(["import-qemu", str(src), "--ram", str(d / "edu-legacy.ram.zst"), "-o", str(out)], [out]),
                (["import-qemu", str(src), "-o", str(tmp / "imp.npz"), "--json"], [tmp / "imp.npz"])]

    seen = _run_mutants(log_mutants(text, _rng("log"), 30), "q.log", tmp_path, capsys, commands)
    assert seen[0] > 0


def test_a_file_without_qemu_lines_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "notes.log"
    log.write_text("this is not a QEMU trace\nnor is this: 1234 0xdead\n")
    out = tmp_path / "o.yaml"
    assert run_contract(["import-qemu", str(log), "-o", str(out)], [out], capsys) == 2
    assert main(["import-qemu", str(log), "--ram-size", "-1", "-o", str(out)]) == 2
    assert not out.exists()


# -- RAM images: walk and dump ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["guest-ram.bin.zst", "host-ram.bin"])
def test_ram_image_mutants(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("zstandard")
    data = (TRACES / "images" / name).read_bytes()
    scalable = name.startswith("host")
    suffix = ".zst" if name.endswith(".zst") else ".bin"

    def commands(src: Path, tmp: Path) -> list[tuple[list[str], list[Path]]]:
        where = ["--rtaddr", "0x1000", "--scalable", "--sid", "0x18", "--pasid", "3"] if scalable else \
            ["--rtaddr", "0x1000", "--sid", "0x10", "--preset", "qemu-7.2-default"]
        out = tmp / "dump.txt"
        return [(["walk", "--ram", str(src), *where, "--iova", "0x7f0000001000" if scalable else "0xfffff000"], []),
                (["dump", "--ram", str(src), *where, "-o", str(out)], [out]),
                (["dump", "--ram", str(src), "--fs-root", "0x10000", "--format", "json", "-o", str(out)], [out])]

    mutants = list(byte_mutants(data, _rng(name), 40))
    seen = _run_mutants(iter(mutants), f"img{suffix}", tmp_path, capsys, commands)
    assert seen[2] > 0 and seen[0] + seen[1] > 0


def test_a_truncated_zstd_image_is_an_error_naming_the_file(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("zstandard")
    data = (TRACES / "images" / "guest-ram.bin.zst").read_bytes()
    for cut in (len(data) - 1, len(data) // 2, 6):
        img = tmp_path / "cut.zst"
        img.write_bytes(data[:cut])
        rc = run_contract(["walk", "--ram", str(img), "--fs-root", "0x10000", "--iova", "0x100040001234"], [], capsys)
        assert rc == 2
        assert main(["walk", "--ram", str(img), "--fs-root", "0x10000", "--iova", "0"]) == 2
        assert str(img) in capsys.readouterr().err


# -- command-line values ------------------------------------------------------------------------------


def test_argument_mutants(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = str(TRACES / "images" / "host-ram.bin")
    base = ["walk", "--ram", img, "--rtaddr", "0x1000", "--scalable", "--sid", "0x18", "--pasid", "3",
            "--iova", "0x7f0000001000"]
    rng = _rng("argv")
    values = ["0x10000", "0x100000", str(2**64), str(2**80), "-1", "0", "7", "x", "", "0x", "1e3", "--sid"]
    flags = ["--sid", "--pasid", "--iova", "--rtaddr", "--ram-size", "--ram-base", "--levels", "--access",
             "--preset", "--profile"]
    out = tmp_path / "d.txt"
    for i in range(80):
        argv = list(base)
        for _ in range(rng.randint(1, 2)):
            argv += [rng.choice(flags), rng.choice(values)]
        if rng.random() < 0.3:
            argv.append(rng.choice(["--priv", "--exe", "--leaves", "--scalable"]))
        if i % 2:
            argv = ["dump", *argv[1:]] + ["-o", str(out)]
            argv = [a for a in argv if a not in ("--priv", "--exe")]
        run_contract(argv, [out] if i % 2 else [], capsys)
    for argv in (["walk", "--ram", img, "--fs-root", "0", "--iova", "0", "--pasid", "0x100000"],
                 ["walk", "--ram", img, "--rtaddr", "0x1000", "--sid", "0x18", "--iova", "0", "--exe"],
                 ["walk", "--ram", img, "--rtaddr", "0x1000", "--sid", "0x18", "--iova", "0", "--priv"],
                 ["walk", "--ram", img, "--rtaddr", "0x1000", "--sid", "0x10000", "--iova", "0"],
                 ["walk", "--ram", img, "--fs-root", "0", "--iova", str(2**80)],
                 ["walk", "--ram", img, "--fs-root", "0", "--iova", "0", "--ram-size", "0"],
                 ["walk", "--ram", img, "--fs-root", "0", "--iova", "0", "--ram-size", str(2**65)],
                 ["dump", "--ram", img, "--ss-root", "0x2000", "--levels", "7", "-o", str(out)],
                 ["dump", "--ram", img, "--ss-root", "0x2000", "--levels", "0", "-o", str(out)],
                 ["dump", "--ram", img, "--fs-root", "0x2000", "--levels", "3", "-o", str(out)]):
        assert run_contract(argv, [out], capsys) == 2, argv


# -- the specs directory and --version (a fresh process each) ------------------------------------------


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vtd_emu", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_damaged_specs_are_one_line(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    good = REPO / "specs"
    damage: list[tuple[str, Callable[[bytes], bytes]]] = [
        ("registers.yaml", lambda b: b[: len(b) // 3]),                    # cut inside a mapping
        ("registers.yaml", lambda b: b.replace(b"registers:", b"registers: [", 1)),  # a syntax error
        ("structures.yaml", lambda b: b + b"\n# \xff\xfe not UTF-8\n"),
        ("faults.yaml", lambda b: b"faults: [\n" + b),
        ("profiles.yaml", lambda b: b"\xc3\x28" + b),
    ]
    commands = [["replay", str(TRACES / "legacy-dma.yaml")],
                ["walk", "--ram", str(TRACES / "images" / "host-ram.bin"), "--ss-root", "0x2000", "--iova", "0"],
                ["dump", "--ram", str(TRACES / "images" / "host-ram.bin"), "--ss-root", "0x2000", "--preset", "modern"]]
    for i, (file, hurt) in enumerate(damage):
        d = tmp_path / f"specs{i}"
        shutil.copytree(good, d)
        (d / file).write_bytes(hurt((good / file).read_bytes()))
        env["VTD_EMU_SPECS"] = str(d)
        for args in commands[i % 2: i % 2 + 2]:
            r = _cli(args, env)
            assert "Traceback" not in r.stderr, (file, args, r.stderr)
            # replay loads every spec file; walk and dump need the layouts, not every table
            if args[0] == "replay" or file in ("registers.yaml", "structures.yaml"):
                assert r.returncode == 2, (file, args, r.stdout, r.stderr)
            if r.returncode == 2:
                assert len(r.stderr.strip().splitlines()) == 1 and file in r.stderr, (file, r.stderr)
            else:
                assert r.returncode in (0, 1), (file, args, r.stderr)
        v = _cli(["--version"], env)
        assert v.returncode == 0 and v.stdout.startswith("vtd-emu "), v.stderr


def test_version_and_usage() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    from vtd_emu import __version__

    v = _cli(["--version"], env)
    assert v.returncode == 0 and v.stdout.strip() == f"vtd-emu {__version__}"
    u = _cli([], env)
    assert u.returncode == 2 and u.stderr.startswith("usage: vtd-emu") and "Traceback" not in u.stderr
    # importing the command line loads no spec (the library is imported inside main's error handling)
    r = subprocess.run([sys.executable, "-c", "import sys, vtd_emu.cli, vtd_emu; "
                        "print(sorted(m for m in sys.modules if m.startswith('vtd_emu.')))"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    loaded = eval(r.stdout)  # noqa: S307 - our own printed list
    assert not any(m.startswith(("vtd_emu.spec", "vtd_emu.vtd", "vtd_emu.trace")) for m in loaded), loaded
