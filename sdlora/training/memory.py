"""How much memory a training run needs, worked out before it starts, so a run that cannot fit warns instead
of dying at step 1.

Weights are counted from the loaded modules. What one step adds on top (activations kept for backward, the
LoRA gradients, temporaries) is not taken from a rule of thumb: the step itself is traced once on fake
tensors (shapes, no storage) with the same UNet config, LoRA targets, autocast precision, batch, resolution
and gradient checkpointing, while a dispatch mode adds up the bytes of the tensors alive at each moment. The
same count taken on a real CPU step agrees with the trace (tests/test_memory.py). Tracing an SD1.5 step
takes a few seconds of CPU and no memory.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# What the optimizer keeps per trainable parameter besides the fp32 parameter and its fp32 gradient.
_OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16}
# The caching allocator rounds blocks up and fragments; leave this share of the free memory unplanned.
_HEADROOM = 0.10


@dataclass
class MemoryEstimate:
    weights: int            # every module on the training device, in the dtype it will have there
    trainable: int          # LoRA parameters, their gradients and optimizer state (fp32)
    activations: int        # the traced step's peak beyond the weights
    available: int | None   # free on the device now
    device: str
    resident: int = 0       # of `weights`, what is already on the device (so not in `available`)

    @property
    def total(self) -> int:
        return self.weights + self.trainable + self.activations

    def fits(self) -> bool:
        return self.available is None or self.total - self.resident <= (1 - _HEADROOM) * self.available

    def describe(self) -> str:
        avail = f"{_size(self.available)} available" if self.available is not None else "availability unknown"
        if self.available is not None and self.resident:
            avail += f" besides the {_size(self.resident)} of weights already there"
        return (f"estimated peak memory on {self.device}: {_size(self.total)} (weights {_size(self.weights)}, "
                f"LoRA+optimizer {_size(self.trainable)}, one step {_size(self.activations)}); {avail}")


def _size(n: int) -> str:
    return f"{n / 1024 ** 3:.2f} GiB" if n >= 1024 ** 3 else f"{n / 1024 ** 2:.1f} MiB"


class LiveTensorBytes(TorchDispatchMode):
    """Adds up the storage bytes of tensors created inside it while they are alive; `peak` is the high-water mark.

    Tensors that existed before (weights, inputs, optimizer state) are passed in and not counted, nor are views of
    them; one not passed in is counted from the first op that returns it, in-place ops included."""

    def __init__(self, *existing: torch.Tensor):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {id(t.untyped_storage()): 0 for t in existing}
        self._keep = [t.untyped_storage() for t in existing]  # their ids must stay theirs while we run

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        n = storage.nbytes()
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """The same architecture (diffusers or transformers class, same config) with shape-only weights."""
    from diffusers import ModelMixin

    with torch.device("meta"):
        if isinstance(module, ModelMixin):
            return type(module).from_config(module.config)
        return type(module)(module.config)  # transformers


def _fake_weights(module: torch.nn.Module, frozen_dtype: torch.dtype) -> list[torch.Tensor]:
    """Put shape-only CPU tensors in place of every parameter and buffer (call inside FakeTensorMode): frozen
    weights in the dtype they have on the device, LoRA weights fp32 and trainable, as in the real run. In place,
    not through functional_call, because gradient checkpointing re-runs blocks during backward."""
    out = []
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                lora = p.requires_grad
                sub._parameters[name] = torch.empty(p.shape, dtype=torch.float32 if lora else frozen_dtype).requires_grad_(lora)
                out.append(sub._parameters[name])
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype)
                out.append(sub._buffers[name])
    return out


def trace_step_bytes(unet, *, family, config, compute_dtype: torch.dtype, height: int, width: int,
                     trained_text_encoders: dict | None = None, tokens: int = 77) -> int:
    """Peak bytes one training step (forward, loss, backward) allocates beyond the weights.

    Traced on fake CPU tensors under the run's autocast, so PyTorch picks the same fused attention kernel and
    the same dtypes as a real step. The UNet is called through the family (SDXL's pooled and size conditioning
    included); `trained_text_encoders` (name -> module) run inside the step when they train."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..adapters.layers import trainable_parameters
    from ..adapters.spec import AdapterSpec
    from ..adapters.inject import inject_text_encoder, inject_unet

    spec = AdapterSpec.from_config(config)
    meta_unet = _meta_copy(unet)
    inject_unet(meta_unet, config.targets, spec)
    meta_tes = {}
    for name, te in (trained_text_encoders or {}).items():
        meta_tes[name] = _meta_copy(te)
        inject_text_encoder(meta_tes[name], spec)
    for m in (meta_unet, *meta_tes.values()):
        trained = {id(p) for _, p in trainable_parameters(m)}
        for p in m.parameters():  # only the adapter weights train, as in the run
            p.requires_grad_(id(p) in trained)
        m.train()
    if config.gradient_checkpointing:
        meta_unet.enable_gradient_checkpointing()
        for m in meta_tes.values():
            m.activation_checkpointing_enable()

    b, cfg = config.batch_size, meta_unet.config
    with FakeTensorMode():
        weights = _fake_weights(meta_unet, compute_dtype)
        for m in meta_tes.values():
            weights += _fake_weights(m, torch.float32)  # a trained text encoder stays fp32
        latents = torch.empty(b, cfg.in_channels, height // 8, width // 8, dtype=compute_dtype)
        timesteps = torch.zeros(b, dtype=torch.long)
        cond = family.fake_conditioning(cfg, b, tokens, compute_dtype, (height, width))
        ids = [torch.zeros(b, tokens, dtype=torch.long) for _ in family.text_encoder_names]
        trainable = [t for t in weights if t.requires_grad]
        inputs = [t for t in (cond.hidden, cond.pooled, cond.time_ids) if t is not None]
        counter = LiveTensorBytes(*weights, latents, timesteps, *ids, *inputs)
        with counter:
            with torch.autocast("cpu", dtype=compute_dtype, enabled=compute_dtype != torch.float32):
                if meta_tes:
                    # Encoders that train run in the step; a frozen one's output is cached (fake values stand in).
                    encoders = [meta_tes.get(n) for n in family.text_encoder_names]
                    if all(e is not None for e in encoders):
                        text = family.encode_tokens(encoders, ids)
                        cond = type(cond)(hidden=text.hidden.to(compute_dtype), pooled=text.pooled, time_ids=cond.time_ids)
                    else:
                        for e, i in zip(encoders, ids):
                            if e is not None:
                                e(i)
                pred = family.unet_forward(meta_unet, latents, timesteps, cond)
            loss = F.mse_loss(pred.float(), torch.zeros_like(pred, dtype=torch.float32))
            # allow_unused: SDXL conditions on the penultimate layer, so the first encoder's last layer gets no gradient.
            grads = torch.autograd.grad(loss, trainable, allow_unused=True)
            del pred, loss, cond, grads
    return counter.peak


def available_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def _param_bytes(module, dtype_bytes: int) -> int:
    """Bytes of the frozen weights: every parameter but the adapters' own, whatever their type (those are
    `trainable`)."""
    from ..adapters.layers import trainable_parameters

    adapter = {id(p) for _, p in trainable_parameters(module)}
    return sum(p.numel() for p in module.parameters() if id(p) not in adapter) * dtype_bytes


def _is_on(module, device: torch.device) -> bool:
    d = next(module.parameters()).device
    return d.type == device.type and (device.index is None or d.index == device.index)


def estimate_training_memory(*, family, unet, text_encoders: list, vae, lora_params: int, config, device: torch.device,
                             trained_text_encoders: list[int], vae_on_device: bool,
                             text_encoders_on_device: bool = True) -> MemoryEstimate:
    """Peak device memory of the run: frozen weights that stay on the device, LoRA state, one traced step.
    `trained_text_encoders`: indices (into text_encoders) of the encoders that get a LoRA."""
    compute_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    wbytes = compute_dtype.itemsize
    staying = [(unet, wbytes)]
    for i, te in enumerate(text_encoders):
        if te is not None and (i in trained_text_encoders or text_encoders_on_device):
            staying.append((te, 4 if i in trained_text_encoders else wbytes))
    if vae_on_device:
        staying.append((vae, 4))
    weights = sum(_param_bytes(m, b) for m, b in staying)
    # Weights loaded straight onto the device (always, on CPU) are not in its free memory any more.
    resident = sum(_param_bytes(m, m.dtype.itemsize) for m, _ in staying if _is_on(m, device))
    trainable = lora_params * (4 + 4 + _OPTIMIZER_STATE_BYTES.get(config.optimizer, 8))
    names = family.text_encoder_names
    trained = {names[i]: text_encoders[i] for i in trained_text_encoders}
    first = next((te for te in text_encoders if te is not None), None)
    step = trace_step_bytes(unet, family=family, config=config, compute_dtype=compute_dtype, height=config.resolution,
                            width=config.resolution, trained_text_encoders=trained,
                            tokens=getattr(getattr(first, "config", None), "max_position_embeddings", 77))
    return MemoryEstimate(weights=int(weights), trainable=int(trainable), activations=int(step),
                          available=available_memory(device), device=str(device), resident=int(resident))
