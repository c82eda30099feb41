"""Base pretraining / SFT (``methods.sft.train_lm``) stopped by a signal and resumed reach the uninterrupted weights
bit for bit, whether the stop comes mid-way or after the last step."""

import contextlib
import copy

import pytest
import torch

from methods import sft as sft_mod


def _train(model, tmp_path, stop_at=None, **kw):
    windows = torch.randint(3, 200, (40, 16), generator=torch.Generator().manual_seed(0))
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return stop_at is not None and calls["n"] == stop_at

    return sft_mod.train_lm(model, sft_mod.packed_batches(windows, 4, 0), steps=6, lr=1e-3, warmup_steps=1,
                            weight_decay=0.0, grad_clip=1.0, device="cpu", autocast=contextlib.nullcontext(), desc="t",
                            log_every=1, checkpoint_path=tmp_path / "ck.pt", stop=stop, **kw)


@pytest.mark.parametrize("stop_at", [3, 6])
def test_stopped_and_resumed_training_reaches_the_same_weights(tiny_lm, tmp_path, stop_at):
    model, _ = tiny_lm
    ref = copy.deepcopy(model)
    hist_ref = _train(ref, tmp_path / "ref")
    m = copy.deepcopy(model)
    with pytest.raises(sft_mod.TrainingStopped) as e:
        _train(m, tmp_path, stop_at=stop_at)
    assert (e.value.step, e.value.steps) == (stop_at, 6) and (tmp_path / "ck.pt").exists()
    resumed = []
    m2 = copy.deepcopy(model)  # a fresh process: the initial weights, then the checkpoint
    hist = _train(m2, tmp_path, on_resume=resumed.append)
    assert resumed == [stop_at]
    for a, b in zip(ref.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [r["loss"] for r in hist] == [r["loss"] for r in hist_ref]


def test_a_checkpoint_of_another_run_is_not_resumed(tiny_lm, tmp_path):
    model, _ = tiny_lm
    m = copy.deepcopy(model)
    with pytest.raises(sft_mod.TrainingStopped):
        _train(m, tmp_path, stop_at=2)
    resumed = []
    windows = torch.randint(3, 200, (40, 16), generator=torch.Generator().manual_seed(0))
    sft_mod.train_lm(copy.deepcopy(model), sft_mod.packed_batches(windows, 4, 0), steps=6, lr=5e-4, warmup_steps=1,
                     weight_decay=0.0, grad_clip=1.0, device="cpu", autocast=contextlib.nullcontext(), desc="t",
                     checkpoint_path=tmp_path / "ck.pt", on_resume=resumed.append)
    assert resumed == []  # another learning rate: the checkpoint is not this run's
