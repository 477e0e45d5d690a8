"""SkillPacks as a PEFT method: extraction, save/load, merge, several adapters, Hub, safety."""

import copy

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import hf_graft.skillpack as sp
from hf_graft.errors import HfGraftError

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY, num_key_value_heads=2, tie_word_embeddings=False)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**TINY, tie_word_embeddings=False)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=False)),
}


def tuned_copy(base, seed=1, rank=3, scale=0.05):
    """A 'fine-tuned' copy: low-rank changes to the projections, a few embedding rows, norms."""
    generator = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if param.dim() == 2 and not any(s in name for s in ("embed", "wte", "wpe", "lm_head")):
                u = torch.randn(param.shape[0], rank, generator=generator)
                v = torch.randn(rank, param.shape[1], generator=generator)
                param += scale * (u @ v) / rank
            elif param.dim() == 2:
                param[:5] += scale * torch.randn(5, param.shape[1], generator=generator)
            else:
                param += 0.01 * torch.randn(param.shape, generator=generator)
    return tuned.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def llama_pair():
    torch.manual_seed(0)
    base = FAMILIES["llama"]().eval()
    return base, tuned_copy(base)


IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_extract_save_load_merge_on_every_family(family, tmp_path):
    torch.manual_seed(0)
    base = FAMILIES[family]().eval()
    tuned = tuned_copy(base)
    pack = sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=2)).eval()
    measured = pack.peft_config["default"].measured
    assert measured["compression_ratio"] >= 2
    base_logits, tuned_logits, pack_logits = logits(base, IDS), logits(tuned, IDS), logits(pack, IDS)
    # the pack moves the base most of the way to the tuned model
    assert (pack_logits - tuned_logits).norm() < 0.5 * (base_logits - tuned_logits).norm()

    pack.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(logits(loaded, IDS), pack_logits)
    merged = loaded.merge_and_unload()
    assert torch.allclose(logits(merged, IDS), pack_logits, atol=1e-5, rtol=0)


def test_file_holds_packed_integers_not_dense_deltas(llama_pair, tmp_path):
    base, tuned = llama_pair
    pack = sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=4))
    pack.save_pretrained(tmp_path)
    measured = pack.peft_config["default"].measured
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    files = sum((tmp_path / name).stat().st_size for name in ("adapter_config.json", "adapter_model.safetensors"))
    assert files == measured["stored_bytes"]  # the budget counts the files, headers and config included
    assert files * 4 <= measured["delta_bf16_bytes"]
    assert {t.dtype for t in tensors.values()} == {torch.uint8} and all(t.dim() == 1 for t in tensors.values())
    assert not any("embed_tokens.weight" in key and t.dtype != torch.uint8 and t.numel() >= 96 * 32 for key, t in tensors.items())


def test_unmerge_and_disable_restore_the_base(llama_pair):
    base, tuned = llama_pair
    pack = sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=4)).eval()
    base_logits, pack_logits = logits(base, IDS), logits(pack, IDS)
    with pack.disable_adapter():
        assert torch.equal(logits(pack, IDS), base_logits)
    pack.merge_adapter()
    assert torch.allclose(logits(pack, IDS), pack_logits, atol=1e-5, rtol=0)
    pack.unmerge_adapter()
    assert torch.allclose(logits(pack, IDS), pack_logits, atol=1e-5, rtol=0)
    original = base.state_dict()
    for name, value in pack.get_base_model().named_parameters():
        assert torch.allclose(value, original[name.replace(".base_layer", "")], atol=1e-6), name


def test_several_packs_on_one_model(llama_pair, tmp_path):
    base, tuned = llama_pair
    other = tuned_copy(base, seed=7)
    sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=4)).save_pretrained(tmp_path / "a")
    sp.extract_skillpack(base, other, sp.SkillPackConfig(target_ratio=4)).save_pretrained(tmp_path / "b")
    model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", adapter_name="a").eval()
    model.load_adapter(tmp_path / "b", adapter_name="b")
    only_a = logits(model, IDS)
    model.set_adapter("b")
    only_b = logits(model, IDS)
    alone_b = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "b").eval()
    assert torch.equal(only_b, logits(alone_b, IDS))
    assert not torch.allclose(only_a, only_b)


