"""Reading SkillPack files: one clear error per kind of damage, and fuzzed files that never escape it."""

import copy
import json
import pickle
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import hf_graft.skillpack as sp
from fuzzing import byte_mutations, json_values, mutate
from hf_graft.errors import HfGraftError

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
IDS = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(0))


def _tuned(base):
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "mlp" in name:  # full rank: stored quantized directly
                param += 0.05 * torch.randn(param.shape, generator=generator)
            elif param.dim() == 2 and "embed" not in name and "lm_head" not in name:
                param += 0.05 * torch.randn(param.shape[0], 2, generator=generator) @ torch.randn(2, param.shape[1], generator=generator)
            elif param.dim() == 2:
                param[:3] += 0.05 * torch.randn(3, param.shape[1], generator=generator)
            else:
                param += 0.01 * torch.randn(param.shape, generator=generator)
    return tuned


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def pack_dir(base, tmp_path_factory):
    path = tmp_path_factory.mktemp("pack")
    sp.extract_skillpack(base, _tuned(base), sp.SkillPackConfig(target_ratio=1.3), progress=False).save_pretrained(path)
    return path


@pytest.fixture
def damaged(pack_dir, tmp_path):
    """A fresh copy of the pack folder to damage."""
    for name in (CONFIG, WEIGHTS):
        (tmp_path / name).write_bytes((pack_dir / name).read_bytes())
    return tmp_path


def test_read_skillpack_matches_what_peft_loads(base, pack_dir):
    pack = sp.read_skillpack(pack_dir)
    files = sum((pack_dir / name).stat().st_size for name in (CONFIG, WEIGHTS))
    assert pack.nbytes < files == pack.config.measured["stored_bytes"]
    rows = pack.summary()
    assert {row["kind"] for row in rows} == {"quant", "lowrank", "sparse", "dense_fp16"}  # every format is fuzzed
    assert all(row["relative_error"] is not None and row["relative_error"] < 1 for row in rows)
    ours = sp.load_skillpack(copy.deepcopy(base), pack_dir).eval()
    peft_loaded = PeftModel.from_pretrained(copy.deepcopy(base), pack_dir).eval()
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, peft_loaded(IDS).logits)


def test_load_skillpack_adds_a_second_pack_by_name(base, pack_dir):
    model = sp.load_skillpack(copy.deepcopy(base), pack_dir, adapter_name="one")
    model = sp.load_skillpack(model, pack_dir, adapter_name="two")
    assert set(model.peft_config) == {"one", "two"}
    with pytest.raises(HfGraftError, match="already holds an adapter named 'two'"):
        sp.load_skillpack(model, pack_dir, adapter_name="two")


