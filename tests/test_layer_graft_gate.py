"""Gated layer grafts: the host as itself where the gate is shut, saved and reloaded with it, trained to open on the task."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import hf_graft
from hf_graft import layers
from hf_graft.errors import HfGraftError
from test_layer_graft import IDS, logits, make


def _gated(family="llama"):
    return hf_graft.GraftedModelForCausalLM.from_models(make(family, 0), make(family, 1), donor_layer=1, position=2, gate=True)


@pytest.mark.parametrize("family", ["gpt_neox", "llama"])
def test_a_shut_gate_is_the_host_and_an_open_one_the_graft(family):
    host = make(family, 0)
    gated = hf_graft.GraftedModelForCausalLM.from_models(host, make(family, 1), donor_layer=1, position=2, gate=True)
    plain = hf_graft.GraftedModelForCausalLM.from_models(host, make(family, 1), donor_layer=1, position=2)
    assert gated.config.grafts[0]["gate"] is True and "gate" not in plain.config.grafts[0]
    gate = gated.graft_blocks[0].gate
    assert float(gate.score.bias.detach()) == gate.OPEN_LOGIT and not gate.score.weight.any()  # starts open: 0.982
    with torch.no_grad():
        gate.score.bias.fill_(-60.0)
    torch.testing.assert_close(logits(gated), logits(host), atol=1e-5, rtol=0)
    with torch.no_grad():
        gate.score.bias.fill_(60.0)
    torch.testing.assert_close(logits(gated), logits(plain), atol=1e-5, rtol=0)


def test_gated_grafts_reload_bit_exact_and_generate_with_the_cache(tmp_path):
    gated = _gated()
    with torch.no_grad():
        gated.graft_blocks[0].gate.score.weight.normal_()
    out = logits(gated)
    gated.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(again), out)
    assert again.config.grafts[0]["gate"] is True
    with_cache = again.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(with_cache, again.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0))
    save_file({"ids": IDS, "logits": out}, tmp_path / "io.safetensors")
    script = f"""
import sys
sys.modules["hf_graft"] = None
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
io = load_file({str(tmp_path / "io.safetensors")!r})
with torch.no_grad():
    assert torch.equal(model(input_ids=io["ids"]).logits, io["logits"])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


def test_the_gate_learns_to_open_on_the_task_and_shut_on_general_text(tmp_path):
    """Task batches draw on tokens 0-7, general text on 200-215: the gate, linear in the host's stream, tells them apart."""
    host = make("llama", 0)
    gated = hf_graft.GraftedModelForCausalLM.from_models(host, make("llama", 1), donor_layer=1, position=2, gate=True)
    generator = torch.Generator().manual_seed(0)
    task = [torch.randint(0, 8, (4, 12), generator=generator) for _ in range(4)]
    general = [torch.randint(200, 216, (4, 12), generator=generator) for _ in range(4)]
    frozen = {name: p.clone() for name, p in gated.named_parameters() if ".gate." not in name}
    result = layers.train_gate(gated, task_data=task, general_data=general, steps=150, progress=False)
    assert result["last"] < 0.5 * result["first"]
    assert all(torch.equal(p, frozen[name]) for name, p in gated.named_parameters() if name in frozen)  # only the gate moved
    on_task, off_task = layers.gate_openness(gated, task), layers.gate_openness(gated, general)
    assert on_task["tokens"] == off_task["tokens"] == 4 * 4 * 12
    assert on_task["mean"] > 0.9 and on_task["open_share"] > 0.95
    assert off_task["mean"] < 0.2 and off_task["open_share"] < 0.1
    assert layers.record_openness(gated, task, general) == {"task": on_task, "general": off_task}
    gated.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    share = f"open on {100 * on_task['open_share']:.0f}% of task tokens, {100 * off_task['open_share']:.0f}% of general-text tokens"
    assert share in card
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.grafts[0]["openness"] == {"task": on_task, "general": off_task}


def test_a_gate_can_learn_the_openness_labels_alone():
    """match_outputs=False: a classifier of task against general text, blind to what the graft changes."""
    gated = _gated()
    generator = torch.Generator().manual_seed(0)
    task = [torch.randint(0, 8, (4, 12), generator=generator) for _ in range(4)]
    general = [torch.randint(200, 216, (4, 12), generator=generator) for _ in range(4)]
    layers.train_gate(gated, task_data=task, general_data=general, steps=100, match_outputs=False, progress=False)
    assert layers.gate_openness(gated, task)["open_share"] > 0.95 and layers.gate_openness(gated, general)["open_share"] < 0.05
    with pytest.raises(HfGraftError, match="> 0 without match_outputs"):
        layers.train_gate(gated, task_data=task, general_data=general, match_outputs=False, openness_weight=0.0)


def test_two_gated_grafts_route_each_task_to_its_own_graft():
    """Task A draws on tokens 0-7, task B on 100-107, general text on 200-215: trained together, each gate opens on its own task."""
    host = make("llama", 0)
    one = hf_graft.GraftedModelForCausalLM.from_models(host, make("llama", 1), donor_layer=1, position=2, gate=True)
    both = hf_graft.GraftedModelForCausalLM.add_graft(one, make("llama", 2), donor_layer=0, position=1, gate=True)
    assert [g["gate"] for g in both.config.grafts] == [True, True]
    generator = torch.Generator().manual_seed(0)
    task_a, task_b, general = ([torch.randint(low, low + width, (4, 12), generator=generator) for _ in range(4)]
                               for low, width in ((0, 8), (100, 8), (200, 16)))
    result = layers.train_gates(both, task_data={0: task_a, 1: task_b}, general_data=general, steps=200, progress=False)
    assert result["last"] < 0.5 * result["first"]
    share = {(graft, name): layers.gate_openness(both, data, graft)["open_share"]
             for graft in (0, 1) for name, data in (("a", task_a), ("b", task_b), ("general", general))}
    assert share[0, "a"] > 0.95 and share[1, "b"] > 0.95
    assert max(share[0, "b"], share[0, "general"], share[1, "a"], share[1, "general"]) < 0.1
    with pytest.raises(HfGraftError, match="needs task batches for each graft"):
        layers.train_gates(both, task_data={0: task_a, 1: []}, general_data=general)


def test_gate_errors_name_what_to_do():
    plain = hf_graft.GraftedModelForCausalLM.from_models(make("llama", 0), make("llama", 1), donor_layer=1, position=2)
    with pytest.raises(HfGraftError, match="has no gate: graft it with gate=True"):
        layers.gate_openness(plain, [IDS])
    with pytest.raises(HfGraftError, match="graft must be between 0 and 0"):
        layers.gate_openness(_gated(), [IDS], graft=1)
    config = _gated().config.to_dict()
    config["grafts"][0]["gate"] = "yes"
    with pytest.raises(ValueError, match="gate must be true or false"):
        hf_graft.GraftedCausalLMConfig(**{k: v for k, v in config.items() if k in ("host_config", "grafts")})
