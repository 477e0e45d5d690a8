"""Reading SkillPack files: one clear error per kind of damage, and fuzzed files that never escape it."""

import base64
import copy
import json
import pickle
import struct
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from transformers import LlamaConfig, LlamaForCausalLM

import hf_graft.skillpack as sp
from fuzzing import byte_mutations, json_values, mutate
from hf_graft.errors import HfGraftError
from hf_graft.skillpack.config import decode_layout, encode_layout
from hf_graft.skillpack.integrity import PAYLOAD_KEY

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
    assert all(row["relative_error"] is None for row in rows)  # per-module figures are on the card, not in the files
    ours = sp.load_skillpack(copy.deepcopy(base), pack_dir).eval()
    peft_loaded = PeftModel.from_pretrained(copy.deepcopy(base), pack_dir).eval()
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, peft_loaded(IDS).logits)


def test_the_files_hold_a_compact_layout_and_the_card_the_figures(base, tmp_path):
    model = sp.extract_skillpack(base, _tuned(base), sp.SkillPackConfig(target_ratio=1.3), progress=False)
    errors = model.peft_config["default"].measured["module_errors"]
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG).read_text())
    assert "layout" in config and not {"module_specs", "tied_modules", "objective", "formats"} & set(config)  # defaults are not written
    assert "module_errors" not in config["measured"]
    with safe_open(tmp_path / WEIGHTS, "pt") as f:
        assert list(f.keys()) == [PAYLOAD_KEY]
    card = (tmp_path / "README.md").read_text()
    assert errors and all(f"{error:.4f}" in card for error in errors.values())
    read = sp.read_skillpack(tmp_path)
    assert read.config.module_specs == model.peft_config["default"].module_specs
    assert read.config.objective == "output" and read.config.inference_mode


def test_a_pack_saved_one_tensor_per_delta_still_loads(base, pack_dir, damaged):
    stored = dict(sp.read_skillpack(pack_dir).tensors())
    save_file(stored, damaged / WEIGHTS, metadata={"format": "pt"})  # as earlier versions and peft's own writer save it
    pack = sp.read_skillpack(damaged)
    assert pack.digest == sp.read_skillpack(pack_dir).digest
    with torch.no_grad():
        assert torch.equal(PeftModel.from_pretrained(copy.deepcopy(base), damaged)(IDS).logits,
                           PeftModel.from_pretrained(copy.deepcopy(base), pack_dir)(IDS).logits)
    stored.popitem()
    save_file(stored, damaged / WEIGHTS)
    with pytest.raises(HfGraftError, match="lacks expected tensor"):
        sp.read_skillpack(damaged)


def test_weights_are_written_payload_by_payload_as_safetensors_writes_them(pack_dir, tmp_path):
    pack = sp.read_skillpack(pack_dir)
    stored = pack.tensors()
    assert len(stored) == sum(len(parts) for parts in pack.deltas.values()) > 5
    written = (pack_dir / WEIGHTS).read_bytes()
    assert written == save({PAYLOAD_KEY: torch.cat([stored[key] for key in sorted(stored)])}, metadata={"format": "pt"})
    assert stored.file_bytes({"format": "pt"}) == len(written)
    pack.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS).read_bytes() == written


def test_tensors_are_written_in_safetensors_order_for_every_dtype(tmp_path):
    from hf_graft.safetensors_io import in_safetensors_order
    from hf_graft.sharded import write_shard

    dtypes = [torch.uint8, torch.int8, torch.bool, torch.float16, torch.bfloat16, torch.int16, torch.float32, torch.int32, torch.int64, torch.float64]
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t{i % 3}.{name}": torch.randn(2, i + 1, generator=generator).to(dtype) for i, (name, dtype) in enumerate(zip("qwertyuiop", dtypes))}
    layout = in_safetensors_order((name, t.dtype, tuple(t.shape)) for name, t in tensors.items())
    write_shard(tmp_path / "t.safetensors", layout, tensors.__getitem__, {"note": "é"})  # one key: older safetensors order several at random
    assert (tmp_path / "t.safetensors").read_bytes() == save(tensors, metadata={"note": "é"})


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
    _rewrite(damaged / WEIGHTS, lambda t: t.__setitem__(PAYLOAD_KEY, t[PAYLOAD_KEY].view(torch.int8)))
    with pytest.raises(HfGraftError, match="dtype"):
        sp.read_skillpack(damaged)


def test_wrong_shape_in_header(damaged):
    _rewrite(damaged / WEIGHTS, lambda t: t.__setitem__(PAYLOAD_KEY, t[PAYLOAD_KEY][:-1].clone()))
    with pytest.raises(HfGraftError, match="shape"):
        sp.read_skillpack(damaged)


