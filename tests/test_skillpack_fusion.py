"""Several SkillPacks on one target with a router: routing, exactness, forget-free growth, saving, errors."""

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import hf_graft
from hf_graft import skillpack as sp
from hf_graft.data import train_tokenizer
from hf_graft.errors import HfGraftError

PROMPTS = {
    "add": [f"add {a} and {b}" for a in range(6) for b in range(3)],
    "rev": [f"reverse the word {w}" for w in ("cat", "dog", "tree", "house", "river", "stone", "cloud", "lamp")],
    "sql": [f"SELECT {c} FROM t{i}" for c in ("a", "b", "name") for i in range(5)],
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([t for texts in PROMPTS.values() for t in texts] * 5, vocab_size=300)


@pytest.fixture(scope="module")
def base(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def _skill(base, layer, module, seed):
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    weight = dict(tuned.named_parameters())[f"model.layers.{layer}.{module}.weight"]
    with torch.no_grad():
        weight += 0.3 * torch.randn(weight.shape[0], 2, generator=generator) @ torch.randn(2, weight.shape[1], generator=generator)
    return tuned


@pytest.fixture(scope="module")
def packs(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("packs")
    for name, (layer, module, seed) in {"add": (0, "mlp.down_proj", 1), "rev": (1, "self_attn.o_proj", 2),
                                        "sql": (1, "mlp.up_proj", 3)}.items():
        pack = sp.extract_skillpack(base, _skill(base, layer, module, seed), sp.SkillPackConfig(target_ratio=None, byte_budget=4096), progress=False)
        pack.save_pretrained(root / name)
    return {name: root / name for name in ("add", "rev", "sql")}


def _ids(tokenizer, texts):
    encoded = tokenizer(list(texts), return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


def _alone(base, pack_dir, ids, mask):
    model = sp.load_skillpack(copy.deepcopy(base), pack_dir).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_router_sends_each_prompt_to_its_pack(base, packs, tokenizer):
    first = {k: packs[k] for k in ("add", "rev")}
    fused = hf_graft.fuse(copy.deepcopy(base), first, router="top1",
                          prompts={k: PROMPTS[k] for k in first}, tokenizer=tokenizer)
    assert fused.skills == ["add", "rev"]
    for skill in first:
        ids, mask = _ids(tokenizer, PROMPTS[skill][:4])
        weights = fused.routing_weights(ids, mask)
        assert weights.argmax(-1).tolist() == [fused.skills.index(skill)] * 4
        with torch.no_grad():
            routed = fused(ids, mask).logits
        assert torch.allclose(routed, _alone(base, packs[skill], ids, mask), atol=1e-5, rtol=0)
    soft = hf_graft.fuse(copy.deepcopy(base), first, router="learned", prompts={k: PROMPTS[k] for k in first}, tokenizer=tokenizer)
    ids, mask = _ids(tokenizer, PROMPTS["add"][:3])
    weights = soft.routing_weights(ids, mask)
    assert torch.allclose(weights.sum(-1), torch.ones(3)) and (weights[:, 0] > 0.5).all()


def test_uniform_mixing_is_task_arithmetic(base, packs, tokenizer):
    fused = hf_graft.fuse(copy.deepcopy(base), {k: packs[k] for k in ("add", "rev")}, router="uniform")
    ids, mask = _ids(tokenizer, PROMPTS["rev"][:2])
    both = sp.load_skillpack(copy.deepcopy(base), packs["add"], adapter_name="add")
    both = sp.load_skillpack(both, packs["rev"], adapter_name="rev")
    both.base_model.set_adapter(["add", "rev"])
    with torch.no_grad():
        assert torch.allclose(fused(ids, mask).logits, both(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)


def test_adding_a_pack_leaves_earlier_ones_untouched(base, packs, tokenizer, tmp_path):
    fused = hf_graft.fuse(copy.deepcopy(base), {k: packs[k] for k in ("add", "rev")}, router="top1",
                          prompts={k: PROMPTS[k] for k in ("add", "rev")}, tokenizer=tokenizer)
    fused.save_pretrained(tmp_path / "before")
    probes = {k: _ids(tokenizer, PROMPTS[k][:4]) for k in ("add", "rev")}
    with torch.no_grad():
        before = {k: fused(*probes[k]).logits for k in probes}
    fused.add_skillpack(packs["sql"], name="sql", prompts=PROMPTS["sql"], tokenizer=tokenizer)
    fused.save_pretrained(tmp_path / "after")
    for skill in ("add", "rev"):
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            assert (tmp_path / "before" / skill / file).read_bytes() == (tmp_path / "after" / skill / file).read_bytes()
            assert (tmp_path / "after" / skill / file).read_bytes() == (packs[skill] / file).read_bytes()
        with torch.no_grad():
            assert torch.equal(fused(*probes[skill]).logits, before[skill])
    ids, mask = _ids(tokenizer, PROMPTS["sql"][:4])
    assert fused.routing_weights(ids, mask).argmax(-1).tolist() == [2] * 4
    assert "| sql |" in (tmp_path / "after" / "README.md").read_text()


def test_save_load_and_push_round_trip(base, packs, tokenizer, tmp_path, hub, repo_id):
    fused = hf_graft.fuse(copy.deepcopy(base), packs, router="learned", prompts=PROMPTS, tokenizer=tokenizer)
    ids, mask = _ids(tokenizer, PROMPTS["sql"][:2] + PROMPTS["add"][:2])
    with torch.no_grad():
        expected = fused(ids, mask).logits
    fused.save_pretrained(tmp_path / "fused")
    loaded = sp.FusedSkillPacks.from_pretrained(copy.deepcopy(base), tmp_path / "fused")
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask).logits, expected)
    fused.push_to_hub(repo_id)
    files = hub.files(repo_id)
    assert {"fusion_config.json", "router.safetensors", "README.md", "add/adapter_model.safetensors"} <= set(files)
    assert f'"{repo_id}"' in files["README.md"].decode()
    pulled = sp.FusedSkillPacks.from_pretrained(copy.deepcopy(base), repo_id)
    with torch.no_grad():
        assert torch.equal(pulled(ids, mask).logits, expected)


def test_damaged_fused_folders_are_refused(base, packs, tokenizer, tmp_path):
    fused = hf_graft.fuse(copy.deepcopy(base), packs, router="learned", prompts=PROMPTS, tokenizer=tokenizer)
    folder = tmp_path / "fused"
    fused.save_pretrained(folder)
    config = json.loads((folder / "fusion_config.json").read_text())
    assert config["router_digest"].startswith("sha256:")
    router = bytearray((folder / "router.safetensors").read_bytes())
    router[-2] ^= 0x01  # inside the router's stored tensors
    (folder / "router.safetensors").write_bytes(bytes(router))
    with pytest.raises(HfGraftError, match="router.safetensors is not the router these packs were saved with"):
        sp.FusedSkillPacks.from_pretrained(copy.deepcopy(base), folder)
    sp.FusedSkillPacks.from_pretrained(copy.deepcopy(base), folder, verify_integrity=False)
    for bad, message in [
        ({**config, "skills": ["../add"]}, "field 'skills' must list the packs' folder names"),
        ({**config, "skills": ["add", "add"]}, "each once"),
        ({**config, "router": 3}, "field 'router' must be one of learned, top1, uniform"),
        ({**config, "router_digest": 7}, "field 'router_digest'"),
        ([config], "must hold a JSON object"),
    ]:
        (folder / "fusion_config.json").write_text(json.dumps(bad))
        with pytest.raises(HfGraftError, match=message):
            sp.FusedSkillPacks.from_pretrained(copy.deepcopy(base), folder)
    (folder / "fusion_config.json").write_text(json.dumps(config)[:-9])
    with pytest.raises(HfGraftError, match="fusion_config.json is not valid JSON"):
        sp.FusedSkillPacks.from_pretrained(copy.deepcopy(base), folder)


def test_bad_fusions_fail_before_any_work(base, packs, tokenizer, tmp_path):
    torch.manual_seed(5)
    other = LlamaForCausalLM(base.config).eval()
    stranger = sp.extract_skillpack(other, _skill(other, 0, "mlp.down_proj", 9), sp.SkillPackConfig(target_ratio=None, byte_budget=4096), progress=False)
    stranger.save_pretrained(tmp_path / "stranger")
    with pytest.raises(HfGraftError, match=r"SkillPacks \['x'\] were extracted from different base models"):
        hf_graft.fuse(copy.deepcopy(base), {"add": packs["add"], "x": tmp_path / "stranger"})
    with pytest.raises(HfGraftError, match="router would be trained on fewer skills than packs: no prompts for \\['rev'\\]"):
        hf_graft.fuse(copy.deepcopy(base), {k: packs[k] for k in ("add", "rev")}, prompts={"add": PROMPTS["add"]}, tokenizer=tokenizer)
    with pytest.raises(HfGraftError, match="at least one prompt"):
        hf_graft.fuse(copy.deepcopy(base), {"add": packs["add"]}, prompts={"add": []}, tokenizer=tokenizer)
    with pytest.raises(HfGraftError, match="router must be one of"):
        hf_graft.fuse(copy.deepcopy(base), {"add": packs["add"]}, router="magic")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_static_merges_of_the_same_deltas(base, packs, tokenizer, method):
    from hf_graft.skillpack.merging import merge_skillpacks

    merged = merge_skillpacks(base, [packs["add"], packs["rev"]], method=method, density=0.5)
    ids, mask = _ids(tokenizer, PROMPTS["add"][:2])
    with torch.no_grad():
        out = merged(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    if method == "task_arithmetic":
        fused = hf_graft.fuse(copy.deepcopy(base), {k: packs[k] for k in ("add", "rev")}, router="uniform")
        with torch.no_grad():
            assert torch.allclose(out, fused(ids, mask).logits, atol=1e-5, rtol=0)
    else:  # pruning to half the entries moves the result away from plain task arithmetic
        plain = merge_skillpacks(base, [packs["add"], packs["rev"]], method="task_arithmetic")
        with torch.no_grad():
            assert not torch.allclose(out, plain(input_ids=ids, attention_mask=mask).logits, atol=1e-4)
    changed = {n for (n, a), (_, b) in zip(base.named_parameters(), merged.named_parameters()) if not torch.equal(a, b)}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"}
