"""The phase-vs-floor benchmark (``benchmarks/perf/phases.py``) runs end to end on a tiny workload and writes
well-formed, self-consistent numbers; and the speed fixes it led to are numerically equivalent.

Never asserts on speed: it checks the JSON's schema, that every ratio is ours / floor, that the status follows the
goal, and that the generation floor really is Hugging Face's ``model.generate``.
"""

import json
import math
import os
import random

import pytest
import torch

from benchmarks.perf import phases

TINY = ["--tiny", "--repeats", "1"]


class GenerateSpy:
    """Wraps ``GenerationMixin.generate`` (what ``model.generate`` resolves to) and records its keyword arguments."""

    def __init__(self, monkeypatch):
        from transformers.generation.utils import GenerationMixin

        self.calls: list[dict] = []
        real = GenerationMixin.generate

        def spy(model, *a, **kw):
            self.calls.append(kw)
            return real(model, *a, **kw)

        monkeypatch.setattr(GenerationMixin, "generate", spy)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("perf") / "phases.json"
    threads = torch.get_num_threads()
    try:
        assert phases.main([*TINY, "--in-process", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny_cfg():
    return phases.build_config(phases.parse_args(TINY))


def test_json_schema(result):
    assert sorted(result["phases"]) == sorted(phases.PHASES)
    for k in ("kind", "cpu_model", "cpu_flags", "torch_cpu_capability", "probe_gflops", "threads"):
        assert k in result["machine"], k
    assert result["machine"]["kind"].startswith(("cpu-", "cuda-"))
    for k in ("torch", "transformers", "threads", "load_average", "created"):
        assert k in result["provenance"], k
    cfg = result["config"]
    assert cfg["repeats"] == 1 and cfg["in_process"] and cfg["phases"] == list(phases.PHASES)
    n_iter = cfg["warmup"] + cfg["iters"]
    for name, p in result["phases"].items():
        assert {"ours", "floor", "ratio", "speed_vs_floor", "goal", "status", "tokens_meaning"} <= set(p), name
        for side in ("ours", "floor"):
            s = p[side]
            assert s["impl"], (name, side)
            assert 0 < s["s"]["min"] <= s["s"]["median"] <= s["s"]["max"] < math.inf, (name, side)
            assert s["s_median"] == s["s"]["median"] and len(s["s"]["values"]) == cfg["repeats"], (name, side)
            assert [len(x) for x in s["iterations_s"]] == [n_iter] * cfg["repeats"], (name, side)
            assert s["tokens"] > 0 and s["tokens_per_s"] == pytest.approx(s["tokens"] / s["s_median"], rel=1e-12)
    assert isinstance(result["all_pass"], bool)


def test_ratio_is_ours_over_floor(result):
    for name, p in result["phases"].items():
        assert p["ratio"] == pytest.approx(p["ours"]["s_median"] / p["floor"]["s_median"], rel=1e-12), name
        assert p["speed_vs_floor"] == pytest.approx(1.0 / p["ratio"], rel=1e-12), name


def test_status_follows_goal(result):
    for name, p in result["phases"].items():
        want = 1.0 / phases.GENERATION_SPEED_GOAL if name in phases.GENERATION_PHASES else phases.RATIO_GOAL
        assert p["goal"]["max_ratio"] == pytest.approx(want), name
        assert p["status"] == ("pass" if p["ratio"] <= p["goal"]["max_ratio"] else "fail"), name
    assert result["all_pass"] == all(p["status"] == "pass" for p in result["phases"].values())
    train, gen = phases.goal_of("ppo_update"), phases.goal_of("eval")
    assert [phases.status_of(r, train) for r in (0.5, 1.19, 1.21, None)] == ["pass", "pass", "fail", "n/a"]
    assert [phases.status_of(r, gen) for r in (1.0, 1.11, 1.12)] == ["pass", "pass", "fail"]  # >= 0.9x speed


@pytest.mark.parametrize("phase", phases.GENERATION_PHASES)
def test_generation_floor_is_model_generate(phase, tiny_cfg, monkeypatch):
    spy = GenerateSpy(monkeypatch)
    threads = torch.get_num_threads()
    try:
        floor = phases.run_job(f"{phase}:floor", tiny_cfg)[phase]
        assert spy.calls, "the floor never called model.generate"
        n_floor = len(spy.calls)
        ours = phases.run_job(phases.OURS_JOB[phase], tiny_cfg)[phase]
    finally:
        torch.set_num_threads(threads)
    assert len(spy.calls) == n_floor, "ours must not go through model.generate"
    new = tiny_cfg["ppo"]["max_new_tokens"] if phase == "ppo_generation" else tiny_cfg["eval"]["max_new_tokens"]
    for kw in spy.calls:
        assert kw["do_sample"] is True and kw["use_cache"] is True and kw["max_new_tokens"] == new
        assert kw["top_k"] == 0 and kw["top_p"] == 1.0  # pure ancestral sampling, as ours
    assert len(floor["iter_s"]) == len(ours["iter_s"]) == tiny_cfg["warmup"] + tiny_cfg["iters"]
    # same prompts, same cap: the generated token counts can differ only through where EOS was drawn
    assert all(0 < n <= new * (tiny_cfg["ppo"]["rollout_batch_size"] if phase == "ppo_generation"
                               else tiny_cfg["eval"]["n_prompts"]) for n in floor["iter_tokens"] + ours["iter_tokens"])


def test_fresh_process_per_job_and_table(tmp_path, capsys):
    """The default path: every job in its own worker process (the driver runs here); the table is printed."""
    out = tmp_path / "phases.json"
    threads = torch.get_num_threads()
    try:
        assert phases.main([*TINY, "--phases", "rm", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "ours s" in printed and "floor s" in printed and "status" in printed
    res = json.loads(out.read_text())
    assert list(res["phases"]) == ["rm"] and not res["config"]["in_process"]
    pids = {r["pid"] for rs in res["runs"].values() for r in rs}
    assert len(pids) == 2 and os.getpid() not in pids  # ours and floor each in a fresh process


def test_bad_phase_refused():
    with pytest.raises(SystemExit):
        phases.parse_args(["--phases", "dpo,nope"])


# ------------------------------------------------------------------------------------------------ equivalence
# The speed fixes found with this benchmark change no number beyond float reassociation.
def _reference_mask(examples, rows, T):
    """The packed layout's attention mask as it was built before (per-pair tril / slice writes)."""
    allow = torch.zeros((len(rows), T, T), dtype=torch.bool)
    for r, members in enumerate(rows):
        o = 0
        for i in members:
            e = examples[i]
            p, c, q = len(e.prompt), len(e.chosen), len(e.rejected)
            P, C, Q = slice(o, o + p), slice(o + p, o + p + c), slice(o + p + c, o + p + c + q)
            allow[r, P, P] = torch.ones(p, p, dtype=torch.bool).tril()
            allow[r, C, P] = True
            allow[r, C, C] = torch.ones(c, c, dtype=torch.bool).tril()
            allow[r, Q, P] = True
            allow[r, Q, Q] = torch.ones(q, q, dtype=torch.bool).tril()
            o += p + c + q
        idx = torch.arange(o, T)
        allow[r, idx, idx] = True
    return allow


def test_packed_mask_and_rows_unchanged():
    from methods.data import PairExample
    from methods.dpo.batching import pack_rows, packed_batch

    rng = random.Random(0)
    for _ in range(30):
        ex = [PairExample([1] + [rng.randint(3, 50) for _ in range(rng.randint(1, 5))],
                          [rng.randint(3, 50) for _ in range(rng.randint(1, 6))],
                          [rng.randint(3, 50) for _ in range(rng.randint(1, 6))]) for _ in range(rng.randint(1, 12))]
        sizes = [e.n_tokens_packed for e in ex]
        pack_len = max(sizes) + rng.randint(0, 12)
        rows = pack_rows(sizes, pack_len)
        assert [i for r in rows for i in r] == list(range(len(ex)))  # every pair once, in order
        assert all(sum(sizes[i] for i in r) <= pack_len for r in rows)  # pack_len holds (in tokens)
        greedy, used = 1, 0  # fill rows up to pack_len: the fewest rows in order
        for n in sizes:
            greedy, used = (greedy + 1, n) if used + n > pack_len else (greedy, used + n)
        assert len(rows) == greedy
        b = packed_batch(ex, 0, pack_len)
        T = b["input_ids"].shape[1]
        assert torch.equal(b["attention_mask"][:, 0], _reference_mask(ex, rows, T))
    with pytest.raises(ValueError, match="pack_len"):
        pack_rows([3, 9], 8)


def test_ppo_token_logps_bitwise_equal_to_shared_path():
    from methods.logprobs import IGNORE_INDEX, token_logps, token_logps_nocopy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 9, 33, generator=g)
    labels = torch.randint(0, 33, (5, 9), generator=g)
    labels[:, :3] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX
    grads = []
    for fn in (token_logps, token_logps_nocopy):
        x = logits.clone().requires_grad_()
        lp, mask = fn(x, labels)
        (lp * torch.arange(1.0, 9.0)).sum().backward()
        grads.append((lp.detach(), mask, x.grad))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_grid_over_dtypes_and_thread_counts(tmp_path, capsys):
    """``make perf``'s grid: the whole benchmark at each (dtype, threads); each cell's ratio is its own ours / floor
    and the jobs really ran at that dtype and thread count."""
    out = tmp_path / "grid.json"
    threads = torch.get_num_threads()
    try:
        assert phases.main([*TINY, "--in-process", "--phases", "dpo,eval", "--dtypes", "float32,bfloat16",
                            "--thread-counts", "1,2", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    assert [(g["dtype"], g["threads"]) for g in res["grid"]] == [("float32", 1), ("float32", 2), ("bfloat16", 1),
                                                                 ("bfloat16", 2)]
    for g in res["grid"]:
        for p in g["phases"].values():
            assert p["ratio"] == pytest.approx(p["ours"]["s_median"] / p["floor"]["s_median"])
    assert res["phases"] == res["grid"][0]["phases"]  # the top level is the first cell, as a single run writes it
    text = capsys.readouterr().out
    assert "bflo/2t ours s (ratio, tok/s)" in text and "bfloat16/2t vs float32/1t" in text
    with pytest.raises(SystemExit):
        phases.parse_args([*TINY, "--dtypes", "float16"])