def test_missing_tensor(damaged):
    _rewrite(damaged / WEIGHTS, lambda t: t.__setitem__("other", t.pop(PAYLOAD_KEY)))
    with pytest.raises(HfGraftError, match="missing|lacks"):
        sp.read_skillpack(damaged)


def test_peft_loader_gets_the_same_checks(base, damaged):
    _rewrite(damaged / WEIGHTS, lambda t: t.__setitem__(PAYLOAD_KEY, torch.cat([t[PAYLOAD_KEY], t[PAYLOAD_KEY][:1]])))
    with pytest.raises(HfGraftError, match=r"adapter_model.safetensors: tensor .* has shape \(\d+,\) where"):
        PeftModel.from_pretrained(copy.deepcopy(base), damaged)


def test_config_of_another_adapter_type(damaged):
    config = json.loads((damaged / CONFIG).read_text())
    config["peft_type"] = "LORA"
    (damaged / CONFIG).write_text(json.dumps(config))
    with pytest.raises(HfGraftError, match="'LORA' adapter, but its folder holds a SkillPack"):
        sp.read_skillpack(damaged)


def _unpacked(config: dict) -> dict:
    """A saved config with its layout written out as ``module_specs`` and ``tied_modules`` (as earlier versions saved them)."""
    config = dict(config)
    config["module_specs"], config["tied_modules"] = decode_layout(config.pop("layout"))
    return config


def test_metadata_that_contradicts_the_file(damaged):
    config = _unpacked(json.loads((damaged / CONFIG).read_text()))
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
    _damage_weights(pack_dir, damaged, data)
    _read_or_clear_error(damaged)


def _damage_weights(pack_dir, damaged, data) -> None:
    """Write a copy of the pack's weights file with one to four byte edits (half aimed at its header)."""
    original = (pack_dir / WEIGHTS).read_bytes()
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    content = bytearray(original)
    for mutation in data.draw(st.lists(byte_mutations(header_end, len(original)), min_size=1, max_size=4)):
        content = mutate(content, mutation)
    (damaged / WEIGHTS).write_bytes(bytes(content))


_META_KEYS = ["kind", "shape", "rank", "scheme", "group_size", "count", "format", "new"]
_META_VALUES = st.one_of(
    json_values,
    st.sampled_from(["lowrank", "sparse", "dense_fp16", "indices", "bitmap"]),
    st.lists(st.integers(-2, 70), max_size=3),
    st.lists(st.lists(st.integers(-1, 9), min_size=2, max_size=2), max_size=3),
)


_CONFIG_FIELDS = ["module_specs", "tied_modules", "sparse_modules", "target_ratio", "byte_budget", "measured",
                  "peft_type", "calibration_samples", "distill_steps", "objective", "formats", "compensation",
                  "base_fingerprint", "tensor_digest", "task_type", "inference_mode", "base_model_name_or_path",
                  "revision", "auto_mapping", "peft_version", "target_modules"]


def _damage_config(pack_dir, damaged, data) -> None:
    """Write a copy of the pack's config with metadata entries and fields changed or removed, then
    up to two byte edits of its text."""
    config = _unpacked(json.loads((pack_dir / CONFIG).read_text()))
    modules = sorted(config["module_specs"])
    for _ in range(data.draw(st.integers(0, 3))):
        meta = config["module_specs"][data.draw(st.sampled_from(modules))]["weight"]
        meta[data.draw(st.sampled_from(_META_KEYS))] = data.draw(_META_VALUES)
    for _ in range(data.draw(st.integers(0, 2))):
        field = data.draw(st.sampled_from(_CONFIG_FIELDS))
        if data.draw(st.booleans()):
            config.pop(field, None)
        else:
            config[field] = data.draw(json_values)
    text = bytearray(json.dumps(config).encode())
    if data.draw(st.booleans()):  # as saved: the layout deflated
        config["layout"] = encode_layout(config.pop("module_specs", {}), config.pop("tied_modules", {}))
    text = bytearray(json.dumps(config).encode())
    for mutation in data.draw(st.lists(byte_mutations(len(text), len(text)), max_size=2)):
        text = mutate(text, mutation)
    (damaged / CONFIG).write_bytes(bytes(text))


@_FUZZ
@given(data=st.data())
def test_fuzzed_config(pack_dir, damaged, data):
    _damage_config(pack_dir, damaged, data)
    _read_or_clear_error(damaged)



