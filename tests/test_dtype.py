"""``dtype: auto``: resolution (CPU probe, CUDA bf16 support), cache keys of the resolved dtype (auto resolved to float32
hashes exactly as an explicit float32), provenance of the choice, the smoke suite pinned to fp32, clear errors."""

import json

import pytest
import yaml

from benchmarks import machine, utils
from benchmarks.arms import build_stages
from benchmarks.config import CONFIG_DIR, ConfigError, SuiteConfig, available_suites, load_suite
from benchmarks.harness import Harness, Stage, provenance
from benchmarks.machine import BF16_MIN_SPEEDUP, resolve_dtype

SLOW_BF16 = {"float32": 71.6, "bfloat16": 2.5, "n": 256, "threads": 1}  # the AVX2 CPU kind (no native bf16)
FAST_BF16 = {"float32": 70.0, "bfloat16": 210.0, "n": 256, "threads": 1}
FAST_STEP = {"float32_s": 0.30, "bfloat16_s": 0.15, "batch": [32, 40], "threads": 1}
# the bf16 CPU kind on the default model (quiet, 2 threads): a 64 x 40 step 330 ms fp32, 298 ms bf16
DEFAULT_MODEL_STEP = {"float32_s": 0.330, "bfloat16_s": 0.298, "batch": [64, 40], "threads": 2}


@pytest.fixture
def probe(monkeypatch):
    """Injects the CPU probe's numbers (the real one measures this machine) and counts its calls."""
    state = {"numbers": SLOW_BF16, "calls": 0, "step": FAST_STEP}

    def fake():
        state["calls"] += 1
        return dict(state["numbers"])

    monkeypatch.setattr(machine, "dtype_probe", fake)
    monkeypatch.setattr(machine, "step_probe", lambda shape, **kw: dict(state["step"], threads=kw.get("threads", 1)))
    return state


SHAPE = {"n_layers": 2, "hidden_size": 32, "n_heads": 2, "intermediate_size": 64, "vocab_size": 128,
         "max_position_embeddings": 64}


def test_a_fast_bf16_matmul_must_also_speed_up_the_suites_own_step():
    """The bf16 kind's matmul probe says 3x, its default-model step 1.1x: auto keeps float32 there."""
    c = resolve_dtype("auto", "cpu", probe=FAST_BF16, model_shape=SHAPE, step=DEFAULT_MODEL_STEP)
    assert c.resolved == "float32" and "only 1.11x" in c.reason and "298 ms bf16 vs 330 ms fp32" in c.reason
    assert c.probe["step_bf16_speedup"] == 1.11 and c.probe["bf16_speedup"] == 3.0
    c = resolve_dtype("auto", "cpu", probe=FAST_BF16, model_shape=SHAPE, step=FAST_STEP)
    assert c.resolved == "bfloat16" and "2.00x faster" in c.reason
    # a slow bf16 matmul never runs the (then very slow) step probe: float32 straight away
    c = resolve_dtype("auto", "cpu", probe=SLOW_BF16, model_shape=SHAPE, step={"float32_s": 1.0, "bfloat16_s": 0.1})
    assert c.resolved == "float32" and "step" not in c.probe


def test_step_probe_times_both_dtypes_on_the_given_shape():
    st = machine.step_probe(SHAPE, batch=2, seq_len=8, trials=1)
    assert st["float32_s"] > 0 and st["bfloat16_s"] > 0 and st["batch"] == [2, 8] and st["threads"] == 1


def _plan_hashes(suite: str, overrides: list[str], tmp_path, log=lambda *_: None) -> dict[str, str]:
    """Every stage's hash of a suite's plan (as tests/test_arms_registry.py computes them; nothing runs)."""
    cfg = load_suite(suite, overrides)
    stages, _ = build_stages(cfg)
    h = Harness(cfg, stages, root=tmp_path, log=log)
    return {n: h.stage_hash(n) for n in stages}


