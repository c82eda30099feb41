"""Multi-process runs equal single-process runs: ``accelerate launch`` with 2 CPU processes (gloo) of short DPO, PPO,
RLOO, GRPO and online-DPO runs on a tiny Llama (``benchmarks.dist_check``), compared with the same runs in one process;
the harness's rank-0-commits scheme; the shipped accelerate configs parse (FSDP / ZeRO are not run here)."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACC = ROOT / "benchmarks" / "configs" / "accelerate"


def _free_port() -> int:
    with socket.socket() as s:  # other test runs on this machine may hold torchrun's default 29500
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], timeout: float = 120) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import torch

    tmp = tmp_path_factory.mktemp("dist")
    t0 = time.time()
    _run([sys.executable, "-m", "benchmarks.dist_check", "--out", str(tmp / "single")])
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    _run([accelerate, "launch", "--config_file", str(ACC / "cpu2.yaml"), "--main_process_port", str(_free_port()),
          "-m", "benchmarks.dist_check", "--out", str(tmp / "cpu2")])
    print(f"single + 2-process runs: {time.time() - t0:.1f}s")
    load = lambda name: torch.load(tmp / name / "result.pt", weights_only=False)  # noqa: E731
    return load("single"), load("cpu2")


def test_two_processes_train_like_one(results):
    from benchmarks.dist_check import compare

    single, multi = results
    assert single["world_size"] == 1 and multi["world_size"] == 2
    assert len(multi["dpo"]["history"]) == 4
    assert all(len(multi[part]["history"]) == 3 for part in ("ppo", "rloo", "grpo", "odpo"))
    errors, worst = compare(multi, single)
    print("max differences 2 processes vs 1:", worst)
    assert not errors, "\n".join(errors[:20])
    # the runs did something: the PPO KL controller moved, the DPO margins grew, RLOO / GRPO / online DPO moved away
    # from pi_ref, online DPO's sampler lagged the policy in iteration 2 (its own forward) and its minibatches of 3
    # pairs were split unevenly (2 / 1, then 1 / 0: one rank without a pair)
    assert multi["ppo"]["history"][-1]["objective/kl_coef"] != multi["ppo"]["history"][0]["objective/kl_coef"]
    assert multi["dpo"]["history"][-1]["rewards/margins"] > 0.01
    for part in ("rloo", "grpo", "odpo"):
        h = multi[part]["history"]
        assert h[0]["objective/kl"] == pytest.approx(0.0, abs=1e-5) and abs(h[-1]["objective/kl"]) > 0.01, part
        assert "objective/gold" in h[-1], part  # the monitor, gathered over the ranks
    odpo = multi["odpo"]["history"]
    assert [r["objective/sampler_lag"] for r in odpo] == [0, 1, 0]
    assert odpo[1]["tokens/forward"] == 3 * odpo[1]["tokens/sequence"]
    assert all(r["pairs"] % 3 and r["policy/updates"] == 2 * -(-r["pairs"] // 3) for r in odpo)


def test_harness_rank0_commits_and_all_ranks_read_it(results):
    _, multi = results
    per_rank = multi["harness"]
    assert [r["rank"] for r in per_rank] == [0, 1]
    for r in per_rank:
        first, again = r["runs"]
        assert first["first"] == {"summary": {"written_by": 0}, "cached": False}
        assert first["second"]["summary"] == {"read": "0"}  # rank 1 read rank 0's committed folder
        assert again["first"]["cached"] and again["second"]["cached"]  # every rank agreed it was cached
        assert r["leftovers"] == []  # no scratch or temp folder left behind


def test_accelerate_configs_parse():
    """The shipped configs load with accelerate's own config loader; FSDP / ZeRO-2 / ZeRO-3 are NOT run in
    the tests (no GPUs, DeepSpeed is not a dependency)."""
    from accelerate.commands.config.config_args import load_config_from_file

    expect = {"cpu2": ("MULTI_GPU", 2), "ddp": ("MULTI_GPU", 8), "fsdp": ("FSDP", 8), "zero2": ("DEEPSPEED", 8),
              "zero3": ("DEEPSPEED", 8)}
    assert sorted(p.stem for p in ACC.glob("*.yaml")) == sorted(expect)
    for name, (kind, n) in expect.items():
        raw = yaml.safe_load((ACC / f"{name}.yaml").read_text())
        assert raw["distributed_type"] == kind and raw["num_processes"] == n, name
        assert raw["mixed_precision"] == "no", name  # precision comes from the suite's dtype
        cfg = load_config_from_file(str(ACC / f"{name}.yaml"))
        assert str(cfg.distributed_type).endswith(kind) and cfg.num_processes == n
    ds2, ds3 = (yaml.safe_load((ACC / f"zero{k}.yaml").read_text())["deepspeed_config"] for k in (2, 3))
    assert ds2["zero_stage"] == 2 and ds3["zero_stage"] == 3
    assert ds2["gradient_accumulation_steps"] == ds3["gradient_accumulation_steps"] == 1  # we accumulate ourselves
    fs = yaml.safe_load((ACC / "fsdp.yaml").read_text())["fsdp_config"]
    assert fs["fsdp_sharding_strategy"] == "FULL_SHARD" and fs["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_uneven_shards_are_refused():
    from methods.distributed import Dist

    d = Dist.single()
    d.world_size, d.rank = 3, 1
    assert d.shard(9) == slice(3, 6)
    with pytest.raises(ValueError, match="batch of 8 cannot be split evenly over 3 processes"):
        d.shard(8)
    # uneven minibatches (online DPO's pairs): contiguous, in rank order, the first ranks one more, none may be empty
    parts = {n: [] for n in (9, 8, 2, 0)}
    for rank in range(3):
        d.rank = rank
        for n in parts:
            parts[n].append(d.split(n))
    assert parts[9] == [slice(0, 3), slice(3, 6), slice(6, 9)]  # = shard when it divides
    assert parts[8] == [slice(0, 3), slice(3, 6), slice(6, 8)]
    assert parts[2] == [slice(0, 1), slice(1, 2), slice(2, 2)]
    assert parts[0] == [slice(0, 0)] * 3
