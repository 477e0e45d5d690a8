"""SkillPacks made for what the model computes: statistics, honest bytes, compensation order, scale distillation."""

import copy

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

import hf_graft.skillpack as sp
from hf_graft.errors import HfGraftError
from hf_graft.skillpack.compression.formats import compress_delta
from hf_graft.skillpack.compression.distillation import distill_scales
from hf_graft.skillpack.extraction.packing import block_groups
from hf_graft.skillpack.compression.objective import SharedGrams, StatisticsRecorder, collect_statistics

IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            param += 0.02 * torch.randn(param.shape, generator=generator)
    return base, tuned


def batches(count=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 12), generator=generator) for _ in range(count)]


def kl(model, reference):
    with torch.no_grad():
        p = torch.log_softmax(reference(IDS).logits, -1)
        q = torch.log_softmax(model(IDS).logits, -1)
    return float(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean"))


def test_statistics_are_input_moments_and_output_sensitivities(pair):
    _, tuned = pair
    modules = {"model.layers.0.mlp.down_proj": tuned.model.layers[0].mlp.down_proj, "model.embed_tokens": tuned.model.embed_tokens}
    data = batches(2)
    stats = collect_statistics(tuned, modules, data, progress=False)
    down = stats["model.layers.0.mlp.down_proj"]
    assert down.hessian.shape == (64, 64) and down.row_weights.shape == (32,)
    inputs = []
    handle = tuned.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, 64)))
    with torch.no_grad():
        for batch in data:
            tuned(batch)
    handle.remove()
    flat = torch.cat(inputs).double()
    assert torch.allclose(down.hessian.double(), flat.T @ flat / len(flat), rtol=1e-4, atol=1e-8)
    assert bool((down.row_weights > 0).all()) and not any(p.grad is not None for p in tuned.parameters())
    embedding = stats["model.embed_tokens"]
    assert embedding.is_diagonal and embedding.row_weights.shape == (64,)
    seen = torch.bincount(torch.cat([b.reshape(-1) for b in data]), minlength=64) > 0
    assert seen.any() and (~seen).any()  # the batches show some tokens and not others
    assert float(embedding.row_weights[seen].min()) > float(embedding.row_weights[~seen].max())


def test_modules_fed_one_tensor_share_one_gram():
    inputs = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    flat = inputs.reshape(-1, 4).double()
    grams = SharedGrams()
    first = grams(inputs)
    assert first.dtype == torch.float32 and torch.allclose(first.double(), flat.T @ flat, atol=1e-5)  # summed in float64 by its users
    assert grams(inputs) is first  # q, k and v: one product
    inputs.mul_(2)  # changed in place: computed again
    assert torch.allclose(grams(inputs), 4 * first, atol=1e-4)
    recorder = StatisticsRecorder({"q": torch.nn.Linear(4, 3), "k": torch.nn.Linear(4, 2)})
    with recorder.recording():
        for module in recorder.modules.values():
            module(inputs).sum().backward()
            module(inputs).sum().backward()  # a second batch: summed in place, in float64
    found = recorder.statistics()
    assert found["q"].hessian is found["k"].hessian  # one tensor for modules fed the same inputs
    assert torch.allclose(found["q"].hessian.double(), 2 * (4 * flat.T @ flat) / 10 / 2, atol=1e-4)


@pytest.mark.parametrize("ratio", [2, 3, 5])
def test_saved_files_never_exceed_the_budget(pair, tmp_path, ratio):
    base, tuned = pair
    pack = sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=ratio), calibration=None, progress=False)
    pack.save_pretrained(tmp_path)
    files = sum((tmp_path / name).stat().st_size for name in ("adapter_config.json", "adapter_model.safetensors"))
    measured = pack.peft_config["default"].measured
    assert files == measured["stored_bytes"] <= measured["delta_bf16_bytes"] // ratio
    assert measured["compression_ratio"] == pytest.approx(measured["delta_bf16_bytes"] / files, abs=0.01)


def test_a_budget_below_the_config_is_refused(pair):
    base, tuned = pair
    with pytest.raises(HfGraftError, match="does not even hold the pack's config"):
        sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=None, byte_budget=500), calibration=None, progress=False)


