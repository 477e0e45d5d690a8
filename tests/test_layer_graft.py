"""Layer grafting: GraftedModelForCausalLM on GPT-NeoX and Llama hosts, translators, specialisation, Hub."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

import hf_graft
from hf_graft import layers
from hf_graft.data import modular_addition, train_tokenizer
from hf_graft.errors import HfGraftError

SIZE = dict(vocab_size=300, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)


def make(family, seed, hidden=32):
    torch.manual_seed(seed)
    if family == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=hidden, **SIZE)).eval()
    return LlamaForCausalLM(LlamaConfig(hidden_size=hidden, num_key_value_heads=2, **SIZE)).eval()


IDS = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"{a} + {b} mod 4\nThe result is {(a + b) % 4}" for a in range(30) for b in range(30)]
    return train_tokenizer(texts + ["The quick brown fox jumps over the lazy dog."] * 50, vocab_size=300)


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_graft_runs_generates_with_cache_and_reloads_bit_exact(family, tmp_path):
    host, donor = make(family, 0), make(family, 1)
    grafted = hf_graft.GraftedModelForCausalLM.from_models(host, donor, donor_layer=1, position=2)
    assert grafted.host.config.num_hidden_layers == 4 and len(grafted.graft_blocks) == 1
    blocks = layers.decoder_layers(grafted.host)
    assert blocks[2] is grafted.graft_blocks[0]
    for before, after in ((0, 0), (1, 1), (2, 3)):  # host blocks keep their weights, shifted past the graft
        assert all(torch.equal(a, b) for a, b in zip(layers.decoder_layers(host)[before].parameters(), blocks[after].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(layers.decoder_layers(donor)[1].parameters(), blocks[2].block.parameters()))
    out = logits(grafted)
    assert out.shape == (2, 9, 300)
    with_cache = grafted.generate(IDS, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    without = grafted.generate(IDS, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(with_cache, without)

    grafted.save_pretrained(tmp_path)
    for auto in (AutoModelForCausalLM, AutoModel):
        assert torch.equal(logits(auto.from_pretrained(tmp_path).eval()), out)
    assert "layer graft" in (tmp_path / "README.md").read_text()


def test_identity_translators_around_the_hosts_own_block_repeat_it():
    host = make("llama", 0)
    grafted = hf_graft.GraftedModelForCausalLM.from_models(host, host, donor_layer=0, position=1)
    twice = copy.deepcopy(host)
    blocks = layers.decoder_layers(twice)
    twice.model.layers = torch.nn.ModuleList([blocks[0], copy.deepcopy(blocks[0]), blocks[1], blocks[2]])
    for index, block in enumerate(twice.model.layers):
        block.self_attn.layer_idx = index
    twice.config.num_hidden_layers = 4
    assert torch.allclose(logits(grafted), logits(twice), atol=1e-6, rtol=0)


def test_loads_with_trust_remote_code_where_hf_graft_is_absent(tmp_path):
    grafted = hf_graft.GraftedModelForCausalLM.from_models(make("gpt_neox", 0), make("gpt_neox", 1), donor_layer=0, position=1)
    grafted.save_pretrained(tmp_path / "model")
    save_file({"ids": IDS, "logits": logits(grafted)}, tmp_path / "io.safetensors")
    script = f"""
import sys
sys.modules["hf_graft"] = None
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
assert not type(model).__module__.startswith("hf_graft"), type(model).__module__
io = load_file({str(tmp_path / "io.safetensors")!r})
with torch.no_grad():
    assert torch.equal(model(input_ids=io["ids"]).logits, io["logits"])
print(model.generate(io["ids"], max_new_tokens=3, do_sample=False, pad_token_id=0).shape)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.Size([2, 12])" in result.stdout


def test_push_and_pull_through_the_hub(hub, repo_id):
    grafted = hf_graft.GraftedModelForCausalLM.from_models(make("llama", 0), make("llama", 1), donor_layer=2, position=3)
    grafted.push_to_hub(repo_id)
    assert {"config.json", "model.safetensors", "README.md", "modeling_grafted_causal_lm.py"} <= set(hub.files(repo_id))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(repo_id).eval()), logits(grafted))


def test_several_grafts_and_swap_block():
    host = make("llama", 0)
    first = hf_graft.GraftedModelForCausalLM.from_models(host, make("llama", 1), donor_layer=0, position=1)
    both = hf_graft.GraftedModelForCausalLM.add_graft(first, make("llama", 2), donor_layer=2, position=3)
    assert [g["position"] for g in both.config.grafts] == [1, 3] and both.host.config.num_hidden_layers == 5
    stack = list(layers.decoder_layers(both.host))
    assert [stack.index(block) for block in both.graft_blocks] == [1, 4]
    tuned = make("llama", 3)
    both.swap_block(tuned, graft=1)
    assert torch.equal(both.graft_blocks[1].block.self_attn.q_proj.weight, layers.decoder_layers(tuned)[2].self_attn.q_proj.weight)
    assert both.config.grafts[1]["block"] == "tuned" and both.config.grafts[0]["block"] == "vanilla"
    assert torch.equal(
        both.generate(IDS, max_new_tokens=5, do_sample=False, pad_token_id=0),
        both.generate(IDS, max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False),
    )


