"""SkillPacks made from and merged into checkpoint files tensor by tensor: same bytes as in memory, resumable, atomic."""

import copy
import filecmp
import json
import os
import subprocess
import sys

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import hf_graft.skillpack as sp
import hf_graft.skillpack.extraction.pipeline as pipeline
from hf_graft.errors import BaseModelMismatchError, HfGraftError
from hf_graft.sharded import Checkpoint
from hf_graft.skillpack.checkpoint_merge import merge_into_checkpoint
from hf_graft.skillpack.extraction.calibration_data import resolve_calibration
from hf_graft.skillpack.extraction.journal import Journal
from hf_graft.skillpack.extraction.loaded import ModelDeltas
from hf_graft.skillpack.extraction.pipeline import BlockSweep, Pipeline
from hf_graft_cli import main

FILES = ("adapter_config.json", "adapter_model.safetensors")
CONFIGS = {
    "llama-tied": LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gpt2": GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32),
}


def _pair(root, kind, seed=0):
    """Folders of a base and a tuned copy (low-rank deltas on most weights, changed biases), sharded bf16."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(CONFIGS[kind]).to(torch.bfloat16)
    tuned = AutoModelForCausalLM.from_config(CONFIGS[kind]).to(torch.bfloat16)
    tuned.load_state_dict(base.state_dict())
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if param.dim() == 2:
                change = torch.randn(param.shape[0], 3, generator=generator) @ torch.randn(3, param.shape[1], generator=generator)
            else:
                change = torch.randn(param.shape, generator=generator)
            if "layers.1.input_layernorm" not in name:  # one weight stays as it was
                param.add_((0.02 * change).to(param.dtype))
    paths = root / f"{kind}-base", root / f"{kind}-tuned"
    for model, path in zip((base, tuned), paths):
        model.save_pretrained(path, max_shard_size="40KB")
    return paths


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    return _pair(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    return _pair(tmp_path_factory.mktemp("llama"), "llama-tied")


CONFIG = sp.SkillPackConfig(target_ratio=6.0)  # as the CLI passes --ratio 6


def _in_memory(base, tuned, out):
    models = [AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) for path in (base, tuned)]
    sp.extract_skillpack(*models, CONFIG, calibration=None, progress=False).save_pretrained(out)


def _same_files(a, b):
    return all(filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False) for name in FILES)


def test_streaming_pack_is_the_in_memory_pack_byte_for_byte(pair, tmp_path):
    base, tuned = pair
    assert len(Checkpoint(base).shards) > 1
    _in_memory(base, tuned, tmp_path / "memory")
    pack = sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, output_dir=tmp_path / "stream", progress=False)
    assert isinstance(pack, sp.SkillPackFile)
    assert _same_files(tmp_path / "memory", tmp_path / "stream")
    assert sorted(os.listdir(tmp_path / "stream")) == ["README.md", *FILES]
    assert not (tmp_path / "stream.partial").exists()
    assert pack.config.measured["compression_ratio"] >= 6


def test_large_deltas_by_row_blocks_make_the_same_pack_both_ways(pair, tmp_path, monkeypatch):
    import hf_graft.skillpack.compression.rowwise as rowwise

    monkeypatch.setattr(rowwise, "LARGE_DELTA_BYTES", 4 * 2500)  # the 96 x 32 embeddings, no other weight
    monkeypatch.setattr(rowwise, "BLOCK_BYTES", 4 * 32 * 16)
    reads = []
    original = rowwise.DeltaRows.blocks
    monkeypatch.setattr(rowwise.DeltaRows, "blocks", lambda self, *a: reads.append(self.shape) or original(self, *a))
    base, tuned = pair
    _in_memory(base, tuned, tmp_path / "memory")
    sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, output_dir=tmp_path / "stream", progress=False)
    assert reads and set(reads) == {(96, 32)}
    assert _same_files(tmp_path / "memory", tmp_path / "stream")


def test_one_pipeline_whatever_the_source_of_deltas(llama_pair, tmp_path):
    """Loaded models' deltas, plugged into the journalled pipeline checkpoints go through, make the
    checkpoints' pack byte for byte."""
    base, tuned = llama_pair
    deltas = ModelDeltas(*[AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) for path in (base, tuned)])
    config = copy.deepcopy(CONFIG)
    config.base_model_name_or_path = str(base)
    assert resolve_calibration(None, None, None, config, distill_steps=0) is None
    journal = Journal(tmp_path / "loaded", "the inputs")
    pack = Pipeline(deltas, config, journal, torch.device("cpu"), progress=False).run(BlockSweep())
    streamed = sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, output_dir=tmp_path / "stream", progress=False)
    assert _same_files(tmp_path / "loaded", tmp_path / "stream")
    assert pack.config.module_specs == streamed.config.module_specs and not (tmp_path / "loaded.partial").exists()


