"""``hf-graft skillpack ...``: the SkillPack commands, one per Python entry point.

    hf-graft skillpack extract --base B --tuned T --out DIR [--ratio 16] [--calibration none|SAMPLES.safetensors|generate|TEXT]
    hf-graft skillpack inspect PACK [--json]
    hf-graft skillpack apply PACK --base B --out DIR
    hf-graft skillpack export-lora PACK --out DIR [--base B]
    hf-graft skillpack push PACK REPO_ID

``PACK`` is a SkillPack folder or Hub repo id; ``B`` and ``T`` are model folders or Hub ids, and
``T`` may also be a LoRA adapter on ``B``. Two checkpoints are never loaded whole to compress them: a
data-free pack is made tensor by tensor, a calibrated one with the model run one decoder block at a
time (``--calibration generate`` loads each in turn to sample from it, offloading what does not fit).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from ..errors import BaseModelMismatchError, HfGraftError, is_network_error
from ..references import TOKENIZER_FILES, checked_reference

#: Relative error above which an exported LoRA module counts as lossy.
LOSSY_ERROR = 0.1


def run(args) -> None:
    """Run the parsed ``skillpack`` subcommand."""
    {
        "extract": _extract,
        "inspect": _inspect,
        "apply": _apply,
        "export-lora": _export_lora,
        "push": _push,
    }[args.skillpack_command](args)


def _load_model(reference: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    from ..references import TOKENIZER_FILES, checked_reference

    return AutoModelForCausalLM.from_pretrained(checked_reference(reference), dtype=getattr(torch, dtype)).eval()


def _is_lora(reference: str) -> bool:
    path = os.path.join(reference, "adapter_config.json")
    if os.path.isdir(reference):
        return os.path.isfile(path)
    from ..references import TOKENIZER_FILES, checked_reference

    checked_reference(reference, "tuned model or LoRA adapter")
    from huggingface_hub import file_exists
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        return file_exists(reference, "adapter_config.json")
    except (HfHubHTTPError, HFValidationError, OSError):  # let the model loader report a bad id or no network
        return False


def _extract(args) -> None:
    from . import SkillPackConfig, extract_skillpack

    config = SkillPackConfig(
        target_ratio=None if args.bytes else args.ratio, byte_budget=args.bytes, distill_steps=args.distill_steps,
        calibration_samples=args.calibration_samples,
    )
    if not _is_lora(args.tuned):  # read tensor by tensor (data-free) or block by block (calibrated): load nothing
        checked_reference(args.base)
        checked_reference(args.tuned)
        batches = _calibration(args, args.tokenizer or args.base)
        pack = extract_skillpack(args.base, args.tuned, config, calibration=batches, output_dir=args.out, device=args.device)
        measured = pack.config.measured
        if os.environ.get("RANK", "0") != "0":  # under accelerate launch: the main process reports
            return
    else:
        pack = _extract_loaded(args, config)
        measured = pack.peft_config["default"].measured
    print(
        f"SkillPack written to {args.out}: {measured['stored_bytes']:,} bytes, "
        f"{measured['compression_ratio']:.1f}x smaller than the bf16 delta, "
        f"relative error {measured['relative_error']:.4f}"
    )
    if args.push_to_hub:
        print(f"pushed: {_push_folder(args.out, args.push_to_hub)}")


def _extract_loaded(args, config):
    """A pack of a LoRA adapter's deltas, extracted on the loaded base and saved."""
    from . import extract_skillpack

    base = _load_model(args.base, args.dtype)
    tuned = args.tuned
    batches = _calibration(args, args.tokenizer or args.base)
    pack = extract_skillpack(base, tuned, config, calibration=batches, copy_base=False, device=args.device)
    pack.save_pretrained(args.out)
    return pack


