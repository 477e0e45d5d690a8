"""Calibrated SkillPacks made from checkpoint files one decoder block at a time: as good as in memory, resumable."""

import copy
import filecmp

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import hf_graft.skillpack as sp
import hf_graft.skillpack.extraction.sequential as sequential
from hf_graft.errors import HfGraftError
from test_skillpack_streaming import CONFIGS, FILES, _pair

BATCHES = [torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
HELD_OUT = torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(99))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    return _pair(tmp_path_factory.mktemp(request.param), request.param)


def _kl(base, tuned, pack_dir) -> float:
    """KL(tuned || base + pack) of next-token distributions on held-out inputs."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(pack_dir)) if pack_dir else base
    with torch.no_grad():
        target = torch.log_softmax(tuned(HELD_OUT).logits, -1)
        found = torch.log_softmax(model(input_ids=HELD_OUT).logits, -1)
    return float(torch.nn.functional.kl_div(found, target, log_target=True, reduction="batchmean"))


def test_block_by_block_calibration_and_distillation_against_a_data_free_pack(pair, tmp_path):
    """At 16x on these random pairs, a pack calibrated block by block keeps most of the change and
    does about as well as a data-free pack or better, its blocks distilled or not."""
    base_dir, tuned_dir = pair
    base, tuned = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) for path in pair)
    calibration = [torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    found = {}
    for steps in (0, 40):
        config = sp.SkillPackConfig(target_ratio=16.0, distill_steps=steps)  # a budget the rank-3 deltas do not fit whole
        out = tmp_path / f"blocks-{steps}"
        sp.extract_skillpack(str(base_dir), str(tuned_dir), config, calibration=calibration, output_dir=out, progress=False)
        found[steps] = _kl(base, tuned, out)
        written = sp.read_skillpack(out)
        assert written.config.calibration_samples == 64
        assert (written.config.measured["distill_loss"] is None) == (steps == 0)
    config = sp.SkillPackConfig(target_ratio=16.0, distill_steps=0)
    sp.extract_skillpack(base, tuned, config, calibration=None, progress=False).save_pretrained(tmp_path / "free")
    free = _kl(base, tuned, tmp_path / "free")
    assert max(found.values()) < 0.5 * _kl(base, tuned, None) and min(found.values()) < 1.1 * free
    assert found[40] < 1.1 * found[0]  # distilling each block keeps it as close


def test_block_by_block_measures_what_the_loaded_model_measures(tmp_path):
    """The statistics are those of the loaded model: both ways choose the same format for every delta,
    and the packs are as close to the tuned model."""
    base_dir, tuned_dir = _pair(tmp_path, "llama-tied")
    config = sp.SkillPackConfig(target_ratio=6.0, distill_steps=0)
    base, tuned = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) for path in (base_dir, tuned_dir))
    blocks = sp.extract_skillpack(str(base_dir), str(tuned_dir), config, calibration=BATCHES, progress=False)
    loaded = sp.extract_skillpack(base, tuned, config, calibration=BATCHES, progress=False)
    memory = loaded.peft_config["default"]
    kinds = lambda specs: {name: {part: (s["kind"], s.get("rank"), s.get("bits")) for part, s in parts.items()} for name, parts in specs.items()}  # noqa: E731
    assert kinds(blocks.config.module_specs) == kinds(memory.module_specs)
    blocks.save_pretrained(tmp_path / "blocks", model_class=type(base))
    loaded.save_pretrained(tmp_path / "memory")
    assert _kl(base, tuned, tmp_path / "blocks") < 1.25 * _kl(base, tuned, tmp_path / "memory")


class _Killed(Exception):
    pass


@pytest.mark.parametrize("sweep", ["_backward", "_compress_stage"])
def test_a_killed_block_by_block_extraction_resumes_to_the_same_pack(tmp_path, monkeypatch, sweep):
    base_dir, tuned_dir = _pair(tmp_path, "llama-tied")
    config = sp.SkillPackConfig(target_ratio=3.0, distill_steps=5, formats="lowrank")
    run = lambda out: sp.extract_skillpack(str(base_dir), str(tuned_dir), config, calibration=BATCHES, output_dir=out, progress=False)  # noqa: E731
    run(tmp_path / "whole")
    original, calls = getattr(sequential.BlockwiseStatistics, sweep), []

    def dies_on_the_second(self, stage, *args, **kwargs):
        calls.append(stage)
        if len(calls) == 2:
            raise _Killed
        return original(self, stage, *args, **kwargs)

    monkeypatch.setattr(sequential.BlockwiseStatistics, sweep, dies_on_the_second)
    with pytest.raises(_Killed):
        run(tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial" / "journal.json").exists()
    redone = []
    monkeypatch.setattr(sequential.BlockwiseStatistics, sweep, lambda self, stage, *a, **k: redone.append(stage) or original(self, stage, *a, **k))
    run(tmp_path / "resumed")
    assert all(filecmp.cmp(tmp_path / "whole" / name, tmp_path / "resumed" / name, shallow=False) for name in FILES)
    assert not (tmp_path / "resumed.partial").exists()
    assert calls[0] not in redone and calls[1] in redone  # the finished stage was kept, the killed one redone


def test_block_by_block_refusals(tmp_path, monkeypatch):
    base_dir, tuned_dir = _pair(tmp_path, "llama-tied")
    config = sp.SkillPackConfig(target_ratio=6.0)
    with pytest.raises(HfGraftError, match="non-empty LongTensors"):
        sp.extract_skillpack(str(base_dir), str(tuned_dir), config, calibration=[torch.rand(2, 4)])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("hf_graft.skillpack.extraction.checkpoints.processes", lambda: (0, 2, lambda: None))
    with pytest.raises(HfGraftError, match="in one process"):
        sp.extract_skillpack(str(base_dir), str(tuned_dir), config, calibration=BATCHES, output_dir=tmp_path / "p")


def test_kept_hidden_states_are_read_one_batch_at_a_time_and_checked(tmp_path):
    states = sequential._States(str(tmp_path))
    batches = [torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    states.save("input", 1, {"tuned": batches, "other": batches[:1]})
    stream = states.stream("input", 1, "tuned", torch.device("cpu"))
    assert len(stream) == 3 and all(torch.equal(found, kept) for found, kept in zip(stream, batches))
    from hf_graft.safetensors_io import save_tensors
    save_tensors({"tuned.0": batches[0], "tuned.2": batches[2]}, states.path("input", 2))  # batch 1 is missing
    with pytest.raises(HfGraftError, match="does not hold batches 0 to 1 of 'tuned'"):
        states.stream("input", 2, "tuned", torch.device("cpu"))
    with pytest.raises(HfGraftError, match="lacks states-input-00003"):
        states.stream("input", 3, "tuned", torch.device("cpu"))