# ------------------------------------------------------------------------------------------------ pure resolution
def test_cpu_auto_picks_bf16_only_when_the_probe_finds_it_faster():
    slow = resolve_dtype("auto", "cpu", probe=SLOW_BF16)
    assert (slow.requested, slow.resolved) == ("auto", "float32")
    assert "bf16 not faster" in slow.reason and "2.5" in slow.reason and "71.6" in slow.reason
    assert slow.line() == "dtype auto -> float32: bf16 autocast matmul 2.5 GFLOP/s vs fp32 71.6 on this CPU (bf16 not faster)"
    assert slow.probe["float32"] == 71.6 and slow.probe["bfloat16"] == 2.5 and slow.probe["bf16_speedup"] == 0.03

    fast = resolve_dtype("auto", "cpu", probe=FAST_BF16)
    assert fast.resolved == "bfloat16" and "3.0x faster" in fast.reason

    barely = resolve_dtype("auto", "cpu", probe={"float32": 100.0, "bfloat16": 110.0})  # faster, not measurably
    assert barely.resolved == "float32" and f"below the {BF16_MIN_SPEEDUP}x needed" in barely.reason
    at = resolve_dtype("auto", "cpu", probe={"float32": 100.0, "bfloat16": 100.0 * BF16_MIN_SPEEDUP})
    assert at.resolved == "bfloat16"


def test_cuda_auto_follows_bf16_support_and_never_probes(probe):
    yes = resolve_dtype("auto", "cuda", cuda_bf16=True)
    assert yes.resolved == "bfloat16" and "supports bf16" in yes.reason and yes.probe is None
    no = resolve_dtype("auto", "cuda", cuda_bf16=False)
    assert no.resolved == "float32" and "no bf16" in no.reason
    assert resolve_dtype("auto", "mps").resolved == "float32"
    assert probe["calls"] == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_explicit_dtype_is_kept_without_probing(dtype, probe):
    for device in ("cpu", "cuda"):
        c = resolve_dtype(dtype, device, cuda_bf16=False)
        assert (c.requested, c.resolved, c.probe) == (dtype, dtype, None)
    assert probe["calls"] == 0


def test_float16_on_cpu_fails_naming_the_field_and_the_fix(tmp_path, probe):
    with pytest.raises(ConfigError) as e:
        resolve_dtype("float16", "cpu")
    msg = str(e.value)
    assert "config key 'dtype'" in msg and "cpu" in msg and "set dtype: auto" in msg
    assert resolve_dtype("float16", "cuda").resolved == "float16"
    # device: cpu in the suite: refused when the config loads
    with pytest.raises(ConfigError, match="config key 'dtype'.*set dtype: auto"):
        load_suite("smoke", ["dtype=float16", "device=cpu"])
    # device: auto that turns out to be a CPU: refused when the harness resolves it (before any stage)
    cfg = load_suite("smoke", ["dtype=float16"])
    cfg.device = "cpu"  # what device: auto resolves to on a machine without CUDA/mps
    with pytest.raises(ConfigError, match="config key 'dtype'.*set dtype: auto"):
        Harness(cfg, {}, root=tmp_path, log=lambda *_: None)


def test_dtype_field_accepts_the_four_values_and_names_itself_otherwise():
    assert SuiteConfig.__dataclass_fields__["dtype"].default == "auto"
    for d in machine.DTYPES:
        assert load_suite("smoke", [f"dtype={d}", "device=cuda"] if d == "float16" else [f"dtype={d}"]).dtype == d
    with pytest.raises(ConfigError, match=r"config key 'dtype': must be one of \['auto', 'float32', 'bfloat16', 'float16'\]"):
        load_suite("smoke", ["dtype=fp8"])
    with pytest.raises(RuntimeError, match="resolved first"):
        utils.autocast_ctx("cpu", "auto")


# ------------------------------------------------------------------------------------------------ harness, cache keys
def test_auto_resolved_to_float32_keeps_every_stage_hash_of_explicit_float32(tmp_path, probe):
    lines = []
    auto = _plan_hashes("default", ["device=cpu"], tmp_path, log=lines.append)
    assert lines == [resolve_dtype("auto", "cpu", probe=SLOW_BF16).line()]  # one line: what was picked and why
    explicit = _plan_hashes("default", ["device=cpu", "dtype=float32"], tmp_path)
    assert auto == explicit and len(auto) > 20


