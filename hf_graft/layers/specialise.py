"""Specialise one transformer block on a task: LoRA on that block only, trained, merged back."""

import copy
from typing import Optional

from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoTokenizer, PreTrainedModel

from ..causal_lm import Schedule, finetune
from ..data import Task
from ..errors import HfGraftError
from ..models.modeling_grafted_causal_lm import decoder_layers


def block_linear_names(model: nn.Module, layer: int) -> list:
    """Full names of the linear modules inside block ``layer`` of ``model``."""
    blocks = decoder_layers(model)
    if not (isinstance(layer, int) and 0 <= layer < len(blocks)):
        raise HfGraftError(f"Layer {layer!r} is outside the model, which has {len(blocks)} blocks (0 to {len(blocks) - 1}).")
    block = blocks[layer]
    prefix = next(name for name, module in model.named_modules() if module is block)
    return [f"{prefix}.{name}" for name, module in block.named_modules() if isinstance(module, nn.Linear)]


def specialise_block(
    model: PreTrainedModel,
    layer: int,
    task: Task,
    *,
    tokenizer=None,
    rank: int = 8,
    schedule: Optional[Schedule] = None,
    progress: bool = True,
) -> PreTrainedModel:
    """A copy of ``model`` whose block ``layer`` alone learned ``task``.

    LoRA adapters (peft) go on every linear module of that block and nowhere else; they are
    trained on ``task.train`` with the loss on the answers, then merged into the block, so the
    result is a plain model of the same architecture. ``tokenizer`` defaults to the model's own
    (``AutoTokenizer.from_pretrained(model.name_or_path)``).
    """
    if tokenizer is None:
        if not getattr(model, "name_or_path", None):
            raise HfGraftError("specialise_block needs the model's tokenizer: pass tokenizer=.")
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    targets = block_linear_names(model, layer)
    adapted = get_peft_model(
        copy.deepcopy(model), LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    )
    schedule = schedule or Schedule(steps=300, batch_size=32, learning_rate=2e-3, warmup_steps=20)
    finetune(adapted, tokenizer, task.train, schedule, progress=progress)
    return adapted.merge_and_unload().eval()
