"""SkillPack tuner layers: a module plus the packed delta(s) of one or more SkillPacks.

Each adapter's packed tensors live in a ``BufferDict`` (so ``state_dict``, ``save_pretrained``
and ``PeftModel.from_pretrained`` carry them as they are, bit-packed). The unmerged forward adds
the low-rank term ``x @ A.T @ B.T`` from factors dequantized once and cached; it never rebuilds
the full ``dW``. Merging adds ``dW`` to the base weight in place.
"""

from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .compression.formats import CompressedDelta, stored_layout


def _buffer_name(tensor_name: str) -> str:
    return tensor_name.replace(".", "_")


class SkillPackLayer(BaseTunerLayer):
    """What every SkillPack layer shares: storage, decoding with a cache, merging."""

    adapter_layer_names = ("skillpack_tensors",)
    other_param_names = ("skillpack_specs",)

    def __init__(self, base_layer: nn.Module, **kwargs):
        self.base_layer = base_layer
        self.skillpack_tensors = nn.ModuleDict()
        self.skillpack_specs: dict = {}
        self._decoded: dict = {}
        #: adapter -> ``[batch]`` weights scaling its delta per example (set by fusion); absent: 1.
        self.skillpack_mixing: dict = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.kwargs = kwargs
        self.register_load_state_dict_post_hook(_forget_decoded)

    def update_layer(self, adapter_name: str, spec: dict, compressed: Optional[dict] = None) -> None:
        """Allocate (or fill, from ``compressed``: part -> ``CompressedDelta``) an adapter's tensors.

        ``spec`` maps each stored part (``"weight"``, ``"bias"``) to its compression metadata.
        """
        weight = self.get_base_layer().weight
        buffers = BufferDict({}, persistent=True)
        for part, meta in spec.items():
            tensors = compressed[part].to_tensors(part) if compressed else None
            for name, (shape, dtype) in stored_layout(part, meta).items():
                value = tensors[name] if tensors else torch.zeros(shape, dtype=dtype)
                buffers[_buffer_name(name)] = value.to(weight.device)
        self.skillpack_tensors[adapter_name] = buffers
        self.skillpack_specs[adapter_name] = spec
        self._decoded.pop(adapter_name, None)
        self.set_adapter(self.active_adapters)

    def compressed(self, adapter_name: str, part: str) -> CompressedDelta:
        """One stored part of an adapter, validated against its metadata."""
        meta = self.skillpack_specs[adapter_name][part]
        buffers = self.skillpack_tensors[adapter_name]
        tensors = {name: buffers[_buffer_name(name)] for name in stored_layout(part, meta)}
        return CompressedDelta.from_tensors(part, tensors, meta)

    def decoded(self, adapter_name: str) -> dict:
        """The adapter's parts ready to compute with, dequantized once and cached.

        ``weight`` is ``(A, B)`` for a low-rank delta, a sparse COO matrix for a pruned one, a dense
        tensor otherwise; ``bias`` is dense. They follow the base weight's dtype and device: after
        ``model.to(torch.bfloat16)`` or a device move they are decoded again from the stored codes,
        which keep their own dtypes.
        """
        weight = self.get_base_layer().weight
        cached = self._decoded.get(adapter_name)
        if cached is None or cached[0] != (weight.dtype, weight.device):
            parts = {}
            for part in self.skillpack_specs[adapter_name]:
                delta = self.compressed(adapter_name, part)
                if delta.kind == "lowrank":
                    parts[part] = tuple(t.to(weight) for t in delta.lowrank())
                elif delta.kind == "sparse":
                    parts[part] = delta.delta().to(weight).to_sparse_coo().coalesce()
                else:
                    parts[part] = delta.delta().to(weight)
            cached = self._decoded[adapter_name] = ((weight.dtype, weight.device), parts)
        return cached[1]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``dW`` of one adapter, dense, in the base weight's layout and dtype (for merging)."""
        weight = self.get_base_layer().weight
        return self.compressed(adapter_name, "weight").delta().to(weight.dtype)

    def _bias_delta(self, adapter_name: str) -> Optional[torch.Tensor]:
        if "bias" not in self.skillpack_specs[adapter_name]:
            return None
        return self.compressed(adapter_name, "bias").delta()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
        """Add the active (or named) adapters' deltas to the base weights."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for name in adapter_names:
            if name not in self.skillpack_tensors:
                continue
            if "weight" in self.skillpack_specs[name]:
                delta = self.get_delta_weight(name)
                if safe_merge and not torch.isfinite(base.weight.data + delta).all():
                    raise ValueError(f"Merging SkillPack {name!r} gives non-finite weights; the pack is broken.")
                base.weight.data += delta
            bias = self._bias_delta(name)
            if bias is not None:
                base.bias.data += bias.to(base.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract merged deltas again, newest first."""
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if "weight" in self.skillpack_specs[name]:
                base.weight.data -= self.get_delta_weight(name)
            bias = self._bias_delta(name)
            if bias is not None:
                base.bias.data -= bias.to(base.bias.dtype)

    def _unmerged_adapters(self):
        return [name for name in self.active_adapters if name in self.skillpack_tensors]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self._unmerged_adapters():
            result = result + self._weighted_delta(name, x, result)
        return result

    def _weighted_delta(self, name: str, x: torch.Tensor, result: torch.Tensor, rows=None) -> torch.Tensor:
        """One adapter's change of the output for ``x``, scaled per example by a router's weights if set.

        ``rows`` (a 1-D index) says which examples of the whole batch ``x`` holds, for those weights.
        """
        delta = self._delta_output(x, self.decoded(name))
        weight = self.skillpack_mixing.get(name)
        if weight is not None:  # one weight per example: a router's R_i(x)
            weight = weight if rows is None else weight[rows.to(weight.device)]
            delta = delta * weight.to(result.dtype).reshape(-1, *([1] * (result.dim() - 1)))
        return delta

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list, **kwargs: Any) -> torch.Tensor:
        """Each example with its own pack (``"__base__"``: none), one pass per distinct pack over its rows."""
        if self.merged:
            raise ValueError("Cannot pass adapter_names while SkillPacks are merged; unmerge them first.")
        if x.shape[0] == 1 and len(adapter_names) > 1:  # one input shared by the batch (e.g. GPT-2's position ids)
            x = x.expand(len(adapter_names), *x.shape[1:])
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names needs one adapter name per example: got {len(adapter_names)} for {x.shape[0]}.")
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):
            if name not in self.skillpack_tensors or not self.decoded(name):  # "__base__", or a pack leaving it alone
                continue
            rows = torch.tensor([i for i, each in enumerate(adapter_names) if each == name], device=x.device)
            sub = x.index_select(0, rows)
            result = result.index_add(0, rows, self._weighted_delta(name, sub, result, rows).to(result.dtype))
        return result

    def __repr__(self) -> str:
        return "skillpack." + super().__repr__()


