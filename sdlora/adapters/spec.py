"""The adapter type of a run, as one object: which layers it adapts at which rank, how it is injected, how many
parameters it trains, what its files say about it. The loop, the UI and export ask this object; none of them branches
on the type.

  lora / locon   PEFT LoRA (`locon` = also the ResNet blocks, kohya's conv set; `lora` with conv_rank is the same)
  loha / lokr    LyCORIS Hadamard / Kronecker products
  dora           weight-decomposed LoRA (magnitude per input column, as the files store it), through LyCORIS
LoRA/LoCon with rank or module dropout also run through LyCORIS, which implements them as kohya defines them. The
LyCORIS types train with sdlora's fast subclasses of its modules (`lycoris_layer.lycoris_class`): same parameters and
files, no full-size weight kept per layer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from torch import nn

from .rules import NETWORKS, is_product, needs_lycoris

__all__ = ["ADAPTER_NAME", "NETWORKS", "AdapterSpec"]


@dataclass(frozen=True)
class AdapterSpec:
    network: str = "lora"
    rank: int = 16
    alpha: float = 16.0
    conv_rank: int = 0
    conv_alpha: float = 1.0
    dora: bool = False
    lokr_factor: int = -1
    lokr_full_matrix: bool = False
    tucker: bool = False
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> AdapterSpec:
        """The one way to build a spec: from a TrainConfig, or from a mapping of the same names (the UI's form
        values); a name it lacks keeps its default."""
        names = cls.__dataclass_fields__
        if isinstance(cfg, Mapping):
            return cls(**{k: cfg[k] for k in names if k in cfg})
        return cls(**{k: getattr(cfg, k) for k in names if hasattr(cfg, k)})

    # -- what it is ---------------------------------------------------------------------------------------------
    @property
    def label(self) -> str:
        name = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr"}[self.network]
        if self.network == "lora" and self.conv_rank:
            name = "LoCon"
        return f"DoRA ({name})" if self.dora else name

    @property
    def adapts_resnets(self) -> bool:
        """kohya's rule: a conv rank adapts every ResNet/resampling block, not only attention."""
        return self.conv_rank > 0

    @property
    def uses_lycoris(self) -> bool:
        return needs_lycoris(self)

    def rank_alpha(self, kind: str) -> tuple[int, float]:
        return (self.conv_rank, self.conv_alpha) if kind == "conv3x3" else (self.rank, self.alpha)

    # -- injection ----------------------------------------------------------------------------------------------
    def inject(self, model: nn.Module, modules: list) -> None:
        """Adapt `modules` (TargetModule list of `model`); training starts exactly at the base model."""
        if self.uses_lycoris:
            for m in modules:
                self._wrap_lycoris(model, m)
        else:
            model.add_adapter(self._peft_config(modules), adapter_name=ADAPTER_NAME)

    def _peft_config(self, modules: list):
        from peft import LoraConfig

        conv_names = [m.name for m in modules if m.kind == "conv3x3"]
        # PEFT matches *_pattern keys as regexes against the module path; anchor to the exact path.
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            target_modules=[m.name for m in modules],
            rank_pattern={f"^{re.escape(n)}$": self.conv_rank for n in conv_names},
            alpha_pattern={f"^{re.escape(n)}$": self.conv_alpha for n in conv_names},
            init_lora_weights=True,  # A: Kaiming-uniform, B: zeros -> training starts exactly at the base model
            lora_dropout=self.dropout,
        )

    def _lycoris_module(self, name: str, layer: nn.Module, kind: str) -> nn.Module:
        from .lycoris_layer import lycoris_class

        rank, alpha = self.rank_alpha(kind)
        options = dict(lora_dim=rank, alpha=alpha, dropout=self.dropout, rank_dropout=self.rank_dropout,
                       module_dropout=self.module_dropout, use_tucker=self.tucker,
                       weight_decompose=self.dora, wd_on_out=False)  # dora_scale per input column: the files' layout
        if self.network == "lokr":
            options.update(factor=self.lokr_factor, full_matrix=self.lokr_full_matrix)
        if not layer.weight.is_meta:
            return lycoris_class(self.network)(name, layer, **options)
        # The memory trace and the parameter count work on meta-device layers. LyCORIS builds its small tensors on the
        # CPU (it computes shapes with .item()), and DoRA's magnitude (the norms of real weights) cannot be read there:
        # same module with a magnitude of the right shape, then everything onto the meta device.
        import torch

        module = lycoris_class(self.network)(name, layer, **{**options, "weight_decompose": False})
        if self.dora:
            w = layer.weight
            module.wd, module.wd_on_out, module.dora_norm_dims = True, False, w.dim() - 1
            module.dora_scale = nn.Parameter(torch.empty(1, w.shape[1], *[1] * (w.dim() - 2)))
        return module.to("meta")

    def _wrap_lycoris(self, model: nn.Module, target) -> None:
        from .lycoris_layer import wrap

        layer = model.get_submodule(target.name)
        wrap(model, target.name, self._lycoris_module(target.name, layer, target.kind))

    # -- counting -----------------------------------------------------------------------------------------------
    def parameter_count(self, modules: list) -> int:
        """Exact trainable parameter count, without touching a real model (LyCORIS types: built on the meta device)."""
        if not self.uses_lycoris:
            total = 0
            for m in modules:
                r, _ = self.rank_alpha(m.kind)
                total += r * m.in_features * m.kernel * m.kernel + m.out_features * r
            return total
        total = 0
        shapes: dict[tuple, int] = {}
        for m in modules:
            key = (m.kind, m.in_features, m.out_features, m.kernel)
            if key not in shapes:
                layer = (nn.Linear(m.in_features, m.out_features, device="meta") if m.kind == "linear"
                         else nn.Conv2d(m.in_features, m.out_features, m.kernel, padding=m.kernel // 2, device="meta"))
                module = self._lycoris_module("count", layer, m.kind)
                shapes[key] = sum(p.numel() for p in module.parameters() if p.requires_grad)
            total += shapes[key]
        return total

    # -- what the file says about it ----------------------------------------------------------------------------
    def network_module(self) -> str:
        return "lycoris.kohya" if is_product(self.network) or self.dora or self.network == "locon" else "networks.lora"

    def network_args(self) -> dict[str, str]:
        """`ss_network_args` as kohya's LoRA and LyCORIS's kohya wrapper write it."""
        args: dict[str, str] = {}
        if self.network_module() == "lycoris.kohya":
            args["algo"] = self.network
            if self.dora:
                args["dora_wd"] = "True"
                args["wd_on_output"] = "False"
            if self.network == "lokr":
                args["factor"] = str(self.lokr_factor)
                if self.lokr_full_matrix:
                    args["full_matrix"] = "True"
            if self.tucker:
                args["use_tucker"] = "True"
        if self.conv_rank:
            args["conv_dim"] = str(self.conv_rank)
            args["conv_alpha"] = str(self.conv_alpha)
        for key in ("dropout", "rank_dropout", "module_dropout"):
            if getattr(self, key):
                args[key] = str(getattr(self, key))
        return args

    def network_metadata(self) -> dict[str, str]:
        """The `ss_network_*` keys kohya's loaders and UIs read: module, dim, alpha and args."""
        args = self.network_args()
        return {"ss_network_module": self.network_module(), "ss_network_dim": str(self.rank),
                "ss_network_alpha": str(self.alpha), "ss_network_args": json.dumps(args) if args else "null"}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


ADAPTER_NAME = "default"
