"""A verified cache: every finished stage carries a manifest (sizes, SHA-256) in its stage.json; a damaged stage is
moved aside (never deleted) and runs again, and its downstream stages run again only if the rebuilt content differs."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks import utils
from benchmarks.config import load_suite
from benchmarks.harness import Harness, Stage

ROOT = Path(__file__).resolve().parents[1]


def _stages(calls, content):
    def make(name, big=False):
        def run(h, out):
            calls.append(name)
            (out / "w.bin").write_bytes(content[name] * (2 << 20 if big else 1))  # a large file: size-checked on load
            (out / "small.txt").write_text(f"{name}:{content[name]!r}")
            (out / "curve.jsonl").write_text(json.dumps({"wall_s": len(calls)}) + "\n")  # a log: timings differ
            return {}
        return run
    return {"a": Stage("a", (), lambda c: {"seed": c.seed}, make("a", big=True)),
            "b": Stage("b", ("a",), lambda c: {}, make("b"))}


def _run(tmp_path, calls, content, logs=None):
    h = Harness(load_suite("smoke"), _stages(calls, content), root=tmp_path, log=(logs.append if logs is not None else lambda *_: None))
    return h.run(["b"])


def test_stage_json_carries_a_manifest_of_every_file(tmp_path):
    res = _run(tmp_path, [], {"a": b"A", "b": b"B"})
    meta = json.loads((res["a"].path / "stage.json").read_text())
    assert set(meta["manifest"]) == {"w.bin", "small.txt", "curve.jsonl"}
    assert meta["manifest"]["w.bin"]["size"] == 2 << 20
    assert meta["manifest"]["small.txt"]["sha256"] == utils.sha256_file(res["a"].path / "small.txt")


def test_a_damaged_stage_is_moved_aside_and_rebuilt_and_downstream_kept_when_the_rebuild_is_identical(tmp_path):
    content = {"a": b"A", "b": b"B"}
    res = _run(tmp_path, [], content)
    a_dir = res["a"].path
    (a_dir / "small.txt").write_text("a:b'X'")  # same size, other bytes: caught by the hash of a small file
    calls, logs = [], []
    res2 = _run(tmp_path, calls, content, logs)
    assert calls == ["a"]  # a rebuilt to the same content: b (built from identical bytes) is reused
    assert res2["b"].cached and (a_dir / "small.txt").read_text() == "a:b'A'"
    aside = [p for p in a_dir.parent.iterdir() if p.name.startswith(f".{a_dir.name}.damaged-")]
    assert len(aside) == 1 and (aside[0] / "small.txt").read_text() == "a:b'X'"  # kept, not deleted
    assert any("DAMAGED" in line and "small.txt: content differs" in line for line in logs)


def test_a_truncated_large_file_is_caught_by_size_and_a_different_rebuild_reruns_downstream(tmp_path):
    res = _run(tmp_path, [], {"a": b"A", "b": b"B"})
    w = res["a"].path / "w.bin"
    w.write_bytes(w.read_bytes()[:1000])  # a half-copied weights file
    calls, logs = [], []
    _run(tmp_path, calls, {"a": b"Z", "b": b"B"}, logs)  # the rebuild is not bit-identical this time
    assert calls == ["a", "b"], logs  # b was built from the old a: superseded and run again
    assert any("w.bin: 1000 bytes, expected" in line for line in logs)
    assert any("[b] built from the damaged copy of a" in line for line in logs)


def test_verify_command_hashes_every_file(tmp_path):
    res = _run(tmp_path, [], {"a": b"A", "b": b"B"})
    cache = res["a"].path.parents[1]
    cmd = [sys.executable, "-m", "benchmarks", "verify", "--cache", str(cache)]
    ok = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "2 stage(s) intact, 0 damaged" in ok.stdout
    w = res["a"].path / "w.bin"
    w.write_bytes(b"Q" * w.stat().st_size)  # same size, other content: only a full hash sees it
    assert Harness(load_suite("smoke"), _stages([], {"a": b"A", "b": b"B"}), root=tmp_path,
                   log=lambda *_: None).run(["b"])["a"].cached  # a load checks large files by size only
    bad = subprocess.run(cmd + ["--move-aside"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "DAMAGED a/" in bad.stdout and "w.bin: content differs" in bad.stdout
    assert not res["a"].path.exists() and any(p.name.startswith(f".{res['a'].path.name}.damaged-")
                                              for p in res["a"].path.parent.iterdir())


def test_a_full_disk_names_the_stage_leaves_no_partial_folder_and_the_rerun_completes(tmp_path):
    import errno

    import pytest

    from benchmarks.errors import DiskFullError

    full = {"on": True}

    def stages(calls):
        st = _stages(calls, {"a": b"A", "b": b"B"})

        def b_run(h, out):
            calls.append("b")
            (out / "part.bin").write_bytes(b"x" * 3_000_000)
            if full["on"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            (out / "done.txt").write_text("ok")
            return {}
        # a third stage after b: a full disk must stop the suite, not let it try every later arm
        return {**st, "b": Stage("b", ("a",), lambda c: {}, b_run), "c": Stage("arm/c", ("b",), lambda c: {}, lambda h, o: {})}

    calls = []
    h = Harness(load_suite("smoke"), stages(calls), root=tmp_path, log=lambda *_: None)
    with pytest.raises(DiskFullError) as e:
        h.run(["a", "b", "c"])
    msg = str(e.value)
    assert "stage b" in msg and str(tmp_path) in msg and "2.9 MiB" in msg and "run the same command" in msg
    b_root = next(iter(h.results.values())).path.parents[1] / "b"
    assert [p.name for p in b_root.iterdir() if not p.name.endswith(".lock")] == []  # no partial folder, no temp
    assert h.results["a"].path.exists() and (h.results["a"].path / "stage.json").exists()  # earlier stage intact
    full["on"] = False
    calls = []
    res = Harness(load_suite("smoke"), stages(calls), root=tmp_path, log=lambda *_: None).run(["a", "b"])
    assert calls == ["b"] and (res["b"].path / "done.txt").read_text() == "ok"


def test_compare_names_the_first_stage_where_two_runs_diverge(tmp_path):
    from benchmarks.harness import compare_runs

    idx = []
    for root, b in ((tmp_path / "x", b"B"), (tmp_path / "y", b"C")):
        _run(root, [], {"a": b"A", "b": b}, None)
        run_dir = root / load_suite("smoke").runs_dir / "smoke"
        idx.append(json.loads((run_dir / "stages.json").read_text()))
    first, rows = compare_runs(*idx)
    assert first == "b" and rows == [("a", "same"), ("b", "differs")]
    assert idx[0]["stages"]["a"]["digest"] == idx[1]["stages"]["a"]["digest"]  # the curve log's timings are left out
    r = subprocess.run([sys.executable, "-m", "benchmarks", "compare", str(tmp_path / "x" / "results/runs/smoke"),
                        str(tmp_path / "y" / "results/runs/smoke")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "first diverge at b" in r.stdout, r.stdout + r.stderr


def test_a_signal_inside_a_training_loop_is_deferred_to_its_end_and_outside_it_stops_at_once():
    import os
    import signal

    import pytest

    from benchmarks import interrupts as interrupts_

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        interrupts_._state.update(signal=None, graceful=0)
        interrupts_.install()
        with pytest.raises(interrupts_.Interrupted, match="end of a training loop"):
            with interrupts_.graceful():
                os.kill(os.getpid(), signal.SIGTERM)
                assert interrupts_.requested()  # deferred: the loop runs on to its next safe point
        interrupts_._state.update(signal=None, graceful=0)
        with pytest.raises(interrupts_.Interrupted) as e:
            os.kill(os.getpid(), signal.SIGTERM)  # outside a training loop: at once
        assert e.value.signum == signal.SIGTERM
    finally:
        interrupts_._state.update(signal=None, graceful=0)
        for s, h in saved.items():
            signal.signal(s, h)