def _forget_decoded(module, incompatible_keys) -> None:
    module._decoded.clear()


class _SkillPackModule(nn.Module, SkillPackLayer):
    """A torch module wrapping ``base_layer``, created with its first SkillPack."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, spec: dict, compressed=None, **kwargs):
        super().__init__()
        SkillPackLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, spec, compressed)

    forward = SkillPackLayer.forward  # nn.Module's placeholder comes first in the MRO


class Linear(_SkillPackModule):
    """``nn.Linear`` or GPT-2's ``Conv1D`` (weight stored ``[in, out]``) with SkillPacks."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, spec: dict, compressed=None, **kwargs):
        super().__init__(base_layer, adapter_name, spec, compressed, **kwargs)
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)

    def _delta_output(self, x: torch.Tensor, parts: dict) -> torch.Tensor:
        weight = parts.get("weight")
        flat = x.reshape(-1, x.shape[-1]).to(self.get_base_layer().weight.dtype)
        if weight is None:  # only the bias changed enough to be stored
            out = parts["bias"].expand(flat.shape[0], -1)
            return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)
        if isinstance(weight, tuple):
            a, b = weight  # dW = B @ A, in the weight's own layout
            out = (flat @ b) @ a if self.fan_in_fan_out else (flat @ a.T) @ b.T
        elif weight.is_sparse:
            out = torch.sparse.mm(weight.T, flat.T).T if self.fan_in_fan_out else torch.sparse.mm(weight, flat.T).T
        else:
            out = flat @ weight if self.fan_in_fan_out else flat @ weight.T
        if "bias" in parts:
            out = out + parts["bias"]
        return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)