# Integrity: the digest recorded at save time, verified on every load path users take.

REFUSED = r"adapter_model.safetensors is not the file this SkillPack was saved with.*verify_integrity=False"


def _flip_payload_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # inside the last stored tensor's packed bytes
    path.write_bytes(bytes(data))


def test_digest_is_recorded_the_same_by_both_writers_and_shown_on_the_card(base, pack_dir, tmp_path):
    recorded = json.loads((pack_dir / CONFIG).read_text())["tensor_digest"]
    assert recorded.startswith("sha256:") and len(recorded) == 71
    sp.load_skillpack(copy.deepcopy(base), pack_dir).save_pretrained(tmp_path / "resaved")  # peft's writer
    assert json.loads((tmp_path / "resaved" / CONFIG).read_text())["tensor_digest"] == recorded
    assert (tmp_path / "resaved" / WEIGHTS).read_bytes() == (pack_dir / WEIGHTS).read_bytes()
    assert recorded in (tmp_path / "resaved" / "README.md").read_text()
    assert recorded in (pack_dir / "README.md").read_text()
    assert sp.read_skillpack(pack_dir).digest == recorded


def test_flipped_payload_byte_is_refused_on_every_load_path(base, pack_dir, damaged):
    _flip_payload_byte(damaged / WEIGHTS)
    with pytest.raises(HfGraftError, match=REFUSED):
        PeftModel.from_pretrained(copy.deepcopy(base), damaged)
    with pytest.raises(HfGraftError, match=REFUSED):
        sp.load_skillpack(copy.deepcopy(base), damaged)
    with pytest.raises(HfGraftError, match=REFUSED):
        sp.read_skillpack(damaged)
    model = PeftModel.from_pretrained(copy.deepcopy(base), pack_dir)
    with pytest.raises(HfGraftError, match=REFUSED):
        model.load_adapter(damaged, adapter_name="second")


def test_auto_peft_model_refuses_a_damaged_pack(base, damaged, tmp_path):
    from peft import AutoPeftModelForCausalLM

    base.save_pretrained(tmp_path / "base")
    config = json.loads((damaged / CONFIG).read_text())
    config["base_model_name_or_path"] = str(tmp_path / "base")
    (damaged / CONFIG).write_text(json.dumps(config))
    AutoPeftModelForCausalLM.from_pretrained(damaged, dtype=torch.float32)  # the base path is not in the digest
    _flip_payload_byte(damaged / WEIGHTS)
    with pytest.raises(HfGraftError, match=REFUSED):
        AutoPeftModelForCausalLM.from_pretrained(damaged, dtype=torch.float32)
    (damaged / CONFIG).write_text(json.dumps(config)[:-40])
    with pytest.raises(HfGraftError, match=r"adapter_config.json is not valid JSON"):
        AutoPeftModelForCausalLM.from_pretrained(damaged, dtype=torch.float32)


def test_verify_integrity_false_loads_the_damaged_file(base, pack_dir, damaged):
    _flip_payload_byte(damaged / WEIGHTS)
    clean = PeftModel.from_pretrained(copy.deepcopy(base), pack_dir).eval()
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), damaged, verify_integrity=False).eval()
    ours = sp.load_skillpack(copy.deepcopy(base), damaged, verify_integrity=False).eval()
    with torch.no_grad():
        assert not torch.equal(loaded(IDS).logits, clean(IDS).logits)  # the damage is real, and was let through
        assert torch.equal(loaded(IDS).logits, ours(IDS).logits)


def test_a_file_cannot_turn_the_checks_off(base, damaged):
    config = json.loads((damaged / CONFIG).read_text())
    config["verify_integrity"] = False
    (damaged / CONFIG).write_text(json.dumps(config))
    _flip_payload_byte(damaged / WEIGHTS)
    with pytest.raises(HfGraftError, match=REFUSED):
        PeftModel.from_pretrained(copy.deepcopy(base), damaged)


def test_pickled_weights_are_refused_by_peft_loading_too(base, damaged):
    (damaged / WEIGHTS).unlink()
    (damaged / "adapter_model.bin").write_bytes(b"not opened")
    with pytest.raises(HfGraftError, match="pickled adapter_model.bin, which is never read"):
        PeftModel.from_pretrained(copy.deepcopy(base), damaged)


