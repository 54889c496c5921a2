"""Train builtin:toy, the small Stable-Diffusion-architecture model behind sdlora's offline demo.

The real diffusers/transformers classes (AutoencoderKL, UNet2DConditionModel, CLIPTextModel, CLIPTokenizer), sized
for a CPU, trained from scratch on generated scenes (sdlora/data/scenes.py: one circle/square/triangle in one of 8
colours on another colour, at one of 5 places, small or large), so that a prompt such as "a red circle on a blue
background" draws that at 64 px. Two phases:

1. the VAE (64 px -> 8x8x4 latents), on 32 px crops of scenes (it is convolutional; crops cost a quarter), half of
   them in arbitrary colours so it can draw colours the UNet never learns (the demo mascot's pink);
2. the UNet and the text encoder together on latents of a fixed set of scenes, epsilon prediction with the SD 1.x
   noise schedule, min-SNR weighting, 10% empty captions so classifier-free guidance works, 15% with a made-up word
   so an unknown trigger word leaves a prompt's meaning alone.

Seeded: the same command gives the same weights on the same torch build. It writes fp16 safetensors plus configs,
tokenizer and SHA256SUMS to sdlora/assets/toy/, which sdlora unpacks into its cache on first use of builtin:toy.

Cost (measured on this project's 2-core CPU machine with torch.set_num_threads(1), the other core busy with other work):
see bench/RESULTS.md, "builtin:toy base model". Command:

    HF_HUB_OFFLINE=1 python scripts/train_toy_base.py            # writes sdlora/assets/toy/
    python scripts/train_toy_base.py --out /tmp/toy --vae-steps 20 --unet-steps 20   # a quick smoke run
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sdlora.data.scenes import any_colour_scene, nonsense_word, random_scene, scene_caption  # noqa: E402
from sdlora.models.toy import TOY_ASSETS, build_toy_components, save_toy_assets  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(imgs) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) for i in imgs])).permute(0, 3, 1, 2) / 127.5 - 1.0


def scene_batch(rng: random.Random, n: int, size: int = 64) -> tuple[torch.Tensor, list[dict]]:
    imgs, scenes = zip(*(random_scene(rng, size) for _ in range(n)))
    return to_tensor(imgs), list(scenes)


def vae_batch(rng: random.Random, n: int, size: int = 64) -> torch.Tensor:
    """Half base-world scenes, half the same shapes in arbitrary colours (so the VAE can draw any flat colour)."""
    return to_tensor([random_scene(rng, size)[0] if i % 2 else any_colour_scene(rng, size) for i in range(n)])


@torch.no_grad()
def mascot_reconstruction(vae) -> float:
    """Mean absolute error (0-255) of the VAE on the mascot's pink: the demo LoRA can only teach what the VAE can draw."""
    from sdlora.data.scenes import COLOURS, MASCOT_COLOUR, render_scene

    x = to_tensor([render_scene(64, "star", MASCOT_COLOUR, COLOURS[bg], "centered", 0.25) for bg in ("blue", "green")])
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return float((rec - x).abs().mean() * 127.5)


def train_vae(vae, steps: int, batch: int, seed: int) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x = vae_batch(rng, batch)
        i, j = (int(v) for v in torch.randint(0, 33, (2,), generator=gen))
        x = x[:, :, i:i + 32, j:j + 32]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        # L1 keeps edges sharper than MSE; the small KL term keeps latents near unit scale for the diffusion phase
        loss = F.l1_loss(rec, x) + 0.5 * F.mse_loss(rec, x) + 1e-5 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    vae.eval()


@torch.no_grad()
def encode_scenes(vae, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    rng = random.Random(seed)
    means, stds, scenes = [], [], []
    for start in range(0, count, 64):
        x, sc = scene_batch(rng, min(64, count - start))
        post = vae.encode(x).latent_dist
        means.append(post.mean)
        stds.append(post.std)
        scenes += sc
    return torch.cat(means), torch.cat(stds), scenes


def with_nonsense(caption: str, rng: random.Random) -> str:
    """15% of captions get a made-up word, first (where trigger words go) or last."""
    if rng.random() >= 0.15:
        return caption
    return f"{nonsense_word(rng)}, {caption}" if rng.random() < 0.7 else f"{caption}, {nonsense_word(rng)}"


def train_unet(unet, text_encoder, tokenizer, scheduler, means, stds, scenes, *, steps: int, batch: int, seed: int,
               scaling: float) -> None:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-4, total_steps=steps, pct_start=0.03)
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    unet.train()
    text_encoder.train()
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(0, len(scenes), (batch,), generator=gen)
        z = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        captions = ["" if rng.random() < 0.1 else with_nonsense(scene_caption(scenes[int(i)], rng), rng) for i in idx]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        hidden = text_encoder(ids)[0]
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        noisy = scheduler.add_noise(z, noise, t)
        pred = unet(noisy, t, hidden).sample
        # min-SNR-5 weighting (Hang et al. 2023): converges faster than the plain epsilon loss
        weight = torch.clamp(snr[t], max=5.0) / snr[t]
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps:
            log(f"unet step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    unet.eval()
    text_encoder.eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=TOY_ASSETS)
    ap.add_argument("--vae-steps", type=int, default=1000)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--scenes", type=int, default=24000, help="scenes encoded once for the UNet phase")
    ap.add_argument("--unet-steps", type=int, default=5000)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(tmp)
        vae, unet, text_encoder, tokenizer, scheduler = build_toy_components(tok_dir, seed=args.seed)
        log(f"threads {torch.get_num_threads()}; params: vae {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M, "
            f"unet {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, "
            f"text encoder {sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M")
        train_vae(vae, args.vae_steps, args.vae_batch, args.seed + 1)
        t_vae = time.perf_counter() - start
        vae_error = mascot_reconstruction(vae)
        log(f"VAE error on the mascot (pink star), mean abs 0-255: {vae_error:.1f}")
        means, stds, scenes = encode_scenes(vae, args.scenes, args.seed + 2)
        scaling = float(1.0 / means.std())
        vae.register_to_config(scaling_factor=scaling)
        log(f"encoded {len(scenes)} scenes; latent mean {means.mean():.3f} std {means.std():.3f} -> scaling {scaling:.4f}")
        train_unet(unet, text_encoder, tokenizer, scheduler, means, stds, scenes, steps=args.unet_steps,
                   batch=args.unet_batch, seed=args.seed + 3, scaling=scaling)
        total = time.perf_counter() - start
        info = {"threads": torch.get_num_threads(), "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
                "scenes": args.scenes, "seed": args.seed,
                "vae_error_on_mascot": round(vae_error, 1), "vae_seconds": round(t_vae), "total_seconds": round(total),
                "torch": torch.__version__}
        save_toy_assets(args.out, vae=vae, unet=unet, text_encoder=text_encoder, tokenizer_dir=tok_dir / "tokenizer",
                        scheduler=scheduler, info=info)
    log(f"done in {total:.0f} s ({total / 60:.1f} min); wrote {args.out}")


if __name__ == "__main__":
    main()