class Embedding(_SkillPackModule):
    """``nn.Embedding`` with SkillPacks: looked-up rows of ``dW`` are added, never the whole table."""

    def _delta_output(self, ids: torch.Tensor, parts: dict) -> torch.Tensor:
        weight = parts["weight"]
        if isinstance(weight, tuple):
            a, b = weight
            return F.embedding(ids, b) @ a
        if weight.is_sparse:
            rows = weight.index_select(0, ids.reshape(-1)).to_dense()
            return rows.reshape(*ids.shape, weight.shape[1])
        return F.embedding(ids, weight)


class Norm(_SkillPackModule):
    """A norm (LayerNorm, RMSNorm, ...) whose weight and bias deltas change its output additively.

    Norms are affine in their parameters, ``norm(x; p + d) = norm(x; p) + norm(x; d) - norm(x; 0)``,
    so under a router each pack adds its own term, weighted per example; without one, the deltas
    are added to the parameters and the norm runs once.
    """

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged or self.skillpack_mixing or "adapter_names" in kwargs:
            return SkillPackLayer.forward(self, x, *args, **kwargs)
        # Unweighted: one call with the deltas added to the parameters.
        base = self.get_base_layer()
        params = dict(base.named_parameters(recurse=False))
        for name in self._unmerged_adapters():
            for part, delta in self.decoded(name).items():
                params[part] = params[part] + delta
        return torch.func.functional_call(base, params, (x, *args), kwargs)

    def _delta_output(self, x, parts):
        base = self.get_base_layer()
        params = {name: torch.zeros_like(p) for name, p in base.named_parameters(recurse=False)}
        at_zero = torch.func.functional_call(base, params, (x,))
        shifted = {name: parts.get(name, value) for name, value in params.items()}
        return torch.func.functional_call(base, shifted, (x,)) - at_zero


class TiedLinear(Linear):
    """An output head whose weight is tied to a SkillPack'd embedding: it stores nothing of its own.

    The pack holds the shared matrix's delta once, on ``source`` (the embedding). Unmerged, this
    layer adds ``x @ dW.T`` from the source's decoded delta; merging is the source's job, as the
    weight is shared (the tuner refuses models where it is not).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, source: str, root: nn.Module, **kwargs):
        self.source = source
        # A plain attribute, not a submodule: the model contains this layer. deepcopy maps it consistently.
        object.__setattr__(self, "_root", root)
        super().__init__(base_layer, adapter_name, {}, None, **kwargs)

    def _source_layer(self) -> SkillPackLayer:
        layer = self._root.get_submodule(self.source)
        if not isinstance(layer, SkillPackLayer):
            raise ValueError(f"The SkillPack layer {self.source!r} this head is tied to is gone.")
        return layer

    def decoded(self, adapter_name: str) -> dict:
        source = self._source_layer()
        return {"weight": source.decoded(adapter_name)["weight"]} if adapter_name in source.skillpack_tensors else {}

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self._source_layer().get_delta_weight(adapter_name)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list] = None) -> None:
        """The source's merge changes the shared weight; this layer only records the merge."""
        self.merged_adapters.extend(name for name in check_adapters_to_merge(self, adapter_names) if name in self.skillpack_tensors)

    def unmerge(self) -> None:
        self.merged_adapters.clear()

    def _delta_output(self, x: torch.Tensor, parts: dict) -> torch.Tensor:
        return super()._delta_output(x, parts) if parts else torch.zeros((), dtype=x.dtype)
