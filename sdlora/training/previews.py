"""Preview images during and after the run (OUTPUT/samples), through the family's pipeline with the LoRA applied.

`run` is the prepared Trainer.
"""

from __future__ import annotations

from pathlib import Path

from ..inference.sampling import generate, sample_filename, save_png_atomic
from .events import SampleEvent, WarningEvent


def safe_sample(run, step: int) -> list[Path]:
    """Previews are a nicety: one that fails (a bad prompt option, a full disk) is a warning, never the end of a run."""
    try:
        return sample(run, step)
    except Exception as exc:  # noqa: BLE001 - the run (and its LoRA) matter more than a preview
        from ..errorlog import what_went_wrong, write_traceback

        log = write_traceback(exc, context=f"preview at step {step}", out_dir=run.out_dir)
        run.emit(WarningEvent, step=step, message=f"Preview at step {step} failed ({what_went_wrong(exc)}); training is "
                 f"not affected.{f' Details: {log}.' if log else ''}")
        return []


def sample(run, step: int) -> list[Path]:
    acc = run.accelerator
    acc.wait_for_everyone()
    if not acc.is_main_process or not run.sample_prompts:
        return []
    unet = acc.unwrap_model(run.unet)
    was_training = unet.training
    unet.eval()
    # Encoders are None once dropped: then the prompts' cached embeddings stand in.
    encoders = [acc.unwrap_model(te) if te is not None else None for te in run.text_encoders]
    live = encoders[0] is not None
    vae_device, te_devices = run.base.vae.device, [te.device if te is not None else None for te in encoders]
    run.base.vae.to(run.device)
    for te in encoders:
        if te is not None:
            te.to(run.device)
    # The sampler follows the run's training scheduler (zero terminal SNR included).
    pipe = run.base.make_pipeline(unet=unet, text_encoders=encoders, scheduler_config=run.noise_scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    paths = []
    try:
        for i, prompt in enumerate(run.sample_prompts):
            embeds = None if live else run.family.prompt_embeds_kwargs(
                run.text_cache.get([prompt.prompt]), run.text_cache.get([prompt.negative]))
            with acc.autocast():
                img = generate(pipe, prompt, default_size=run.config.resolution, default_steps=run.config.sample_steps,
                               default_seed=run.config.seed + i, prompt_embeds=embeds, clip_skip=run.config.clip_skip,
                               family=run.family)
            paths.append(save_png_atomic(img, run.out_dir / "samples" / sample_filename(step, i)))
    finally:
        run.base.vae.to(vae_device)
        for te, device in zip(encoders, te_devices):
            if te is not None:
                te.to(device)
        if was_training:
            unet.train()
    run.samples.extend(paths)
    run.emit(SampleEvent, step=step, paths=[str(p) for p in paths], prompts=[s.prompt for s in run.sample_prompts])
    return paths
