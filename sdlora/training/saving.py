"""What a run keeps: checkpoints to resume from, and the finished LoRA (with a fallback folder when its place cannot
take it).

`run` is the prepared Trainer.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from ..formats.export import build_metadata, export_diffusers, export_kohya
from .checkpoints import save_checkpoint
from .errors import TrainingError
from .events import CheckpointEvent, WarningEvent


def adapted_modules(run) -> dict:
    """Component name -> the (unwrapped) module carrying this run's LoRA: the UNet and each trained encoder."""
    acc = run.accelerator
    modules = {"unet": acc.unwrap_model(run.unet)}
    modules.update({run.te_names[i]: acc.unwrap_model(run.text_encoders[i]) for i in run.trained_te})
    return modules


def metadata(run, step: int, finished: float | None) -> dict[str, str]:
    from ..safetext import clean_text  # safetensors metadata must be valid UTF-8 (paths may not be)

    raw = build_metadata(config=run.config, base=run.base, num_images=run.dataset.num_train_samples,
                         tag_frequency=run.data.tag_frequency, data=run.data, steps_done=step,
                         epochs_done=step // run.steps_per_epoch, started_at=run.started_at, finished_at=finished,
                         unet_modules=len(run.unet_modules), te_modules=sum(len(m) for m in run.te_modules.values()))
    return {k: clean_text(v) for k, v in raw.items()}


def export(run, path: Path, step: int, *, finished: float | None = None, precision: str | None = None,
           fmt: str | None = None) -> Path:
    writer = export_diffusers if (fmt or run.config.format) == "diffusers" else export_kohya
    return writer(path, run.family, adapted_modules(run), metadata=metadata(run, step, finished),
                  precision=precision or run.config.save_precision)


def checkpoint(run, step: int) -> Path | None:
    acc = run.accelerator
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return None
    try:
        path = save_checkpoint(run.out_dir, step, modules=adapted_modules(run), optimizer=run.optimizer,
                               scheduler=run.scheduler, config=run.config, export=lambda p: export(run, p, step))
    except Exception as exc:  # noqa: BLE001 - a full disk raises OSError, RuntimeError (torch.save) or SafetensorError
        from ..errorlog import write_failure

        run.emit(WarningEvent, step=step, message=f"Could not save checkpoint at step {step}: {write_failure(exc, run.out_dir)}. "
                 "The previous checkpoint is kept; training continues.")
        return None
    run.checkpoints.append(path)
    run.emit(CheckpointEvent, step=step, path=str(path))
    return path


def export_final(run, step: int) -> Path:
    """Write the finished LoRA. If its place cannot take it (full disk, read-only folder, a folder in the way), it goes
    to a fallback folder with a warning; only when every place fails does the run end, with a sentence naming the
    path, why, and the newest checkpoint to resume from."""
    from ..errorlog import write_failure
    from ..outputs import OutputError
    from ..paths import cache_dir

    target = run.out_dir / f"{run.config.output_name}.safetensors"
    finished = time.time()
    try:
        return export(run, target, step, finished=finished)
    except Exception as exc:  # noqa: BLE001 - OSError, OutputError, and safetensors' SafetensorError on a full disk
        why = str(exc) if isinstance(exc, OutputError) else write_failure(exc, target)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tried = []
    for folder in (cache_dir() / "rescued", Path(tempfile.gettempdir()) / "sdlora-rescued"):
        rescue = folder / f"{run.config.output_name}-{stamp}.safetensors"
        tried.append(str(folder))
        try:
            path = export(run, rescue, step, finished=finished)
        except Exception:  # noqa: BLE001 - try the next place
            continue
        run.emit(WarningEvent, step=step, message=f"Could not write the LoRA to {target} ({why}). It was saved to {path} "
                 "instead: move it where you want it.")
        return path
    from .resume import candidates

    newest = next(iter(candidates(run.out_dir)), None)
    keep = (f"The newest checkpoint is {newest}: free some space and run again with --resume latest to write the LoRA."
            if newest else "No checkpoint was saved (save_every is off), so this run's weights are lost.")
    raise TrainingError(f"Could not write the LoRA to {target} ({why}), nor to {' or '.join(tried)}. {keep}")
