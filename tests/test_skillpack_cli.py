"""``hf-graft skillpack ...`` end to end on saved tiny models: extract, inspect, apply, export-lora, push."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_graft.skillpack as sp
from hf_graft.cli import main
from hf_graft.data import train_tokenizer

IDS = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Folders of a base, a fully tuned copy and a LoRA on the base, with a tokenizer."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = train_tokenizer(["The result is 42.", "def f(x): return x + 1", "Hello world"] * 20, vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).eval()
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if param.dim() == 2 and "embed" not in name and "lm_head" not in name:
                param += 0.05 * torch.randn(param.shape[0], 2, generator=generator) @ torch.randn(2, param.shape[1], generator=generator)
    paths = {name: root / name for name in ("base", "tuned", "lora")}
    for name, model in (("base", base), ("tuned", tuned)):
        model.save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(paths["lora"])
    return paths


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def test_extract_calibrated_inspect_apply(models, tmp_path, capsys):
    pack_dir, merged_dir = tmp_path / "pack", tmp_path / "merged"
    argv = ["skillpack", "extract", "--base", str(models["base"]), "--tuned", str(models["tuned"]), "--out", str(pack_dir),
            "--ratio", "3", "--calibration", "pydoc", "--calibration-samples", "6", "--calibration-length", "32"]
    assert main(argv) == 0
    assert "x smaller than the bf16 delta" in capsys.readouterr().out
    pack = sp.read_skillpack(pack_dir)
    assert pack.config.calibration_samples == 6
    assert pack.config.measured["compression_ratio"] >= 3
    assert pack.config.base_model_name_or_path == str(models["base"])

    assert main(["skillpack", "inspect", str(pack_dir)]) == 0
    table = capsys.readouterr().out
    assert "| model.layers.0.self_attn.q_proj | weight |" in table and "smaller than the bf16 delta" in table
    assert main(["skillpack", "inspect", str(pack_dir), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert len(listing["modules"]) == len(pack.summary())

    assert main(["skillpack", "apply", str(pack_dir), "--out", str(merged_dir)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    unmerged = sp.load_skillpack(AutoModelForCausalLM.from_pretrained(models["base"]), pack_dir)
    assert torch.allclose(_logits(merged), _logits(unmerged), atol=1e-5, rtol=0)
    assert (merged_dir / "tokenizer.json").exists()


def test_extract_from_lora_then_export_lora(models, tmp_path, capsys):
    pack_dir, lora_dir = tmp_path / "pack", tmp_path / "lora"
    assert main(["skillpack", "extract", "--base", str(models["base"]), "--tuned", str(models["lora"]),
                 "--out", str(pack_dir), "--ratio", "1.5"]) == 0
    assert sorted(sp.read_skillpack(pack_dir).deltas) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    )
    assert main(["skillpack", "export-lora", str(pack_dir), "--out", str(lora_dir), "--dtype", "float32"]) == 0
    assert "LoRA adapter written" in capsys.readouterr().out
    base = AutoModelForCausalLM.from_pretrained(models["base"])
    exported = PeftModel.from_pretrained(copy.deepcopy(base), lora_dir)
    original = PeftModel.from_pretrained(copy.deepcopy(base), models["lora"])
    drift = (_logits(exported) - _logits(original)).norm() / (_logits(base) - _logits(original)).norm()
    assert drift < 0.05


def test_push_writes_the_card_with_the_repo_id(models, tmp_path, hub, repo_id, capsys):
    pack_dir = tmp_path / "pack"
    assert main(["skillpack", "extract", "--base", str(models["base"]), "--tuned", str(models["tuned"]),
                 "--out", str(pack_dir)]) == 0
    assert main(["skillpack", "push", str(pack_dir), repo_id]) == 0
    files = hub.files(repo_id)
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    assert f'PeftModel.from_pretrained(base, "{repo_id}")' in files["README.md"].decode()
    loaded = sp.load_skillpack(AutoModelForCausalLM.from_pretrained(models["base"]), repo_id)
    assert torch.equal(_logits(loaded), _logits(sp.load_skillpack(AutoModelForCausalLM.from_pretrained(models["base"]), pack_dir)))


def test_bad_input_exits_with_one_message(models, tmp_path, capsys):
    assert main(["skillpack", "inspect", str(tmp_path)]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err
    assert main(["skillpack", "extract", "--base", str(models["base"]), "--tuned", str(models["base"]),
                 "--out", str(tmp_path / "p")]) == 2
    assert "no skill to extract" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    with pytest.raises(SystemExit):
        main(["skillpack", "extract", "--base", "b", "--tuned", "t", "--out", "o", "--ratio", "4", "--bytes", "10"])