def test_auto_resolved_to_bf16_keys_like_explicit_bf16(tmp_path, probe):
    probe["numbers"] = FAST_BF16
    auto = _plan_hashes("smoke", ["device=cpu", "dtype=auto"], tmp_path)
    assert auto == _plan_hashes("smoke", ["device=cpu", "dtype=bfloat16"], tmp_path)
    fp32 = _plan_hashes("smoke", ["device=cpu"], tmp_path)
    assert auto["data"] == fp32["data"] and auto["base"] != fp32["base"]  # the dtype is in the training stages' keys


def test_every_shipped_suite_but_smoke_asks_for_auto():
    for name in available_suites():
        raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text()) or {}
        assert load_suite(name).dtype == ("float32" if name == "smoke" else raw.get("dtype", "auto")), name


def test_smoke_is_pinned_to_float32_for_the_gate():
    assert load_suite("smoke").dtype == "float32"
    line = next(ln for ln in (CONFIG_DIR / "smoke.yaml").read_text().splitlines() if ln.startswith("dtype:"))
    assert line.split("#")[0].strip() == "dtype: float32" and "baseline" in line + (CONFIG_DIR / "smoke.yaml").read_text()


def test_the_config_holds_the_resolved_dtype_and_provenance_the_request(tmp_path, probe):
    cfg = load_suite("smoke", ["dtype=auto", "device=cpu"])
    stages = {"a": Stage("a", (), lambda c: {"dtype": c.dtype}, lambda h, out: {"ok": 1})}
    lines = []
    h = Harness(cfg, stages, root=tmp_path, log=lines.append)
    assert cfg.dtype == "float32" and h.dtype_choice.requested == "auto" and probe["calls"] == 1
    h.run(["a"])
    run_dir = tmp_path / cfg.runs_dir / cfg.name
    text = (run_dir / "resolved_config.yaml").read_text()
    assert yaml.safe_load(text)["dtype"] == "float32" and text.startswith("# dtype auto -> float32: ")
    prov = json.loads((run_dir / "stages.json").read_text())["provenance"]
    assert prov["dtype"] == prov["dtype_resolved"] == "float32" and prov["dtype_requested"] == "auto"
    assert prov["dtype_probe_gflops"]["float32"] == 71.6 and prov["dtype_probe_gflops"]["bfloat16"] == 2.5
    assert "bf16 not faster" in prov["dtype_reason"]
    stage_meta = json.loads((h.results["a"].path / "stage.json").read_text())
    assert stage_meta["dtype"] == "float32" and stage_meta["key"]["config"] == {"dtype": "float32"}
    # provenance(device, dtype) alone (how results.py calls it) finds this process's choice
    assert provenance("cpu", "float32")["dtype_requested"] == "auto"
    # a second harness on the same config object: no second probe, no second line, the request still known
    h2 = Harness(cfg, stages, root=tmp_path, log=lines.append)
    assert h2.dtype_choice.requested == "auto" and probe["calls"] == 1
    assert sum(ln.startswith("dtype ") for ln in lines) == 1


def test_an_explicit_dtype_logs_nothing_and_records_itself(tmp_path, probe):
    lines = []
    h = Harness(load_suite("smoke", ["device=cpu"]), {}, root=tmp_path, log=lines.append)
    assert lines == [] and probe["calls"] == 0
    rec = h.dtype_choice.record()
    assert rec == {"dtype_requested": "float32", "dtype_resolved": "float32", "dtype_reason": "set in the suite",
                   "dtype_probe_gflops": None}


def test_the_real_probe_is_sub_second_and_sane():
    import time

    machine.dtype_probe.cache_clear()
    t = time.perf_counter()
    p = machine.dtype_probe()
    assert time.perf_counter() - t < 3.0  # about 0.5 s; slack for a loaded CI machine
    assert p["float32"] > 0 and p["bfloat16"] > 0 and p["n"] == 256
    assert resolve_dtype("auto", "cpu", probe=p).resolved in ("float32", "bfloat16")
