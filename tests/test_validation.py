"""Validation loss: held-out images (validation_split) or a validation folder, fixed noise and timesteps, resume."""

from __future__ import annotations

import json
import threading
from functools import partial
from pathlib import Path

import pytest
from PIL import Image

from conftest import tiny_config
from sdlora.config.train_config import ConfigError, make_config
from sdlora.training.events import StepEvent, TrainEvent, ValidationEvent
from sdlora.training.trainer import train
from sdlora.data.plan import build_training_data


def _images(folder: Path, n: int, prefix: str = "img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (40 * i % 255, 90, 200 - 30 * i % 200)).save(folder / f"{prefix}{i}.png")
        (folder / f"{prefix}{i}.txt").write_text(f"a thing {i}")
    return folder


_config = partial(tiny_config, output_name="t", rank=4, alpha=4.0, steps=6, lr=5e-3, seed=7, save_precision="fp32")


def test_validation_split_holds_out_images(tmp_path):
    data = _images(tmp_path / "data", 6)
    cfg = _config(tmp_path / "out", data, validation_split=0.34)
    td = build_training_data(cfg)
    held = {item.path for item in td.validation.items}
    trained = {item.path for item in td.dataset.items}
    assert len(held) == 2 and len(trained) == 4 and not held & trained
    assert {td.dataset.items[e.item_index].path for e in td.dataset.entries} == trained
    assert td.num_images == 4
    assert {item.path for item in build_training_data(cfg).validation.items} == held  # chosen from the seed
    # A separate folder: every training image trains, the folder's images validate.
    val = _images(tmp_path / "val", 2, prefix="v")
    td = build_training_data(_config(tmp_path / "out", data, validation_dir=str(val)))
    assert len(td.dataset.items) == 6 and {i.path.parent for i in td.validation.items} == {val}


def test_bad_validation_splits_refused(tmp_path):
    data = _images(tmp_path / "data", 6)
    for split, why in ((0.05, "no image for validation"), (0.95, "leaving none to train on")):
        with pytest.raises(ConfigError, match=f"validation_split: .*{why}"):
            build_training_data(_config(tmp_path / "out", data, validation_split=split))
    with pytest.raises(ConfigError, match="validation_split"):
        _config(tmp_path / "out", data, validation_split=1.0)
    with pytest.raises(ConfigError, match="validation_split and validation_dir"):
        _config(tmp_path / "out", data, validation_split=0.5, validation_dir=str(data))
    with pytest.raises(ConfigError, match="validate_every"):
        _config(tmp_path / "out", data, validate_every=2)


def test_validation_loss_repeats_across_runs_and_resume(tmp_path):
    data = _images(tmp_path / "data", 6)
    common = {"validation_split": 0.34, "validate_every": 2, "save_every": 2}
    seen: list[TrainEvent] = []
    full = train(_config(tmp_path / "full", data, **common), on_event=seen.append)
    full_val = {e.step: e.data["val_loss"] for e in seen if e.kind == "validation"}
    assert sorted(full_val) == [2, 4, 6]
    assert full_val[2] != full_val[6]  # the value moves as the LoRA trains
    logged = [json.loads(line) for line in (full.output_dir / "train_log.jsonl").read_text().splitlines()]
    assert {r["step"]: r["val_loss"] for r in logged if "val_loss" in r} == full_val

    # A second run, stopped after the step-4 checkpoint and resumed: the same values at the same steps.
    stop = threading.Event()
    part_events: list[TrainEvent] = []

    def on_event(e):
        part_events.append(e)
        if e.kind == "checkpoint" and e.step == 4:
            stop.set()

    part = train(_config(tmp_path / "part", data, **common), on_event=on_event, stop_event=stop)
    assert part.stopped_early and part.steps == 4
    resumed_events: list[TrainEvent] = []
    train(_config(tmp_path / "part", data, resume="latest", **common), on_event=resumed_events.append)
    part_val = {e.step: e.data["val_loss"] for e in part_events + resumed_events if e.kind == "validation"}
    assert part_val == full_val
    logged = [json.loads(line) for line in (part.output_dir / "train_log.jsonl").read_text().splitlines()]
    assert {r["step"]: r["val_loss"] for r in logged if "val_loss" in r} == full_val


def test_validation_events_reach_job_and_plot():
    from sdlora.training.jobs import Job
    from sdlora.ui.services.progress import loss_table

    job = Job(config=make_config(base_model="builtin:tiny", data_dir="x"))
    for step, loss in ((1, 0.5), (2, 0.4)):
        job.handle(StepEvent(step=step, total_steps=2, loss=loss, lr=1e-4, seconds=0.1))
    job.handle(ValidationEvent(step=2, total_steps=2, val_loss=0.3))
    snap = job.snapshot()
    assert snap["val_losses"] == [(2, 0.3)]
    table = loss_table(snap)
    rows = table[table.series == "validation"]
    assert list(rows.step) == [2] and list(rows.loss) == [0.3]


def test_validation_loss_sdxl_with_text_encoder(tmp_path):
    """SDXL's size conditioning and pooled embedding, and trained text encoders, go through the same path."""
    import math

    data = _images(tmp_path / "data", 3)
    seen: list[TrainEvent] = []
    train(_config(tmp_path / "out", data, base_model="builtin:tiny-xl", steps=2, validation_split=0.34,
                  train_text_encoder=True), on_event=seen.append)
    values = [e.data["val_loss"] for e in seen if e.kind == "validation"]
    assert len(values) == 1 and math.isfinite(values[0])
    assert not [e for e in seen if e.kind == "warning" and "Validation" in e.data["message"]]


def _tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Read TensorBoard event files (TFRecord framing, Event protos from tensorboardX): {tag: [(step, value)]}."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    for f in sorted(folder.rglob("events.out.tfevents.*")):
        raw = f.read_bytes()
        pos = 0
        while pos < len(raw):
            (length,) = struct.unpack("<Q", raw[pos:pos + 8])
            ev = event_pb2.Event.FromString(raw[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_tensorboard_logs_loss_lr_and_val_loss(tmp_path):
    pytest.importorskip("tensorboardX")
    data = _images(tmp_path / "data", 5)
    out = tmp_path / "out"
    train(_config(out, data, steps=3, validation_split=0.2, validate_every=2, log_with="tensorboard"))
    folder = out / "logs" / "tensorboard"
    events = list(folder.glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    scalars = _tensorboard_scalars(folder)
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3] and [s for s, _ in scalars["lr"]] == [1, 2, 3]
    assert [s for s, _ in scalars["val_loss"]] == [2, 3]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in log if "val_loss" in r] == pytest.approx([v for _, v in scalars["val_loss"]], rel=1e-6)