@pytest.mark.parametrize(
    ("field", "value", "wanted"),
    [
        ("target_ratio", "16", "a number greater than 1"),
        ("target_ratio", 0.5, "a number greater than 1"),
        ("byte_budget", 1.5, "a positive integer"),
        ("module_specs", [], "an object of module names"),
        ("tied_modules", {"lm_head": 3}, "an object of module names"),
        ("measured", {"compression_ratio": "big"}, "a positive number"),
        ("measured", {"module_errors": []}, "an object of module names to numbers"),
        ("base_fingerprint", "abc", "64 hex digits"),
        ("tensor_digest", "md5:00", "'sha256:' and 64 hex digits"),
        ("task_type", 3, "one of SEQ_CLS"),
        ("inference_mode", "yes", "true or false"),
        ("sparse_modules", "embed_tokens", "a list of module name suffixes"),
    ],
)
def test_config_fields_of_the_wrong_type_name_the_field_on_peft_loading(base, damaged, field, value, wanted):
    config = json.loads((damaged / CONFIG).read_text())
    if field in ("module_specs", "tied_modules"):
        config = _unpacked(config)
    config[field] = value
    (damaged / CONFIG).write_text(json.dumps(config))
    message = rf"adapter_config.json: field '{field}'.* must be {wanted}.*download the pack again"
    with pytest.raises(HfGraftError, match=message):
        PeftModel.from_pretrained(copy.deepcopy(base), damaged)
    with pytest.raises(HfGraftError, match=message):
        sp.read_skillpack(damaged)
    with pytest.raises(HfGraftError, match=rf"SkillPackConfig: field '{field}'.* must be {wanted}"):
        sp.SkillPackConfig(**{field: value})


@pytest.mark.parametrize(
    ("layout", "problem"),
    [
        ("not base64!", "base64"),
        (base64.b64encode(b"not deflated").decode(), "incorrect header check|invalid"),
        (base64.b64encode(zlib.compress(b'{"module_specs":{}}')).decode(), "exactly module_specs and tied_modules"),
        (base64.b64encode(zlib.compress(b" " * (65 << 20))).decode(), "does not inflate to a whole layout within 64 MiB"),
        (3, "not a string"),
    ],
)
def test_a_damaged_layout_is_named(base, damaged, layout, problem):
    config = json.loads((damaged / CONFIG).read_text())
    config["layout"] = layout
    (damaged / CONFIG).write_text(json.dumps(config))
    for load in (sp.read_skillpack, lambda folder: PeftModel.from_pretrained(copy.deepcopy(base), folder)):
        with pytest.raises(HfGraftError, match=rf"adapter_config.json: field 'layout' is not a SkillPack layout \(.*({problem})"):
            load(damaged)
    config["module_specs"] = {}
    (damaged / CONFIG).write_text(json.dumps(config))
    with pytest.raises(HfGraftError, match="holds both a layout and module_specs"):
        sp.read_skillpack(damaged)


def test_a_damaged_config_is_still_recognised_by_its_weights(base, damaged):
    text = (damaged / CONFIG).read_text()
    (damaged / CONFIG).write_text(text.replace('"SKILLPACK"', '"SKILLPAXK"'))
    with pytest.raises(HfGraftError, match="'SKILLPAXK' adapter, but its folder holds a SkillPack"):
        PeftModel.from_pretrained(copy.deepcopy(base), damaged)
    (damaged / CONFIG).write_text(text[: len(text) // 3])
    with pytest.raises(HfGraftError, match="adapter_config.json is not valid JSON"):
        PeftModel.from_pretrained(copy.deepcopy(base), damaged)


# Fuzzing the users' path: PeftModel.from_pretrained and one forward either refuse a damaged pack
# with hf-graft's error or give exactly the clean pack's outputs.


@pytest.fixture(scope="module")
def clean_logits(base, pack_dir):
    with torch.no_grad():
        return PeftModel.from_pretrained(copy.deepcopy(base), pack_dir).eval()(IDS).logits


def _peft_load_refused_or_unchanged(base, path, clean_logits) -> None:
    try:
        model = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
        with torch.no_grad():
            logits = model(IDS).logits
    except HfGraftError:
        return
    assert torch.equal(logits, clean_logits), "a damaged pack loaded and changed the outputs"


_PEFT_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_PEFT_FUZZ
@given(data=st.data())
def test_fuzzed_weights_through_peft(base, pack_dir, damaged, clean_logits, data):
    _damage_weights(pack_dir, damaged, data)
    _peft_load_refused_or_unchanged(base, damaged, clean_logits)


@_PEFT_FUZZ
@given(data=st.data())
def test_fuzzed_config_through_peft(base, pack_dir, damaged, clean_logits, data):
    _damage_config(pack_dir, damaged, data)
    _peft_load_refused_or_unchanged(base, damaged, clean_logits)
