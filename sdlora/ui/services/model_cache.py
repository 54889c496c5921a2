"""The server's one cache of loaded base models (and their pipelines), shared by every tab, and the lock that guards
them: Try injects LoRAs into a cached model, verify and the tools read it, training builds new modules."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from ...models import MODEL_LOCK
from ..access import AccessPolicy

MODEL_CACHE_SIZE = 2  # loaded base models kept for parameter counts, Try and verify (an SD1.5 is ~4 GB in fp32)


class ModelCache:
    """Base models loaded once per (spec, allow_pickle) and kept (the few most recent); every spec a client sends is
    checked against the access policy before it is loaded."""

    def __init__(self, access: AccessPolicy, lock: threading.RLock = MODEL_LOCK):
        self.access = access
        # Everything that touches a cached model or builds one holds this (the library's own lock).
        self.lock = lock
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._pipes: dict[str, Any] = {}

    @staticmethod
    def _key(spec: str, allow_pickle: bool) -> str:
        return f"{(spec or '').strip()}|pickle={bool(allow_pickle)}"

    def base_model(self, spec: str, *, allow_pickle: bool = False):
        """Loaded once per spec and kept (the few most recent), for parameter counts, Try and verify."""
        from ...models import load_base_model

        spec = (spec or "").strip()
        self.access.base_model(spec, bool(allow_pickle))
        key = self._key(spec, allow_pickle)
        with self.lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            base = load_base_model(spec, allow_pickle=allow_pickle)
            self._models[key] = base
            while len(self._models) > MODEL_CACHE_SIZE:
                old, _ = self._models.popitem(last=False)
                self._pipes.pop(old, None)
            return base

    def pipeline(self, spec: str, allow_pickle: bool = False):
        """(base model, its cached inference pipeline), made on first use."""
        key = self._key(spec, allow_pickle)
        base = self.base_model(spec, allow_pickle=allow_pickle)
        pipe = self._pipes.get(key)
        if pipe is None:
            pipe = base.make_pipeline()
            pipe.set_progress_bar_config(disable=True)
            self._pipes[key] = pipe
        return base, pipe

    def model_info(self, spec: str, *, allow_pickle: bool = False) -> dict[str, Any]:
        """The base model's family (label, name) and native resolution, shown next to the base-model field."""
        base = self.base_model(spec, allow_pickle=allow_pickle)
        return {"family": base.family.name, "label": base.family.label, "resolution": int(base.default_resolution)}

    def count_parameters(self, spec: str, targets: list[str], rank: int, conv_rank: int, train_te: bool,
                         allow_pickle: bool = False, adapter=None) -> tuple[int, int, int]:
        """(trainable parameters, UNet modules, text-encoder modules) for these choices, without injecting anything.
        `adapter`: an AdapterSpec (default: plain LoRA at this rank)."""
        from ...adapters.inject import resolve_text_encoder_targets, resolve_unet_targets
        from ...adapters.spec import AdapterSpec

        with self.lock:
            base = self.base_model(spec, allow_pickle=allow_pickle)
            unet_mods = resolve_unet_targets(base.unet, targets, conv_rank=conv_rank) if (targets or conv_rank) else []
            te_mods = [m for te in base.text_encoders for m in resolve_text_encoder_targets(te)] if train_te else []
        adapter = adapter or AdapterSpec(rank=int(rank), alpha=float(rank), conv_rank=int(conv_rank))
        total = adapter.parameter_count(unet_mods) + adapter.parameter_count(te_mods)
        return total, len(unet_mods), len(te_mods)
