"""Text embeddings with a frozen text encoder: cache per caption variant, or encode every step?

Times a CLIP-L-sized text encoder (random weights) on one caption against a cache lookup, and counts how
many variants tag shuffling creates, to show which wins for fixed and for shuffled captions.

    python bench/text_cache.py [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sdlora  # noqa: E402,F401  (first: it quiets libraries that log on import)


def main() -> int:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sdlora.models.component_configs import MODEL_CONFIGS, write_config_folder
    from sdlora.models import quiet_libraries
    from sdlora.paths import cache_dir
    from sdlora.data.caches import TextEmbeddingCache

    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    quiet_libraries()
    cfg = {k: v for k, v in MODEL_CONFIGS["sd15"]["text_encoder"].items() if k != "architectures"}
    te = CLIPTextModel(CLIPTextConfig(**cfg)).to(args.device).eval()
    tok = CLIPTokenizer.from_pretrained(write_config_folder("sd15", cache_dir() / "configs" / "sd15") / "tokenizer")
    from sdlora.families import FAMILIES

    cache = TextEmbeddingCache(FAMILIES["sd1"], [tok], [te], args.device)
    caption = "ohwx person, portrait, smiling, outdoors, daylight, red jacket, looking at viewer, detailed face"
    with torch.no_grad():
        cache.encode([caption])

        def timed(fn):
            if args.device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(args.reps):
                fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - t0) / args.reps

        encode_s = timed(lambda: cache.encode([caption]))
        cache.get([caption])
        lookup_s = timed(lambda: cache.get([caption]))
    tags = len(caption.split(","))
    variants = math.factorial(tags - 1)  # keep_tokens=1
    emb_bytes = 77 * cfg["hidden_size"] * 4
    result = {"device": args.device, "encode_ms": encode_s * 1e3, "cache_lookup_ms": lookup_s * 1e3,
              "tags": tags, "shuffle_variants_per_caption": variants,
              "cache_all_variants_gib_per_caption": variants * emb_bytes / 2 ** 30}
    print(f"encode one caption: {encode_s * 1e3:.2f} ms; cache lookup: {lookup_s * 1e3:.3f} ms on {args.device}")
    print(f"{tags} tags, keep_tokens=1 -> {variants:,} shuffle variants per caption "
          f"({result['cache_all_variants_gib_per_caption']:.1f} GiB to cache them all)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