@pytest.mark.parametrize("loss", ["residual", "residual_kl", "logits"])
def test_translator_training_moves_only_the_stage_translator(loss, tokenizer):
    host, donor = make("gpt_neox", 0), make("gpt_neox", 1)
    grafted = hf_graft.GraftedModelForCausalLM.from_models(host, donor, donor_layer=1, position=2)
    data = layers.translator_batches(tokenizer, "mixed", task=modular_addition(n=4, train_size=64), corpus="the quick brown fox " * 200, batches=4, batch_size=4, seq_len=16)
    for stage, translator in (("pre", "pre"), ("post", "post")):
        before = {name: p.detach().clone() for name, p in grafted.named_parameters()}
        result = layers.train_translators(grafted, donor=donor, host=host, data=data, loss=loss, stages=[stage], steps=30, learning_rate=1e-2, progress=False)
        assert result[stage]["last"] < result[stage]["first"]
        changed = {name for name, p in grafted.named_parameters() if not torch.equal(p, before[name])}
        assert changed and all(f".{translator}." in name for name in changed), changed
    assert all(p.requires_grad for p in grafted.parameters())


def test_least_squares_translators_bridge_another_hidden_size(tokenizer):
    host, donor = make("llama", 0, hidden=32), make("llama", 1, hidden=48)
    with pytest.raises(ValueError, match="identity translators need equal hidden sizes.*least_squares"):
        hf_graft.GraftedModelForCausalLM.from_models(host, donor, donor_layer=0, position=1)
    grafted = hf_graft.GraftedModelForCausalLM.from_models(host, donor, donor_layer=0, position=1, translator_init="least_squares")
    data = layers.translator_batches(tokenizer, "corpus", corpus="the quick brown fox jumps " * 200, batches=4, batch_size=4, seq_len=16)
    block = grafted.graft_blocks[0]
    assert block.pre.weight.shape == (48, 32) and block.post.weight.shape == (32, 48)
    layers.fit_translators(grafted, donor=donor, host=host, data=data)
    entering = layers.translators._stream(grafted, block, "input", data)
    target = layers.translators._stream(donor, layers.decoder_layers(donor)[0], "input", data)
    fitted = torch.nn.functional.mse_loss(block.pre(entering), target)
    assert fitted < 0.5 * torch.nn.functional.mse_loss(torch.zeros_like(target), target)
    assert logits(grafted).shape == (2, 9, 300)


def test_bad_grafts_raise_one_clear_error():
    host, donor = make("llama", 0), make("llama", 1)
    with pytest.raises(ValueError, match="position 4 is outside the host, which has 3 blocks"):
        hf_graft.GraftedModelForCausalLM.from_models(host, donor, donor_layer=0, position=4)
    with pytest.raises(ValueError, match="donor layer 3 is outside the donor, which has 3 blocks"):
        hf_graft.GraftedModelForCausalLM.from_models(host, donor, donor_layer=3, position=1)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4))
    with pytest.raises(ValueError, match="supports hosts of the llama, gpt_neox, qwen2 families, got 'gpt2'"):
        hf_graft.GraftedModelForCausalLM.from_models(gpt2, gpt2, donor_layer=0, position=1)
    with pytest.raises(ValueError, match="a 'gpt_neox' block cannot be grafted into a 'llama' host"):
        hf_graft.GraftedModelForCausalLM.from_models(host, make("gpt_neox", 1), donor_layer=0, position=1)


def test_specialise_block_changes_that_block_only(tokenizer):
    model = make("llama", 0)
    task = modular_addition(n=4, train_size=64)
    tuned = layers.specialise_block(model, 1, task, tokenizer=tokenizer, schedule=hf_graft.causal_lm.Schedule(steps=5, batch_size=8, learning_rate=1e-2), progress=False)
    assert type(tuned) is type(model)
    changed = {name for (name, a), (_, b) in zip(model.named_parameters(), tuned.named_parameters()) if not torch.equal(a, b)}
    assert changed and all(name.startswith("model.layers.1.") for name in changed)
    assert not any("lora" in name for name, _ in tuned.named_parameters())
    with pytest.raises(HfGraftError, match="Layer 7 is outside the model, which has 3 blocks"):
        layers.specialise_block(model, 7, task, tokenizer=tokenizer)


