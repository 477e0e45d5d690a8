"""``hf-graft skillpack ...`` end to end on saved tiny models: extract, inspect, apply, export-lora, push."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import hf_graft.skillpack as sp
from hf_graft_cli import main
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


def test_the_plain_extract_never_loads_a_model(models, tmp_path, capsys, monkeypatch):
    """A calibrated pack from two checkpoint folders: made one decoder block at a time, no model ever loaded."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    argv = ["skillpack", "extract", "--base", str(models["base"]), "--tuned", str(models["tuned"]), "--out", str(tmp_path / "pack"),
            "--ratio", "3", "--calibration", "pydoc", "--calibration-samples", "6", "--calibration-length", "32", "--distill-steps", "5"]
    assert main(argv) == 0
    assert "x smaller than the bf16 delta" in capsys.readouterr().out
    pack = sp.read_skillpack(tmp_path / "pack")
    assert pack.config.calibration_samples == 6 and pack.config.measured["distill_loss"] is not None
    assert pack.config.measured["compression_ratio"] >= 3


def test_extract_from_folders_without_a_tokenizer_says_what_to_pass(models, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(models["base"] / name, bare / name)
    argv = ["skillpack", "extract", "--base", str(bare), "--tuned", str(models["tuned"]), "--out", str(tmp_path / "pack"),
            "--ratio", "3", "--calibration", "pydoc", "--calibration-samples", "6", "--calibration-length", "32"]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and f"No usable tokenizer in {bare}" in error[0]
    assert "--tokenizer" in error[0] and "--calibration none" in error[0]
    assert main([*argv, "--tokenizer", str(models["base"])]) == 0
    written = sp.read_skillpack(tmp_path / "pack").config
    assert written.calibration_samples == 6
    assert written.distill_steps == 0 and written.measured["distill_loss"] is None  # blocks are not distilled unless asked


def test_extract_from_lora_then_export_lora(models, tmp_path, capsys):
    pack_dir, lora_dir = tmp_path / "pack", tmp_path / "lora"
    assert main(["skillpack", "extract", "--base", str(models["base"]), "--tuned", str(models["lora"]),
                 "--out", str(pack_dir), "--ratio", "1.5", "--calibration", "pydoc"]) == 0
    assert sp.read_skillpack(pack_dir).config.distill_steps == 200  # loaded models: end to end unless told
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


@pytest.fixture(scope="module")
def embedding_pack(models, tmp_path_factory):
    """A pack whose embedding and head change in a few rows (as a new skill's tokens do): sparse deltas."""
    root = tmp_path_factory.mktemp("embedding")
    base = AutoModelForCausalLM.from_pretrained(models["base"])
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        tuned.model.embed_tokens.weight[10:40] += 0.05 * torch.randn(30, 32, generator=generator)
        tuned.lm_head.weight[10:40] += 0.05 * torch.randn(30, 32, generator=generator)
        tuned.model.layers[0].mlp.down_proj.weight += 0.01 * torch.randn(32, 64, generator=generator)
    tuned.save_pretrained(root / "tuned")
    assert main(["skillpack", "extract", "--base", str(models["base"]), "--tuned", str(root / "tuned"),
                 "--out", str(root / "pack"), "--ratio", "2", "--calibration", "none"]) == 0
    return root / "pack"


def test_export_lora_is_exact_where_the_rank_allows_and_refuses_lossy_output(models, embedding_pack, tmp_path, capsys):
    pack = sp.read_skillpack(embedding_pack)
    assert {pack.config.module_specs[m]["weight"]["kind"] for m in ("model.embed_tokens", "lm_head")} <= {"sparse", "quant"}
    exact = tmp_path / "exact"
    assert main(["skillpack", "export-lora", str(embedding_pack), "--out", str(exact), "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "approximated" not in out
    base = AutoModelForCausalLM.from_pretrained(models["base"])
    lora = PeftModel.from_pretrained(copy.deepcopy(base), exact).merge_and_unload()
    merged = sp.load_skillpack(copy.deepcopy(base), embedding_pack).merge_and_unload()
    for name in ("model.embed_tokens", "lm_head"):
        want = merged.get_submodule(name).weight - base.get_submodule(name).weight
        got = lora.get_submodule(name).weight - base.get_submodule(name).weight
        assert (got - want).norm() <= 1e-5 * want.norm(), name  # the embedding change survives, exactly

    lossy = tmp_path / "lossy"
    assert main(["skillpack", "export-lora", str(embedding_pack), "--out", str(lossy), "--sparse-rank", "2"]) == 2
    captured = capsys.readouterr()
    assert "approximated at rank 2: model.embed_tokens" in captured.out
    assert "--allow-lossy" in captured.err and "model.embed_tokens" in captured.err
    assert main(["skillpack", "export-lora", str(embedding_pack), "--out", str(lossy), "--sparse-rank", "2", "--allow-lossy"]) == 0


def test_missing_paths_and_unreachable_hub_say_so_in_one_line(models, tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "no" / "such" / "model")
    assert main(["skillpack", "extract", "--base", missing, "--tuned", str(models["tuned"]), "--out", str(tmp_path / "p")]) == 2
    assert capsys.readouterr().err.strip() == f"hf-graft: error: The folder {missing} does not exist (and it is not a Hub repo id like org/name)."
    assert main(["vision", "eval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a folder without config.json" in err and len(err.strip().splitlines()) == 1
    assert main(["layers", "eval", missing]) == 2
    assert "does not exist" in capsys.readouterr().err
    import huggingface_hub

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    pack_dir = tmp_path / "pack"
    assert main(["skillpack", "extract", "--base", str(models["base"]), "--tuned", str(models["tuned"]),
                 "--out", str(pack_dir), "--ratio", "3", "--calibration", "none"]) == 0
    capsys.readouterr()
    assert main(["skillpack", "push", str(pack_dir), "someone/pack"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-graft: error: the Hub at http://127.0.0.1:9 cannot be reached") and "\n" not in err


def test_apply_to_another_base_names_the_cli_flag(models, embedding_pack, tmp_path, capsys):
    other = AutoModelForCausalLM.from_pretrained(models["base"])
    with torch.no_grad():
        for param in other.parameters():
            param.add_(0.01 * torch.randn_like(param))
    other.save_pretrained(tmp_path / "other")
    argv = ["skillpack", "apply", str(embedding_pack), "--base", str(tmp_path / "other"), "--out", str(tmp_path / "m")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "another base model" in err and "--no-check-base" in err and "check_base_fingerprint" not in err
    assert main(argv + ["--no-check-base"]) == 0


def test_extract_calibrated_on_samples_of_the_tuned_model_or_a_file_of_them(models, tmp_path, capsys):
    """--calibration generate samples the tuned checkpoint; the same samples saved to a file make the same pack."""
    from hf_graft.skillpack.extraction.generated import checkpoint_calibration, save_calibration

    common = ["--base", str(models["base"]), "--tuned", str(models["tuned"]), "--ratio", "3", "--calibration-samples", "4"]
    assert main(["skillpack", "extract", *common, "--out", str(tmp_path / "generated"), "--calibration", "generate"]) == 0
    generated = sp.read_skillpack(tmp_path / "generated")
    assert generated.config.calibration_samples == 4
    save_calibration(tmp_path / "samples.safetensors", checkpoint_calibration(str(models["base"]), str(models["tuned"]), 4, 128, progress=False))
    assert main(["skillpack", "extract", *common, "--out", str(tmp_path / "file"), "--calibration", str(tmp_path / "samples.safetensors")]) == 0
    assert (tmp_path / "generated" / "adapter_model.safetensors").read_bytes() == (tmp_path / "file" / "adapter_model.safetensors").read_bytes()
    assert main(["skillpack", "extract", *common, "--out", str(tmp_path / "free")]) == 0  # the default: data-free
    assert sp.read_skillpack(tmp_path / "free").config.calibration_samples == 0