def _calibration(args, tokenizer_source: str):
    """What ``--calibration`` names for ``extract_skillpack``: ``None`` (``none``), ``"generate"``,
    a ``.safetensors`` file of samples, or texts as batches of token ids, tokenized with
    ``tokenizer_source``'s tokenizer."""
    if args.calibration == "none":
        return None
    if args.calibration == "generate" or args.calibration.endswith(".safetensors"):
        return args.calibration
    from transformers import AutoTokenizer

    from .extraction.calibration_data import calibration_batches, calibration_texts

    advice = ("pass --tokenizer NAME_OR_FOLDER, save the tokenizer files beside the checkpoint, "
              "or --calibration none for a data-free pack.")
    folder = os.path.expanduser(str(tokenizer_source))
    if os.path.isdir(folder) and not any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES):
        raise HfGraftError(f"No usable tokenizer in {tokenizer_source} for the calibration text (no tokenizer files): {advice}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except (OSError, ValueError, ImportError) as error:
        if is_network_error(error):
            raise
        raise HfGraftError(f"No usable tokenizer in {tokenizer_source} for the calibration text ({type(error).__name__}): {advice}") from None
    texts = calibration_texts(args.calibration, args.calibration_column)
    return calibration_batches(tokenizer, texts, args.calibration_samples, args.calibration_length)


def _inspect(args) -> None:
    from ..reporting import markdown_table
    from .files import read_skillpack

    pack = read_skillpack(args.pack)
    rows = pack.summary()
    if args.json:
        print(json.dumps({"measured": pack.config.measured, "modules": rows}, indent=2))
        return
    print(markdown_table(rows))
    measured = pack.config.measured
    total = f"{len(rows)} deltas, {pack.nbytes:,} bytes"
    if "compression_ratio" in measured:
        total += f", {measured['compression_ratio']:.1f}x smaller than the bf16 delta"
    if "relative_error" in measured:
        total += f", relative error {measured['relative_error']:.4f}"
    print(f"\n{total}; base {pack.config.base_model_name_or_path or '(not recorded)'}")


def _base_of(args, pack) -> str:
    base = args.base or pack.config.base_model_name_or_path
    if not base:
        raise HfGraftError("The pack does not name its base model: pass --base.")
    return base


def _apply(args) -> None:
    import torch

    from .checkpoint_merge import merge_into_checkpoint
    from .files import read_skillpack

    pack = read_skillpack(args.pack)
    base = _base_of(args, pack)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        merge_into_checkpoint(pack, base, args.out, dtype=dtype, check_base_fingerprint=not args.no_check_base, device=args.device)
    except BaseModelMismatchError as error:
        raise HfGraftError(str(error).replace("pass check_base_fingerprint=False", "pass --no-check-base")) from None
    from ..references import TOKENIZER_FILES

    copied = any(os.path.isfile(os.path.join(args.out, name)) for name in TOKENIZER_FILES)
    print(f"merged model {'and tokenizer ' if copied else ''}written to {args.out}" + ("" if copied else f" ({base} has no tokenizer to copy)"))


def _export_lora(args) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .files import read_skillpack
    from .lora_export import export_lora

    pack = read_skillpack(args.pack)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(_base_of(args, pack)))
    report = export_lora(pack, skeleton, args.out, sparse_rank=args.sparse_rank, dtype=args.dtype)
    print(f"LoRA adapter written to {args.out}: {report.nbytes:,} bytes, {len(report.exact)} modules exact")
    for name, error in sorted(report.approximated.items()):
        print(f"  approximated at rank {report.ranks[name]}: {name} (relative error {error:.4f})")
    for name in report.left_out:
        print(f"  left out (LoRA cannot express it): {name}")
    for head, source in sorted(report.tied.items()):
        print(f"  tied: {head} shares {source}'s factors; untie {head} before merge_and_unload() (peft adds it twice)")
    lossy = report.lossy(LOSSY_ERROR)
    if lossy and not args.allow_lossy:
        raise HfGraftError(
            f"{len(lossy)} module(s) lost more than {LOSSY_ERROR:.0%} of their delta in the LoRA ({', '.join(sorted(lossy))}). "
            f"Raise --sparse-rank (a delta is exact at its smaller side) or pass --allow-lossy to accept it."
        )


def _push(args) -> None:
    if not os.path.isdir(args.pack):
        raise HfGraftError(f"{args.pack} is not a folder: push takes a SkillPack folder written by extract.")
    print(f"pushed: {_push_folder(args.pack, args.repo_id, private=args.private or None)}")


def _push_folder(pack_dir: str, repo_id: str, *, private=None):
    """Upload a SkillPack folder's two files with a fresh model card, in one commit."""
    from huggingface_hub import HfApi

    from ..hub import write_skillpack_card
    from .files import CONFIG_NAME, WEIGHTS_NAME, read_skillpack

    pack = read_skillpack(pack_dir)
    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(os.path.join(pack_dir, name), os.path.join(folder, name))
        write_skillpack_card(pack.card_data(), folder, repo_id=repo_id)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload SkillPack")
