"""Write the golden exports: a few short seeded runs on the built-in tiny models, one per adapter type and family.

tests/test_golden_export.py trains the same runs and compares keys, tensors and the stable metadata with these
files, so a change that means to move code (not behaviour) shows when it does change an export.
Regenerate only on purpose:  .venv/bin/python tests/golden/make_golden.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

# name -> TrainConfig overrides (on top of BASE); small and short so the test stays a few seconds each
RUNS = {
    "sd1-lora-te-conv": dict(targets=["transformer"], conv_rank=2, conv_alpha=1.0, train_text_encoder=True,
                             text_encoder_lr=1e-3),
    "sd1-loha": dict(network="loha", conv_rank=2, conv_alpha=1.0),
    "sd1-lokr": dict(network="lokr", lokr_factor=4, conv_rank=2, conv_alpha=1.0),
    "sd1-dora": dict(network="lora", dora=True),
    "sdxl-lora-te": dict(base_model="builtin:tiny-xl", train_text_encoder=True, text_encoder_lr=1e-3),
}
BASE = dict(base_model="builtin:tiny", data_dir="builtin:demo", output_name="golden", rank=4, alpha=2.0, steps=4,
            batch_size=2, lr=2e-3, resolution=64, seed=7, save_precision="fp32")
# metadata that names the time or the place of a run
VOLATILE = ("ss_training_started_at", "ss_training_finished_at", "modelspec.date", "ss_output_name", "ss_session_id",
            "sshs_model_hash", "sshs_legacy_hash", "ss_dataset_dirs", "ss_tag_frequency", "modelspec.hash_sha256",
            "ss_sd_model_name", "ss_new_sd_model_hash", "ss_sd_model_hash", "ss_training_comment", "modelspec.title")


def train_run(name: str, out: Path) -> Path:
    """One run on one CPU thread: the thread count changes the order of float sums, and 4 steps at lr 2e-3 turn that
    into differences above the comparison's tolerance (the files were written on one thread)."""
    import torch

    from sdlora.config.train_config import make_config
    from sdlora.training.trainer import train

    cfg = make_config(**{**BASE, "output_dir": str(out), **RUNS[name]})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(cfg).lora_path
    finally:
        torch.set_num_threads(threads)


def main() -> None:
    import shutil

    for name in RUNS:
        with tempfile.TemporaryDirectory() as tmp:
            path = train_run(name, Path(tmp))
            shutil.copyfile(path, HERE / f"{name}.safetensors")
            print(name, (HERE / f"{name}.safetensors").stat().st_size)


if __name__ == "__main__":
    main()