def test_streamed_pack_loads_through_peft_on_a_bf16_base(llama_pair, tmp_path):
    base, tuned = llama_pair
    sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, output_dir=tmp_path / "pack", progress=False)
    host = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(host, tmp_path / "pack", low_cpu_mem_usage=True)
    ids = torch.randint(0, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        packed = model(ids).logits.float()
        exact = AutoModelForCausalLM.from_pretrained(tuned, dtype=torch.bfloat16)(ids).logits.float()
        with model.disable_adapter():
            plain = model(ids).logits.float()
    assert (packed - exact).abs().mean() < 0.5 * (plain - exact).abs().mean()


class _Killed(Exception):
    pass


@pytest.mark.parametrize("stage", ["measure", "compress"])
def test_a_killed_extraction_resumes_to_the_same_pack(llama_pair, tmp_path, monkeypatch, stage):
    base, tuned = llama_pair
    sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, output_dir=tmp_path / "whole", progress=False)
    original, calls = getattr(pipeline, stage), []

    def dies_on_the_fifth(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 5:
            raise _Killed
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, stage, dies_on_the_fifth)
    with pytest.raises(_Killed):
        sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, output_dir=tmp_path / "resumed", progress=False)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial" / "journal.json").exists()
    monkeypatch.setattr(pipeline, stage, original)
    redone = []
    monkeypatch.setattr(pipeline, stage, lambda *a, **k: redone.append(a[0]) or original(*a, **k))
    sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, output_dir=tmp_path / "resumed", progress=False)
    assert _same_files(tmp_path / "whole", tmp_path / "resumed")
    assert not (tmp_path / "resumed.partial").exists()
    assert calls[0] not in redone  # the first block's work was kept, not redone


def test_a_journal_of_other_inputs_is_refused(llama_pair, tmp_path, monkeypatch):
    base, tuned = llama_pair
    monkeypatch.setattr(pipeline, "compress", lambda *a, **k: (_ for _ in ()).throw(_Killed()))
    with pytest.raises(_Killed):
        sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, output_dir=tmp_path / "p", progress=False)
    with pytest.raises(HfGraftError, match="other checkpoints or settings"):
        sp.extract_skillpack(str(base), str(tuned), sp.SkillPackConfig(target_ratio=4), calibration=None, output_dir=tmp_path / "p")


def test_streaming_refusals(llama_pair, tmp_path):
    base, tuned = llama_pair
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(HfGraftError, match="not empty"):
        sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, output_dir=tmp_path / "full")
    with pytest.raises(HfGraftError, match="calibration must be"):
        sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration="wikitext", output_dir=tmp_path / "o")
    with pytest.raises(HfGraftError, match="same weights"):
        sp.extract_skillpack(str(base), str(base), CONFIG, calibration=None)
    if not torch.cuda.is_available():
        with pytest.raises(HfGraftError, match="no GPU"):
            sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, device="cuda")
    other = tmp_path / "other"
    AutoModelForCausalLM.from_config(CONFIGS["gpt2"]).save_pretrained(other)
    with pytest.raises(HfGraftError, match="not the same architecture|holds no"):
        sp.extract_skillpack(str(base), str(other), CONFIG, calibration=None)


def test_checkpoint_reader_checks_the_index(llama_pair, tmp_path):
    base, _ = llama_pair
    checkpoint = Checkpoint(base)
    key = "model.embed_tokens.weight"
    assert torch.equal(checkpoint.read(key, slice(3, 9)), checkpoint.read(key)[3:9])
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in os.listdir(base):
        (folder / name).write_bytes((base / name).read_bytes())
    index = json.loads((base / "model.safetensors.index.json").read_text())
    index["weight_map"][key] = "../elsewhere.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HfGraftError, match="beside the index"):
        Checkpoint(folder)
    right = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"][key]
    index["weight_map"][key] = next(shard for shard in set(index["weight_map"].values()) if shard not in (right, "../elsewhere.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(HfGraftError, match="does not hold it"):
        Checkpoint(folder)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(HfGraftError, match="never read"):
        Checkpoint(pickled)


def test_merge_into_checkpoint_equals_merge_and_unload(llama_pair, tmp_path):
    base, tuned = llama_pair
    pack = sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, output_dir=tmp_path / "pack", progress=False)
    merge_into_checkpoint(tmp_path / "pack", base, tmp_path / "merged", progress=False)
    assert sorted(os.listdir(tmp_path / "merged")) == sorted(os.listdir(base))
    assert json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text()) == json.loads(
        (base / "model.safetensors.index.json").read_text()
    )
    for dtype, folder in ((torch.bfloat16, tmp_path / "merged"), (torch.float32, tmp_path / "merged32")):
        if dtype == torch.float32:
            merge_into_checkpoint(pack, base, folder, dtype=torch.float32, progress=False)
        assert {Checkpoint(folder).dtype(key) for key in Checkpoint(folder).keys()} == {dtype}
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        expected = sp.load_skillpack(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), tmp_path / "pack").merge_and_unload()
        state, reference = merged.state_dict(), expected.state_dict()
        assert all(torch.equal(state[name], reference[name]) for name in reference)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given without a GPU")
