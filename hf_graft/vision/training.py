"""One ``accelerate`` training loop for the donor baseline and the graft.

The graft learns with cross-entropy plus knowledge distillation from the donor's logits
(Hinton et al.: KL between temperature-softened distributions, scaled by T^2). The loop
checkpoints after every epoch (safetensors + JSON, no pickle) and resumes from the last one, so
a killed run loses at most one epoch; ``accelerate launch`` runs the same loop on many GPUs.
"""

import math
import os
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .. import metrics
from ..checkpoint import load_training_state, save_from_main
from ..errors import HfGraftError


@dataclass
class TrainingArguments:
    """Settings of one training run.

    Args:
        output_dir: where checkpoints go (``<output_dir>/checkpoint``).
        epochs: passes over the training set.
        batch_size: per-process batch size.
        learning_rate, weight_decay: AdamW settings; the rate follows a cosine decay.
        distill_weight: share of the distillation term in the loss, in [0, 1] (0: plain CE).
        distill_temperature: softmax temperature of the distillation term.
        scion_lr_scale: the scion (donor layers) trains at this fraction of ``learning_rate``: it
            already holds the donor's features, and the head's large early steps would wreck
            them (VGG without batch norm collapses to one class at the head's rate).
        seed: seeds initialisation-independent randomness (data order, dropout).
        resume: continue from ``<output_dir>/checkpoint`` when it exists.
    """

    output_dir: str
    epochs: int = 5
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    distill_weight: float = 0.5
    distill_temperature: float = 4.0
    scion_lr_scale: float = 0.1
    seed: int = 0
    resume: bool = True
    eval_batch_size: int = 256

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise HfGraftError("epochs and batch_size must be at least 1.")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise HfGraftError(f"distill_weight must be in [0, 1], got {self.distill_weight}.")
        if self.distill_temperature <= 0:
            raise HfGraftError(f"distill_temperature must be positive, got {self.distill_temperature}.")


class _Indexed(Dataset):
    """Adds each item's index, so cached teacher logits can be looked up per sample."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        pixels, label = self.dataset[index]
        return pixels, label, index


def _parameter_groups(model, args: TrainingArguments) -> list:
    """Trainable parameters; a graft's scion in its own group at ``scion_lr_scale`` of the rate."""
    scion = getattr(model, "scion", None)
    scion_ids = {id(p) for p in scion.parameters()} if scion is not None else set()
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in scion_ids]
    scion_params = [p for p in scion.parameters() if p.requires_grad] if scion is not None else []
    if not rest and not scion_params:
        raise HfGraftError("The model has no trainable parameters.")
    groups = [{"params": rest}] if rest else []
    if scion_params:
        groups.append({"params": scion_params, "lr": args.learning_rate * args.scion_lr_scale})
    return groups


