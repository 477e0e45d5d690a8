"""peft's generic adapter checks run against SkillPacks, plus the habits of peft users.

The checks follow peft's own test suite for every tuner (save/load, merge, safe merge, delete,
disable, mixed-adapter batches, dtypes, generate), here for the SkillPack method.
"""

import copy
import shutil

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors import safe_open
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import hf_graft.skillpack as sp
from hf_graft.errors import HfGraftError

from test_skillpack_peft import TINY, logits, tuned_copy

IDS = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(5))


def tiny_llama(tied=False):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=tied)).eval()


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4)).eval()  # tied


@pytest.fixture(scope="module", params=["llama", "tied-llama", "gpt2"])
def two_packs(request, tmp_path_factory):
    """A base and two SkillPack folders made from two different fine-tunes of it."""
    base = {"llama": tiny_llama, "tied-llama": lambda: tiny_llama(tied=True), "gpt2": tiny_gpt2}[request.param]()
    root = tmp_path_factory.mktemp(request.param)
    for name, seed, formats in (("a", 1, "all"), ("b", 7, "lowrank")):
        config = sp.SkillPackConfig(target_ratio=3, formats=formats)
        sp.extract_skillpack(base, tuned_copy(base, seed=seed), config, calibration=None).save_pretrained(root / name)
    return base, root


def loaded(base, root, *names, **kwargs):
    model = PeftModel.from_pretrained(copy.deepcopy(base), root / names[0], adapter_name=names[0], **kwargs)
    for name in names[1:]:
        model.load_adapter(root / name, adapter_name=name, **kwargs)
    return model.eval()


def each_alone(model, names, ids):
    """Logits of ``ids`` with each row's adapter set on its own (``"__base__"``: adapters disabled)."""
    rows = []
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                rows.append(logits(model, ids)[row])
        else:
            model.set_adapter(name)
            rows.append(logits(model, ids)[row])
    return torch.stack(rows)


def test_save_load_round_trip_is_bit_exact(two_packs, tmp_path):
    base, root = two_packs
    model = loaded(base, root, "a", "b")
    model.set_adapter("a")
    reference = logits(model, IDS)
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"a", "b"}
    assert {p.name for p in (tmp_path / "b").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    again = loaded(base, tmp_path, "a", "b")
    again.set_adapter("a")
    assert torch.equal(logits(again, IDS), reference)


def test_mixed_batch_gives_each_row_its_pack(two_packs):
    base, root = two_packs
    model = loaded(base, root, "a", "b")
    names = ["a", "__base__", "b"]
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=names).logits
    assert torch.allclose(mixed, each_alone(model, names, IDS), atol=1e-5, rtol=0)
    # and the rows really differ by pack: the argument is not ignored
    model.set_adapter("a")
    assert not torch.allclose(mixed[1:], logits(model, IDS)[1:], atol=1e-3)