def test_merge_on_a_missing_gpu_is_a_clear_error(llama_pair, tmp_path):
    base, tuned = llama_pair
    sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, output_dir=tmp_path / "pack", progress=False)
    with pytest.raises(HfGraftError, match="sees no GPU"):
        merge_into_checkpoint(tmp_path / "pack", base, tmp_path / "merged", device="cuda", progress=False)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_merge_on_the_gpu_matches_the_cpu_merge(llama_pair, tmp_path):
    base, tuned = llama_pair
    sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, output_dir=tmp_path / "pack", progress=False)
    for device in ("cpu", "cuda"):
        merge_into_checkpoint(tmp_path / "pack", base, tmp_path / device, dtype=torch.float32, device=device, progress=False)
    cpu, gpu = Checkpoint(tmp_path / "cpu"), Checkpoint(tmp_path / "cuda")
    for key in cpu.keys():
        torch.testing.assert_close(gpu.read(key), cpu.read(key), rtol=1e-5, atol=1e-6)


def test_merge_into_another_base_leaves_nothing_behind(llama_pair, tmp_path):
    base, tuned = llama_pair
    sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, output_dir=tmp_path / "pack", progress=False)
    with pytest.raises(BaseModelMismatchError, match="another base model"):
        merge_into_checkpoint(tmp_path / "pack", tuned, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.partial").exists()
    merge_into_checkpoint(tmp_path / "pack", tuned, tmp_path / "merged", check_base_fingerprint=False, progress=False)


def test_cli_data_free_extract_streams_and_apply_keeps_the_base_dtype(llama_pair, tmp_path, capsys):
    base, tuned = llama_pair
    _in_memory(base, tuned, tmp_path / "memory")
    argv = ["skillpack", "extract", "--base", str(base), "--tuned", str(tuned), "--out", str(tmp_path / "pack"),
            "--ratio", "6", "--calibration", "none", "--device", "cpu"]
    assert main(argv) == 0
    assert "SkillPack written to" in capsys.readouterr().out
    assert _same_files(tmp_path / "memory", tmp_path / "pack")
    assert main(["skillpack", "apply", str(tmp_path / "pack"), "--base", str(base), "--out", str(tmp_path / "merged")]) == 0
    assert "has no tokenizer to copy" in capsys.readouterr().out
    merged = Checkpoint(tmp_path / "merged")
    assert {merged.dtype(key) for key in merged.keys()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto").dtype == torch.bfloat16


def _two_process_extraction(base, tuned, out):
    """Body of each process of the 2-process run (forked by accelerate's debug_launcher)."""
    torch.set_num_threads(1)
    sp.extract_skillpack(base, tuned, CONFIG, calibration=None, output_dir=out, device="cpu", progress=False)


def test_two_processes_make_the_same_pack_as_one(llama_pair, tmp_path):
    """The blocks are split over 2 gloo processes; the main one writes the pack. Forked from a fresh
    interpreter, as in test_distill: a process forked after its thread pools started can hang."""
    base, tuned = llama_pair
    sp.extract_skillpack(str(base), str(tuned), CONFIG, calibration=None, output_dir=tmp_path / "one", progress=False)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_skillpack_streaming as t; from accelerate import debug_launcher; "
        "debug_launcher(t._two_process_extraction, args=tuple(sys.argv[2:]), num_processes=2)"
    )
    subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__), str(base), str(tuned), str(tmp_path / "two")],
                   check=True, timeout=600)
    assert _same_files(tmp_path / "one", tmp_path / "two")
    assert not (tmp_path / "two.partial").exists()


def test_given_calibration_is_mixed_with_general_text(tmp_path):
    from hf_graft.data import corpus_tokenizer

    tokenizer = corpus_tokenizer(300)
    labels = torch.full((4, 100), -100)
    labels[:, -60:] = 1  # 240 supervised tokens a batch
    skill = [{"input_ids": torch.randint(0, 300, (4, 100)), "labels": labels} for _ in range(3)]
    config = sp.SkillPackConfig(calibration_samples=8)
    batches = resolve_calibration(skill, tokenizer, None, config, distill_steps=0)
    general = batches[2:]
    assert config.calibration_samples == 8 and batches[0] is not skill[0] and len(batches[1]["input_ids"]) == 4
    assert sum(len(b["input_ids"]) for b in general) == 4  # 480 supervised tokens: 4 sequences of 128
    assert all("labels" not in b and b["input_ids"].shape[1] == 128 for b in general)
    unlabelled = resolve_calibration([torch.randint(0, 300, (2, 64))], tokenizer, None, sp.SkillPackConfig(), distill_steps=0)
    assert [len(b["input_ids"]) for b in unlabelled] == [2, 1]
    tokenizer.save_pretrained(tmp_path / "base")  # found beside the base when not passed
    assert len(resolve_calibration(skill, None, str(tmp_path / "base"), sp.SkillPackConfig(calibration_samples=8), distill_steps=0)) == len(batches)
    alone = sp.SkillPackConfig(calibration_samples=8, general_text=False)
    assert len(resolve_calibration(skill, tokenizer, None, alone, distill_steps=0)) == 2
    assert len(resolve_calibration(skill, None, None, sp.SkillPackConfig(calibration_samples=8), distill_steps=0)) == 2  # no tokenizer: a warning
