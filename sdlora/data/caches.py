"""Caches that spare the VAE and the text encoders work: latents per (image, size, flip), embeddings per caption."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..families import TextEmbedding
from ..fileio import atomic_path
from .training_set import TrainingSet


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class LatentCache:
    """VAE latents per (image, size, flip), in memory and optionally on disk.

    The disk key covers the file's content, the target size, the flip and the VAE identity, so a changed
    image or another model is re-encoded instead of silently reusing stale latents.
    """

    def __init__(self, vae, *, vae_id: str, cache_dir: Path | None, device, dtype=torch.float32):
        self.vae = vae
        self.vae_id = vae_id
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.device = device
        self.dtype = dtype
        self.memory: dict[tuple[int, bool], torch.Tensor] = {}
        self.hits = 0
        self._digests: dict[Path, str] = {}
        self.encoded = 0

    def key(self, path: Path, size, flip: bool) -> str:
        if path not in self._digests:  # read each file once, not once per flip variant
            self._digests[path] = file_digest(path)
        return hashlib.sha256(f"{self._digests[path]}|{size[0]}x{size[1]}|{int(flip)}|{self.vae_id}".encode()).hexdigest()[:32]

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, dtype=self.vae.dtype)
        dist = self.vae.encode(pixels).latent_dist
        # The distribution mean: deterministic, so cached and uncached runs agree.
        return (dist.mean * self.vae.config.scaling_factor).to(self.dtype)

    def build(self, dataset: TrainingSet, *, flips: tuple[bool, ...], progress=None, batch_size: int = 4) -> None:
        """Encode every (item, flip) once; entries of the same item share its latents."""
        todo: list[tuple[int, bool, int, str | None]] = []
        seen = set()
        for idx, entry in enumerate(dataset.entries):
            for flip in flips:
                if (entry.item_index, flip) in seen:
                    continue
                seen.add((entry.item_index, flip))
                item = dataset.items[entry.item_index]
                try:
                    disk_key = self.key(item.path, entry.size, flip) if self.cache_dir else None
                except OSError:  # deleted or unreadable since the scan: pixels_for substitutes it
                    disk_key = None
                if disk_key and (self.cache_dir / f"{disk_key}.safetensors").is_file():
                    try:
                        self.memory[(entry.item_index, flip)] = load_file(self.cache_dir / f"{disk_key}.safetensors")["latent"]
                        self.hits += 1
                        continue
                    except Exception:
                        pass  # unreadable cache file: re-encode below
                todo.append((entry.item_index, flip, idx, disk_key))
        # Group by size so each VAE call is one batch.
        by_size: dict[tuple[int, int], list] = {}
        for t in todo:
            by_size.setdefault(dataset.entries[t[2]].size, []).append(t)
        done = 0
        for group in by_size.values():
            for start in range(0, len(group), batch_size):
                chunk = group[start: start + batch_size]
                pixels = torch.stack([dataset.pixels_for(0, idx, flip=flip) for _, flip, idx, _ in chunk])
                latents = self.encode(pixels).cpu()
                for (item_index, flip, _, disk_key), latent in zip(chunk, latents):
                    self.memory[(item_index, flip)] = latent.clone()
                    # A stand-in's latents (its own image failed to load) never go to disk under the failed image's key.
                    if disk_key and dataset.source_item(item_index) == item_index:
                        self._save(disk_key, latent)
                self.encoded += len(chunk)
                done += len(chunk)
                if progress:
                    progress(done, len(todo))

    def _save(self, disk_key: str, latent: torch.Tensor) -> None:
        if self.cache_dir is None:
            return
        try:
            with atomic_path(self.cache_dir / f"{disk_key}.safetensors") as tmp:
                save_file({"latent": latent.contiguous()}, str(tmp))
        except Exception:  # noqa: BLE001 - a full disk (OSError, SafetensorError): keep the latents in memory only
            self.cache_dir = None

    def get(self, item_index: int, flip: bool) -> torch.Tensor:
        return self.memory[(item_index, flip)]


class TextEmbeddingCache:
    """Caption -> what the family's text encoders make of it (hidden states, and SDXL's pooled embedding), for frozen
    text encoders. Captions that vary per step are encoded on the fly with `encode`."""

    def __init__(self, family, tokenizers: list, text_encoders: list, device, clip_skip: int = 1):
        self.family = family
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.device = device
        self.clip_skip = clip_skip
        # Keyed by (clip_skip, caption): one caption conditions differently at another clip_skip.
        self.memory: dict[tuple[int, str], TextEmbedding] = {}

    def encode(self, captions: list[str]) -> TextEmbedding:
        return self.family.encode(self.text_encoders, self.tokenizers, captions, self.device, self.clip_skip)

    @torch.no_grad()
    def get(self, captions: list[str]) -> TextEmbedding:
        missing = [c for c in dict.fromkeys(captions) if (self.clip_skip, c) not in self.memory]
        if missing:
            for c, row in zip(missing, self.encode(missing).rows()):
                self.memory[(self.clip_skip, c)] = row
        return TextEmbedding.stack([self.memory[(self.clip_skip, c)] for c in captions])