def test_mixed_batch_in_generate(two_packs):
    base, root = two_packs
    model = loaded(base, root, "a", "b")
    names = ["b", "a", "__base__"]
    mixed = model.generate(input_ids=IDS, adapter_names=names, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for row, name in enumerate(names):
        if name == "__base__":
            with model.disable_adapter():
                alone = model.generate(input_ids=IDS[row : row + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        else:
            model.set_adapter(name)
            alone = model.generate(input_ids=IDS[row : row + 1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        ended = alone.shape[1]  # a row that ended early is padded in the batch
        assert torch.equal(mixed[row, :ended], alone[0]) and (mixed[row, ended:] == 0).all(), name


def test_mixed_batch_with_beam_search(two_packs):
    base, root = two_packs
    model = loaded(base, root, "a", "b")
    names = ["a", "b", "a"]
    mixed = model.generate(input_ids=IDS, adapter_names=names, max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    model.set_adapter("b")
    alone = model.generate(input_ids=IDS[1:2], max_new_tokens=4, num_beams=2, do_sample=False, pad_token_id=0)
    assert torch.equal(mixed[1], alone[0])


def test_mixed_batch_refuses_unknown_packs_merged_packs_and_training(two_packs):
    base, root = two_packs
    model = loaded(base, root, "a", "b")
    with pytest.raises(ValueError, match="non-existing adapter.*c"):
        model(input_ids=IDS, adapter_names=["a", "c", "b"])
    with pytest.raises(ValueError, match="one adapter name per example"):
        model(input_ids=IDS, adapter_names=["a", "b"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(input_ids=IDS, adapter_names=["a", "b", "a"])
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model(input_ids=IDS, adapter_names=["a", "b", "a"])


def test_merge_safe_merge_unmerge_and_delete(two_packs):
    base, root = two_packs
    model = loaded(base, root, "a", "b")
    model.set_adapter("a")
    unmerged = logits(model, IDS)
    model.merge_adapter(safe_merge=True)
    assert torch.allclose(logits(model, IDS), unmerged, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    model.set_adapter("b")
    only_b = logits(model, IDS)
    model.delete_adapter("a")
    assert set(model.peft_config) == {"b"}
    assert not any("skillpack_tensors.a." in key for key in model.state_dict())
    assert torch.equal(logits(model, IDS), only_b)
    with model.disable_adapter():
        assert torch.allclose(logits(model, IDS), logits(base, IDS), atol=1e-6, rtol=0)
    merged = model.merge_and_unload()
    assert torch.allclose(logits(merged, IDS), only_b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_pack_from_an_fp32_base_loads_on_a_half_precision_base(two_packs, dtype):
    base, root = two_packs
    reference = logits(loaded(base, root, "a"), IDS)
    half = copy.deepcopy(base).to(dtype)
    model = PeftModel.from_pretrained(half, root / "a").eval()
    assert model.get_base_model().lm_head.weight.dtype == dtype
    out = logits(model, IDS).float()
    assert torch.allclose(out, reference, atol=0.15, rtol=0.05)


def test_another_base_in_half_precision_is_still_refused(two_packs):
    base, root = two_packs
    other = copy.deepcopy(base)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.01 * torch.randn_like(param))
    with pytest.raises(HfGraftError, match="another base model"):
        PeftModel.from_pretrained(other.to(torch.bfloat16), root / "a")


def test_low_cpu_mem_usage_loads_the_same_pack(two_packs):
    base, root = two_packs
    reference = logits(loaded(base, root, "a", "b"), IDS)
    model = loaded(base, root, "a", "b", low_cpu_mem_usage=True)
    assert torch.equal(logits(model, IDS), reference)


def test_low_cpu_mem_usage_on_a_bf16_base(two_packs):
    base, root = two_packs
    reference = logits(PeftModel.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), root / "a").eval(), IDS)
    model = PeftModel.from_pretrained(copy.deepcopy(base).to(torch.bfloat16), root / "a", low_cpu_mem_usage=True).eval()
    assert torch.equal(logits(model, IDS), reference)


@pytest.mark.parametrize("cast", ["bfloat16", "double", "half"])
def test_dtype_moves_keep_the_codes_and_follow_the_base(two_packs, cast):
    base, root = two_packs
    model = loaded(base, root, "a")
    reference = logits(model, IDS)
    stored = {key: value.clone() for key, value in model.state_dict().items() if "skillpack_tensors" in key}
    model = model.to(torch.bfloat16) if cast == "bfloat16" else getattr(model, cast)()
    after = {key: value for key, value in model.state_dict().items() if "skillpack_tensors" in key}
    assert after.keys() == stored.keys() and all(torch.equal(after[k], stored[k]) for k in stored)
    out = logits(model, IDS)
    assert out.dtype == model.get_base_model().lm_head.weight.dtype
    tolerance = 1e-9 if cast == "double" else 0.15
    assert torch.allclose(out.float(), reference.float(), atol=tolerance + 1e-5, rtol=0.05 if tolerance > 1e-3 else 0)
    merged = model.merge_and_unload()
    assert torch.allclose(logits(merged, IDS).float(), out.float(), atol=0.2 if tolerance > 1e-3 else 1e-6, rtol=0.05)


def test_pickle_serialization_is_refused(two_packs, tmp_path):
    base, root = two_packs
    model = loaded(base, root, "a")
    with pytest.raises(HfGraftError, match="safetensors only"):
        model.save_pretrained(tmp_path, safe_serialization=False)
    assert not (tmp_path / "a" / "adapter_model.bin").exists()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_is_trainable_says_packs_are_frozen(two_packs):
    base, root = two_packs
    with pytest.raises(HfGraftError, match="frozen"):
        PeftModel.from_pretrained(copy.deepcopy(base), root / "a", is_trainable=True)


@pytest.mark.parametrize("make", [lambda: tiny_llama(tied=True), tiny_gpt2], ids=["llama", "gpt2"])
def test_exported_lora_on_tied_embeddings_equals_the_pack_unmerged_and_merged_untied(make, tmp_path):
    base = make()
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # only weight matrices change: everything the pack holds, LoRA can hold
        for name, param in tuned.named_parameters():
            if param.dim() == 2:
                param += 0.05 * torch.randn(param.shape[0], 2, generator=generator) @ torch.randn(2, param.shape[1], generator=generator)
    pack = sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=2, formats="lowrank"), calibration=None).eval()
    reference = logits(pack, IDS)
    pack.save_pretrained(tmp_path / "pack")
    stored = sp.read_skillpack(tmp_path / "pack")
    report = sp.export_lora(stored, base, tmp_path / "lora", sparse_rank=96, dtype="float32")
    assert report.tied == stored.config.tied_modules and report.tied and not report.left_out
    with safe_open(tmp_path / "lora" / "adapter_model.safetensors", "pt") as f:  # the shared factors are stored once
        assert not any(key.startswith(f"base_model.model.{head}.") for head in report.tied for key in f.keys())
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    unmerged = logits(lora, IDS)
    assert torch.allclose(unmerged, reference, atol=1e-4, rtol=0)
    head = lora.get_base_model().get_output_embeddings().get_base_layer()  # untied as LoraExport says
    head.weight = torch.nn.Parameter(head.weight.detach().clone())
    assert torch.allclose(logits(lora.merge_and_unload(), IDS), reference, atol=1e-4, rtol=0)


@pytest.mark.skipif(
    int(transformers.__version__.split(".")[0]) >= 5,
    reason="transformers 5's own adapter methods need peft >= 0.22; PeftModel's API works on both lines",
)
def test_transformers_native_adapter_methods(two_packs, tmp_path):
    base, root = two_packs
    reference = loaded(base, root, "a", "b")
    model = copy.deepcopy(base)
    model.load_adapter(str(root / "a"), adapter_name="a")
    model.load_adapter(str(root / "b"), adapter_name="b")
    for name in ("a", "b"):
        model.set_adapter(name)
        reference.set_adapter(name)
        assert torch.equal(logits(model, IDS), logits(reference, IDS))
    model.disable_adapters()
    assert torch.allclose(logits(model, IDS), logits(base, IDS), atol=1e-6, rtol=0)
    shutil.copytree(root / "a", tmp_path / "damaged")
    weights = tmp_path / "damaged" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # inside the packed bytes: the header stays valid
    weights.write_bytes(bytes(data))
    with pytest.raises(HfGraftError, match="do not match the digest"):
        copy.deepcopy(base).load_adapter(str(tmp_path / "damaged"), adapter_name="a")