def test_pack_for_another_base_is_refused_unless_overridden(llama_pair, tmp_path):
    base, tuned = llama_pair
    sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=4)).save_pretrained(tmp_path)
    torch.manual_seed(123)
    stranger = FAMILIES["llama"]().eval()
    with pytest.raises(HfGraftError, match="extracted from another base model.*check_base_fingerprint=False"):
        PeftModel.from_pretrained(stranger, tmp_path)
    forced = PeftModel.from_pretrained(stranger, tmp_path, check_base_fingerprint=False)
    assert logits(forced, IDS).shape == (2, 10, 96)


def test_pack_for_another_architecture_is_refused(llama_pair, tmp_path):
    base, tuned = llama_pair
    sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=4)).save_pretrained(tmp_path)
    with pytest.raises(HfGraftError, match="changes modules this model does not have"):
        PeftModel.from_pretrained(FAMILIES["gpt2"](), tmp_path)


def test_identical_models_have_no_skill(llama_pair):
    base, _ = llama_pair
    with pytest.raises(HfGraftError, match="no skill to extract"):
        sp.extract_skillpack(base, copy.deepcopy(base))


def test_config_without_stored_deltas_is_refused(llama_pair):
    from peft import get_peft_model

    base, _ = llama_pair
    with pytest.raises(HfGraftError, match="module_specs is empty"):
        get_peft_model(copy.deepcopy(base), sp.SkillPackConfig())


def test_push_to_hub_and_load_by_repo_id(llama_pair, hub, repo_id):
    base, tuned = llama_pair
    pack = sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=4)).eval()
    pack.push_to_hub(repo_id)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(hub.files(repo_id))
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), repo_id).eval()
    assert torch.equal(logits(loaded, IDS), logits(pack, IDS))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tied_embeddings_store_one_delta_and_merge_it_once(family, tmp_path):
    torch.manual_seed(0)
    if family == "llama":
        base = LlamaForCausalLM(LlamaConfig(**TINY, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    else:
        base = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4)).eval()
    head, embedding = ("lm_head", "model.embed_tokens") if family == "llama" else ("lm_head", "transformer.wte")
    assert base.get_submodule(head).weight is base.get_submodule(embedding).weight
    pack = sp.extract_skillpack(base, tuned_copy(base), sp.SkillPackConfig(target_ratio=4)).eval()
    config = pack.peft_config["default"]
    assert config.tied_modules == {head: embedding} and head not in config.module_specs
    pack.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    unmerged = logits(loaded, IDS)
    assert torch.equal(unmerged, logits(pack, IDS))
    merged = loaded.merge_and_unload()
    assert torch.allclose(logits(merged, IDS), unmerged, atol=1e-5, rtol=0)
    assert merged.get_submodule(head).weight is merged.get_submodule(embedding).weight

    untied = copy.deepcopy(base)
    untied.get_submodule(head).weight = torch.nn.Parameter(base.get_submodule(head).weight.clone())
    with pytest.raises(HfGraftError, match="shares its weight with.*tie_word_embeddings=True"):
        PeftModel.from_pretrained(untied, tmp_path)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_adapter_as_the_delta(family, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = FAMILIES[family]().eval()
    targets = ["q_proj", "v_proj", "down_proj"] if family == "llama" else ["c_attn", "c_proj"]
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=targets, init_lora_weights=False)).eval()
    lora.save_pretrained(tmp_path / "lora")
    reference = logits(lora, IDS)
    for tuned in (lora, tmp_path / "lora"):
        pack = sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=1.5)).eval()
        assert sorted(pack.peft_config["default"].module_specs) == sorted(
            name for name, module in lora.base_model.model.named_modules() if hasattr(module, "lora_A")
        )
        drift = (logits(pack, IDS) - reference).norm() / (logits(base, IDS) - reference).norm()
        assert drift < 0.05
    assert not any("lora" in name for name, _ in base.named_modules())