def test_pickled_weights_are_refused_and_never_opened(damaged, tmp_path_factory):
    marker = tmp_path_factory.mktemp("marker") / "executed"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (damaged / WEIGHTS).unlink()
    (damaged / "adapter_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(HfGraftError, match="pickled adapter_model.bin, which is never read.*safetensors only"):
        sp.read_skillpack(damaged)
    assert not marker.exists()


def test_truncated_weights_file(damaged):
    data = (damaged / WEIGHTS).read_bytes()
    (damaged / WEIGHTS).write_bytes(data[: len(data) - 7])
    with pytest.raises(HfGraftError, match="truncated|corrupt"):
        sp.read_skillpack(damaged)


def _rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_wrong_dtype_in_header(damaged):
    key = next(k for k in load_file(damaged / WEIGHTS) if k.endswith(".weight"))
    _rewrite(damaged / WEIGHTS, lambda t: t.__setitem__(key, t[key].float()))
    with pytest.raises(HfGraftError, match="dtype"):
        sp.read_skillpack(damaged)


def test_wrong_shape_in_header(damaged):
    key = next(k for k in load_file(damaged / WEIGHTS) if k.endswith(".weight"))
    _rewrite(damaged / WEIGHTS, lambda t: t.__setitem__(key, t[key][:-1].clone()))
    with pytest.raises(HfGraftError, match="shape"):
        sp.read_skillpack(damaged)


def test_missing_tensor(damaged):
    key = next(k for k in load_file(damaged / WEIGHTS) if k.endswith(".weight"))
    _rewrite(damaged / WEIGHTS, lambda t: t.pop(key))
    with pytest.raises(HfGraftError, match="missing|lacks"):
        sp.read_skillpack(damaged)


def test_peft_loader_gets_the_same_checks(base, damaged):
    key = next(k for k in load_file(damaged / WEIGHTS) if k.endswith(".weight"))
    _rewrite(damaged / WEIGHTS, lambda t: t.__setitem__(key, torch.cat([t[key], t[key][:1]])))
    with pytest.raises(HfGraftError, match=r"config needs torch.uint8"):
        PeftModel.from_pretrained(copy.deepcopy(base), damaged)


def test_config_of_another_adapter_type(damaged):
    config = json.loads((damaged / CONFIG).read_text())
    config["peft_type"] = "LORA"
    (damaged / CONFIG).write_text(json.dumps(config))
    with pytest.raises(HfGraftError, match="'LORA' adapter, not a SkillPack"):
        sp.read_skillpack(damaged)


def test_metadata_that_contradicts_the_file(damaged):
    config = json.loads((damaged / CONFIG).read_text())
    module, parts = next((m, p) for m, p in config["module_specs"].items() if p["weight"]["kind"] == "lowrank")
    parts["weight"]["rank"] += 1
    (damaged / CONFIG).write_text(json.dumps(config))
    with pytest.raises(HfGraftError):
        sp.read_skillpack(damaged)


def test_not_a_folder_nor_a_repo(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(HfGraftError, match="is a file"):
        sp.read_skillpack(tmp_path / "file.txt")
    with pytest.raises(HfGraftError, match="holds no adapter_config.json"):
        sp.read_skillpack(tmp_path)


# Fuzzing: whatever the bytes or the metadata, read_skillpack returns a checked pack or raises HfGraftError.


def _read_or_clear_error(path) -> None:
    try:
        pack = sp.read_skillpack(path)
    except HfGraftError:
        return
    for parts in pack.deltas.values():
        for delta in parts.values():
            assert tuple(delta.delta().shape) == delta.shape


_FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(data=st.data())
def test_fuzzed_weights_bytes(pack_dir, damaged, data):
    original = (pack_dir / WEIGHTS).read_bytes()
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    content = bytearray(original)
    for mutation in data.draw(st.lists(byte_mutations(header_end, len(original)), min_size=1, max_size=4)):
        content = mutate(content, mutation)
    (damaged / WEIGHTS).write_bytes(bytes(content))
    _read_or_clear_error(damaged)


_META_KEYS = ["kind", "shape", "rank", "scheme", "group_size", "count", "format", "new"]
_META_VALUES = st.one_of(
    json_values,
    st.sampled_from(["lowrank", "sparse", "dense_fp16", "indices", "bitmap"]),
    st.lists(st.integers(-2, 70), max_size=3),
    st.lists(st.lists(st.integers(-1, 9), min_size=2, max_size=2), max_size=3),
)


@_FUZZ
@given(data=st.data())
def test_fuzzed_config(pack_dir, damaged, data):
    config = json.loads((pack_dir / CONFIG).read_text())
    modules = sorted(config["module_specs"])
    for _ in range(data.draw(st.integers(0, 3))):
        meta = config["module_specs"][data.draw(st.sampled_from(modules))]["weight"]
        meta[data.draw(st.sampled_from(_META_KEYS))] = data.draw(_META_VALUES)
    for _ in range(data.draw(st.integers(0, 2))):
        field = data.draw(st.sampled_from(["module_specs", "tied_modules", "sparse_modules", "target_ratio",
                                           "byte_budget", "measured", "peft_type", "calibration_samples"]))
        config[field] = data.draw(json_values)
    text = bytearray(json.dumps(config).encode())
    for mutation in data.draw(st.lists(byte_mutations(len(text), len(text)), max_size=2)):
        text = mutate(text, mutation)
    (damaged / CONFIG).write_bytes(bytes(text))
    _read_or_clear_error(damaged)