def test_cli_specialise_graft_eval(tmp_path, tokenizer, capsys):
    from hf_graft_cli import main

    for name, seed in (("vanilla", 1), ("host", 0)):
        model = make("gpt_neox", seed)
        model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    assert main(["layers", "specialise", "--model", str(tmp_path / "vanilla"), "--layer", "1", "--out", str(tmp_path / "tuned"),
                 "--steps", "3"]) == 0
    assert main(["layers", "graft", "--host", str(tmp_path / "host"), "--donor", str(tmp_path / "vanilla"),
                 "--tuned", str(tmp_path / "tuned"), "--donor-layer", "1", "--position", "2", "--steps", "5",
                 "--out", str(tmp_path / "grafted")]) == 0
    grafted = AutoModelForCausalLM.from_pretrained(tmp_path / "grafted")
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    assert grafted.config.grafts[0]["block"] == "tuned"
    assert torch.equal(grafted.graft_blocks[0].block.attention.query_key_value.weight,
                       layers.decoder_layers(tuned)[1].attention.query_key_value.weight)
    capsys.readouterr()
    assert main(["layers", "eval", str(tmp_path / "grafted"), "--samples", "8"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"format_hard", "format_soft", "factual", "lexical_perplexity", "perplexity"}
    assert all(0 <= scores[k] <= 1 for k in ("format_hard", "format_soft", "factual"))
    assert main(["layers", "graft", "--host", str(tmp_path / "host"), "--donor", str(tmp_path / "vanilla"),
                 "--tuned", str(tmp_path / "tuned"), "--donor-layer", "1", "--position", "2", "--steps", "5",
                 "--gate", "--gate-steps", "5", "--out", str(tmp_path / "gated")]) == 0
    report = json.loads(capsys.readouterr().out)
    gated = AutoModelForCausalLM.from_pretrained(tmp_path / "gated")
    assert gated.config.grafts[0]["gate"] is True and gated.config.grafts[0]["openness"] == report["gate_openness"]
    assert set(report["gate_openness"]) == {"task", "general"} and report["gate_openness"]["task"]["tokens"] > 0
    assert "of general-text tokens" in (tmp_path / "gated" / "README.md").read_text()
    assert main(["layers", "graft", "--host", str(tmp_path / "host"), "--donor", str(tmp_path / "vanilla"),
                 "--donor-layer", "1", "--position", "9", "--out", str(tmp_path / "bad")]) == 2
    assert "position 9 is outside the host" in capsys.readouterr().err

    bare = tmp_path / "bare"  # a graft saved without its tokenizer
    AutoModelForCausalLM.from_pretrained(tmp_path / "grafted").save_pretrained(bare)
    assert main(["layers", "eval", str(bare), "--samples", "8"]) == 2
    assert "holds no tokenizer" in capsys.readouterr().err
    assert main(["layers", "eval", str(bare), "--samples", "8", "--tokenizer", str(tmp_path / "host")]) == 0


@pytest.mark.parametrize("gate", [False, True])
def test_text_generation_pipeline_from_the_saved_folder(tmp_path, tokenizer, gate):
    from transformers import pipeline

    grafted = hf_graft.GraftedModelForCausalLM.from_models(make("llama", 0), make("llama", 1), donor_layer=1, position=2, gate=gate)
    if gate:
        with torch.no_grad():  # a gate that opens on some tokens and not others
            grafted.graft_blocks[0].gate.score.weight.normal_(0, 2.0)
            grafted.graft_blocks[0].gate.score.bias.zero_()
    assert grafted.can_generate()
    grafted.save_pretrained(tmp_path, tokenizer=tokenizer)
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "generation_config.json").exists()
    generate = pipeline("text-generation", model=str(tmp_path))
    out = generate("3 + 4 mod 4", max_new_tokens=5, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    ids = tokenizer("3 + 4 mod 4", return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)  # as the pipeline passes it
    expected = grafted.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert [int(i) for i in out] == expected[0].tolist()


def test_text_generation_pipeline_with_trust_remote_code_where_hf_graft_is_absent(tmp_path, tokenizer):
    grafted = hf_graft.GraftedModelForCausalLM.from_models(make("gpt_neox", 0), make("gpt_neox", 1), donor_layer=0, position=1)
    grafted.save_pretrained(tmp_path / "model", tokenizer=tokenizer)
    ids = tokenizer("3 + 4 mod 4", return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)  # as the pipeline passes it
    expected = grafted.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)[0].tolist()
    script = f"""
import sys, json
sys.modules["hf_graft"] = None
from transformers import pipeline
for _ in range(2):  # a second load in the same process generates too
    generate = pipeline("text-generation", model={str(tmp_path / "model")!r}, trust_remote_code=True)
    out = generate("3 + 4 mod 4", max_new_tokens=4, do_sample=False, pad_token_id=0, return_tensors=True)
    print(json.dumps([int(i) for i in out[0]["generated_token_ids"]]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    assert [json.loads(line) for line in result.stdout.strip().splitlines()[-2:]] == [expected, expected]


def test_gradient_checkpointing_gives_the_same_gradients():
    grafted = hf_graft.GraftedModelForCausalLM.from_models(make("llama", 0), make("llama", 1), donor_layer=1, position=2)

    def gradients(model):
        model.train()
        model.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients(grafted)
    grafted.gradient_checkpointing_enable()
    assert grafted.is_gradient_checkpointing
    checkpointed = gradients(grafted)
    assert plain.keys() == checkpointed.keys() and any("pre" in name for name in plain)
    assert all(torch.allclose(plain[k], checkpointed[k], atol=1e-6) for k in plain)
    grafted.gradient_checkpointing_disable()
    assert not grafted.is_gradient_checkpointing
