import json
import os
from dataclasses import asdict

import pytest

from benchmarks import utils
from benchmarks.config import load_suite
from benchmarks.harness import Harness, Stage
from benchmarks.stages import STAGES


def _hashes(cfg, tmp_path):
    h = Harness(cfg, STAGES, root=tmp_path, log=lambda *_: None)
    return {n: h.stage_hash(n) for n in STAGES}


def test_changing_a_field_invalidates_only_downstream(tmp_path):
    base = _hashes(load_suite("smoke"), tmp_path)
    sft = _hashes(load_suite("smoke", ["sft.steps=61"]), tmp_path)
    assert [n for n in STAGES if sft[n] != base[n]] == ["sft", "prefs"]
    prm = _hashes(load_suite("smoke", ["task.n_eval_prompts=100"]), tmp_path)
    assert [n for n in STAGES if prm[n] != base[n]] == ["prompts", "prefs"]
    pr = _hashes(load_suite("smoke", ["prefs.min_gap=0.1"]), tmp_path)
    assert [n for n in STAGES if pr[n] != base[n]] == ["prefs"]
    corp = _hashes(load_suite("smoke", ["task.corpus.max_chars=300"]), tmp_path)
    assert all(corp[n] != base[n] for n in STAGES)  # the data feeds everything
    seed = _hashes(load_suite("smoke", ["seed=1"]), tmp_path)
    assert seed["data"] == base["data"] and seed["base"] != base["base"]
    assert _hashes(load_suite("smoke"), tmp_path) == base  # stable across processes / dict order


def _toy_stages(calls, fail_in=None):
    def make(name):
        def run(h, out):
            calls.append(name)
            (out / "a.txt").write_text(name)
            if name == fail_in:
                raise RuntimeError("boom")
            return {"n": len(calls)}
        return run
    return {
        "a": Stage("a", (), lambda c: {"seed": c.seed}, make("a")),
        "b": Stage("b", ("a",), lambda c: {"steps": c.sft.steps}, make("b")),
    }


def test_finished_stages_are_reused_and_failed_ones_leave_nothing(tmp_path):
    cfg = load_suite("smoke")
    calls = []
    with pytest.raises(RuntimeError):
        Harness(cfg, _toy_stages(calls, fail_in="b"), root=tmp_path, log=lambda *_: None).run(["b"])
    assert calls == ["a", "b"]
    b_dir = tmp_path / cfg.cache_dir / "b"
    assert all(p.name.startswith(".") for p in b_dir.iterdir())  # at most hidden temp leftovers, never a stage
    assert not any((p / "stage.json").exists() for p in b_dir.iterdir())
    calls.clear()
    res = Harness(cfg, _toy_stages(calls), root=tmp_path, log=lambda *_: None).run(["b"])
    assert calls == ["b"] and res["a"].cached and not res["b"].cached  # a was kept, b re-run
    calls.clear()
    res = Harness(cfg, _toy_stages(calls), root=tmp_path, log=lambda *_: None).run(["b"])
    assert calls == [] and res["b"].cached
    meta = json.loads((res["b"].path / "stage.json").read_text())
    assert meta["key"]["inputs"] == {"a": res["a"].hash}
    run_dir = tmp_path / cfg.runs_dir / cfg.name
    assert (run_dir / "resolved_config.yaml").exists() and (run_dir / "stages.json").exists()


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "x.json"
    utils.atomic_write_json(p, {"v": 1})

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        utils.atomic_write_json(p, {"v": 2})
    assert json.loads(p.read_text()) == {"v": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_atomic_write_gives_the_permissions_of_a_plain_write(tmp_path):
    old = os.umask(0o022)
    try:
        utils.atomic_write_text(tmp_path / "report.html", "x")
        (tmp_path / "plain.html").write_text("x")
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "report.html") == mode(tmp_path / "plain.html") == 0o644  # readable by a teammate


def test_atomic_dir_is_all_or_nothing(tmp_path):
    final = tmp_path / "stage"
    with pytest.raises(KeyError), utils.atomic_dir(final) as d:
        (d / "half.bin").write_text("x")
        raise KeyError("killed")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    with utils.atomic_dir(final) as d:
        (d / "full.bin").write_text("x")
    assert (final / "full.bin").read_text() == "x"


def test_stable_hash_ignores_key_order():
    assert utils.stable_hash({"a": 1, "b": [1, 2]}) == utils.stable_hash({"b": [1, 2], "a": 1})
    assert utils.stable_hash({"a": 1}) != utils.stable_hash({"a": 2})


def test_resolved_config_round_trips():
    from benchmarks.config import config_from_dict

    cfg = load_suite("default")
    assert config_from_dict(asdict(cfg)) == cfg