def test_calibrated_pack_is_closer_to_the_tuned_model_and_distillation_helps(pair, tmp_path):
    base, tuned = pair
    free = sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=3), calibration=None, progress=False)
    plain = sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=3, distill_steps=0), calibration=batches(), progress=False)
    distilled = sp.extract_skillpack(base, tuned, sp.SkillPackConfig(target_ratio=3, distill_steps=60), calibration=batches(), progress=False)
    config = distilled.peft_config["default"]
    assert config.calibration_samples == 16 and config.distill_steps == 60
    first, last = config.measured["distill_loss"]
    assert last < first
    assert kl(distilled.eval(), tuned) < kl(plain.eval(), tuned) < kl(free.eval(), tuned)
    assert free.peft_config["default"].calibration_samples == 0 and free.peft_config["default"].measured["distill_loss"] is None
    distilled.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, distilled(IDS).logits)


def test_scale_distillation_changes_values_not_codes(pair):
    base, tuned = pair
    deltas = {
        "model.layers.0.mlp.up_proj.weight": compress_delta(
            tuned.model.layers[0].mlp.up_proj.weight - base.model.layers[0].mlp.up_proj.weight, {"kind": "quant", "bits": 2}
        ),
        "model.layers.1.self_attn.o_proj.weight": compress_delta(
            tuned.model.layers[1].self_attn.o_proj.weight - base.model.layers[1].self_attn.o_proj.weight,
            {"kind": "lowrank", "rank": 8},
        ),
        "model.norm.weight": compress_delta(tuned.model.norm.weight - base.model.norm.weight, {"kind": "dense_fp16"}),
    }
    trained, losses = distill_scales(base, tuned, deltas, batches(), steps=30, progress=False)
    assert losses[-1] < losses[0]
    for name, before in deltas.items():
        after = trained[name]
        assert after.meta == before.meta and after.nbytes == before.nbytes
        segments_before, segments_after = before.segments(), after.segments()
        for key, value in segments_before.items():
            if value.dtype == torch.uint8:
                assert torch.equal(segments_after[key], value), key  # integer codes never move
        assert not torch.equal(after.delta(), before.delta())
    with pytest.raises(HfGraftError, match="no parameter"):
        distill_scales(base, tuned, {"nowhere.weight": deltas["model.norm.weight"]}, batches(), steps=1, progress=False)


def test_blocks_are_compressed_in_forward_order():
    names = ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
             "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.down_proj", "model.norm", "lm_head"]
    assert block_groups(names) == [
        ["model.embed_tokens"], ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"],
        ["model.layers.1.self_attn.q_proj"], ["model.layers.10.mlp.down_proj"], ["model.norm"], ["lm_head"],
    ]


def test_embedded_calibration_text_and_general_perplexity_with_a_tokenizer(pair, tmp_path):
    from hf_graft.data import train_tokenizer

    tokenizer = train_tokenizer(["def f(x):\n    return x + 1\n"] * 50, vocab_size=300)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=False)).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight += 0.05 * torch.randn(16, 32)
    config = sp.SkillPackConfig(target_ratio=None, byte_budget=4096, calibration_samples=4, distill_steps=5)
    pack = sp.extract_skillpack(base, tuned, config, calibration="pydoc", tokenizer=tokenizer, progress=False)
    assert pack.peft_config["default"].calibration_samples == 4
    assert pack.peft_config["default"].measured["distill_loss"] is not None
    # general perplexity of base, tuned and base + pack, on held-out text, in the config and on the card
    general = pack.peft_config["default"].measured["general_perplexity"]
    from hf_graft.causal_lm import encode_text, perplexity
    from hf_graft.data import pydoc_corpus

    ids = encode_text(tokenizer, pydoc_corpus().held_out)[: general["tokens"]]
    assert general["tokens"] == 4096
    assert general["base"] == pytest.approx(perplexity(base, ids)["perplexity"], rel=1e-4)
    assert general["tuned"] == pytest.approx(perplexity(tuned, ids)["perplexity"], rel=1e-4)
    assert general["pack"] == pytest.approx(perplexity(pack, ids)["perplexity"], rel=1e-4)
    pack.save_pretrained(tmp_path)
    assert sp.read_skillpack(tmp_path).config.measured["general_perplexity"] == general
    card = (tmp_path / "README.md").read_text()
    assert "## General ability" in card and f"| tuned | {general['tuned']:.4f} |" in card
    with pytest.raises(HfGraftError, match="calibration must be 'generate', 'pydoc'"):
        sp.extract_skillpack(base, tuned, config, calibration="c4", progress=False)