def distillation_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened distributions, times T^2."""
    return (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )


class _TeacherCache:
    """The teacher's logits per training sample, computed once (training data is not augmented).

    A batch with any new sample runs through the teacher whole, so a sample's logits do not depend
    on which of its batch-mates were seen before (a resumed run gets the same bits).
    """

    def __init__(self, teacher, size: int, device):
        self.teacher = teacher.to(device).eval()
        self.logits: Optional[torch.Tensor] = None
        self.known = torch.zeros(size, dtype=torch.bool)

    @torch.no_grad()
    def __call__(self, pixels, indices):
        indices = indices.cpu()
        missing = ~self.known[indices]
        if missing.any():
            fresh = self.teacher(pixels).logits.float().cpu()
            if self.logits is None:
                self.logits = torch.zeros(len(self.known), fresh.shape[-1])
            self.logits[indices[missing]] = fresh[missing]
            self.known[indices[missing]] = True
        return self.logits[indices].to(pixels.device)


@torch.no_grad()
def evaluate_classifier(model, dataset, batch_size: int = 256, accelerator: Optional[Accelerator] = None) -> dict:
    """Accuracy (through the ``accuracy`` evaluate module) and mean cross-entropy on a dataset."""
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size))
    model = model.to(accelerator.device)
    was_training = model.training
    model.eval()
    accuracy = metrics.load("accuracy")
    loss_sum, count = 0.0, 0
    for pixels, labels in loader:
        logits = model(pixels).logits
        loss = F.cross_entropy(logits, labels, reduction="sum")
        logits, labels, loss = accelerator.gather_for_metrics((logits, labels, loss.reshape(1)))
        accuracy.add_batch(predictions=logits.argmax(-1).cpu(), references=labels.cpu())
        loss_sum += float(loss.sum())
        count += len(labels)
    model.train(was_training)
    return {"accuracy": float(accuracy.compute()["accuracy"]), "loss": loss_sum / max(count, 1)}


def train_classifier(
    model,
    train_set,
    val_set,
    args: TrainingArguments,
    teacher=None,
    accelerator: Optional[Accelerator] = None,
    description: str = "train",
) -> list:
    """Train ``model`` (an image classifier returning ``.logits``); return the per-epoch history.

    With ``teacher`` the loss is ``(1 - w) * CE + w * T^2 * KL``; without, plain CE.
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    checkpoint_dir = os.path.join(args.output_dir, "checkpoint")
    optimizer = torch.optim.AdamW(_parameter_groups(model, args), lr=args.learning_rate, weight_decay=args.weight_decay)
    # A trailing partial batch is dropped (the order changes every epoch, so no sample is left
    # out for good): batch norm, as in a graft's head, cannot train on a batch of one.
    drop_last = len(train_set) >= args.batch_size
    batches = len(train_set) // args.batch_size if drop_last else 1
    steps_per_epoch = math.ceil(batches / accelerator.num_processes)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    history, start_epoch = [], 0
    if args.resume and os.path.isdir(checkpoint_dir):
        state = load_training_state(checkpoint_dir, model, optimizer, scheduler)
        history, start_epoch = state["history"], state["epoch"]
        accelerator.print(f"{description}: resumed from {checkpoint_dir} after epoch {start_epoch}")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    cache = _TeacherCache(teacher, len(train_set), accelerator.device) if teacher is not None else None

    for epoch in range(start_epoch, args.epochs):
        order = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        loader = accelerator.prepare(
            DataLoader(
                _Indexed(train_set), batch_size=args.batch_size, shuffle=True, generator=order, drop_last=drop_last
            )
        )
        model.train()
        totals = torch.zeros(3)  # loss sum, correct, seen
        bar = tqdm(loader, desc=f"{description} epoch {epoch + 1}/{args.epochs}", disable=not accelerator.is_main_process, leave=False)
        for pixels, labels, indices in bar:
            logits = model(pixels).logits
            loss = F.cross_entropy(logits, labels)
            if cache is not None and args.distill_weight > 0:
                soft = distillation_loss(logits, cache(pixels, indices), args.distill_temperature)
                loss = (1 - args.distill_weight) * loss + args.distill_weight * soft
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            totals += torch.tensor([loss.item() * len(labels), (logits.argmax(-1) == labels).sum().item(), len(labels)])
            bar.set_postfix(loss=f"{totals[0] / totals[2]:.4f}")
        totals = accelerator.reduce(totals.to(accelerator.device), reduction="sum").cpu()
        val = evaluate_classifier(model, val_set, args.eval_batch_size, accelerator)
        record = {
            "epoch": epoch + 1,
            "train_loss": float(totals[0] / totals[2]),
            "train_accuracy_running": float(totals[1] / totals[2]),
            "val_accuracy": val["accuracy"],
            "val_loss": val["loss"],
        }
        history.append(record)
        accelerator.print(
            f"{description} epoch {epoch + 1}/{args.epochs}: loss {record['train_loss']:.4f}  "
            f"val acc {record['val_accuracy']:.4f}  val loss {record['val_loss']:.4f}"
        )
        save_from_main(accelerator, checkpoint_dir, model, optimizer, scheduler,
                       state={"epoch": epoch + 1, "history": history, "args": asdict(args)})
    return history