def test_calibrated_extraction_records_its_samples_and_loads(tmp_path):
    torch.manual_seed(0)
    base = FAMILIES["gpt2"]().eval()  # Conv1D: the calibrated factors swap roles
    tuned = tuned_copy(base)
    batches = [torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    pack = sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=2, calibration_samples=10), calibration=batches)
    config = pack.peft_config["default"]
    assert config.calibration_samples == 10
    drift = (logits(pack.eval(), IDS) - logits(tuned, IDS)).norm() / (logits(base, IDS) - logits(tuned, IDS)).norm()
    assert drift < 0.05
    pack.save_pretrained(tmp_path)
    assert torch.equal(logits(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval(), IDS), logits(pack, IDS))
    with pytest.raises(HfGraftError, match="calibration set is empty"):
        sp.extract_skillpack(base, tuned, sp.SkillPackConfig(), calibration=[])


def _projections_only(base, seed=2):
    """A tuned copy whose only changes are low-rank changes of the attention and MLP projections."""
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if param.dim() == 2 and not any(s in name for s in ("embed", "wte", "wpe", "lm_head")):
                param += 0.05 * torch.randn(param.shape[0], 2, generator=generator) @ torch.randn(2, param.shape[1], generator=generator)
    return tuned.eval()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_lora_is_exact_for_low_rank_deltas(family, tmp_path):
    from peft import LoraConfig

    torch.manual_seed(0)
    base = FAMILIES[family]().eval()
    pack = sp.extract_skillpack(base, _projections_only(base), sp.SkillPackConfig(target_ratio=2, formats="lowrank")).eval()
    report = sp.export_lora(pack, None, tmp_path, dtype="float32")
    assert report.left_out == [] and report.approximated == {}
    assert sorted(report.exact) == sorted(pack.peft_config["default"].module_specs)
    config = LoraConfig.from_pretrained(tmp_path)
    specs = pack.peft_config["default"].module_specs
    assert config.rank_pattern == {name: spec["weight"]["rank"] for name, spec in specs.items()}
    assert config.alpha_pattern == config.rank_pattern
    lora = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert lora.peft_config["default"].peft_type.value == "LORA"
    assert torch.allclose(logits(lora, IDS), logits(pack, IDS), atol=1e-5, rtol=0)


def test_export_lora_reports_what_lora_cannot_hold(llama_pair, tmp_path):
    base, tuned = llama_pair
    pack = sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=2))
    report = sp.export_lora(pack, None, tmp_path, sparse_rank=2)
    assert "model.layers.0.input_layernorm.weight" in report.left_out
    specs = pack.peft_config["default"].module_specs
    factored = {name for name, parts in specs.items() if "weight" in parts and parts["weight"]["kind"] in ("quant", "sparse")}
    assert factored and set(report.approximated) == factored
    assert all(0 < error < 1 for error in report.approximated.values())


def test_model_card_lists_base_ratio_modules_and_retention(llama_pair, tmp_path, hub, repo_id):
    base, tuned = llama_pair
    base = copy.deepcopy(base)
    base.name_or_path = "org/tiny-llama"
    pack = sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=2))
    assert sp.record_evaluation(pack, "exact_match", base=0.1, tuned=0.9, pack=0.86) == pytest.approx(0.95)
    pack.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    ratio = pack.peft_config["default"].measured["compression_ratio"]
    assert "`org/tiny-llama`" in card and f"{ratio:.1f}x" in card
    assert "**95.0%**" in card and "| `model.layers.1.mlp.down_proj` | weight |" in card
    assert "library_name: peft" in card and "- skillpack" in card and "PEFT " in card
    pack.push_to_hub(repo_id)
    pushed = hub.files(repo_id)["README.md"].decode()
    assert f"# {repo_id.split('/')[1]}" in pushed and f'PeftModel.from_pretrained(base, "{repo_id}")' in pushed
