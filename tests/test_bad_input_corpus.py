"""A corpus of bad input, one class at a time: every case ends in a sentence that names the file or setting (or works),
never in a traceback.

Classes: extreme image sizes; malformed metadata.jsonl and odd Unicode in captions and file names; binary and special
files where a text or folder is expected; out-of-range numbers that pass the type checks; malformed LoRA files; caption
writes that fail; outputs that would replace folders or devices; and anything else, caught by the error boundary of
the CLI and the job queue.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import ROOT, run_cli, subprocess_env
from sdlora.cli import main
from sdlora.config.train_config import make_config
from sdlora.formats.lora_file import read_lora


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_sentence(rc: int, err: str, *needles: str, code: int | None = 2) -> str:
    """The command failed with exactly one `error:` line containing every needle, and no traceback."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc != 0 and (code is None or rc == code), (rc, err)
    assert len(errors) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


TRAIN = ["train", "--base-model", "builtin:tiny", "--steps", "2", "--rank", "2", "--resolution", "64", "--quiet"]


@pytest.fixture(scope="module")
def lora(tmp_path_factory, demo_dataset) -> Path:
    from sdlora.training.trainer import train

    out = tmp_path_factory.mktemp("lora")
    return train(make_config(base_model="builtin:tiny", data_dir=str(demo_dataset), output_dir=str(out), steps=2, rank=2,
                             resolution=64, save_precision="fp32")).lora_path


# extreme image sizes ------------------------------------------------------------------------------------------------

def test_extreme_aspect_ratios_and_tiny_but_huge_images_train(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64), (10, 120, 200)).save(data / "normal.png")
    Image.new("RGB", (1, 3000), (200, 10, 10)).save(data / "tall_1x3000.png")
    Image.new("RGB", (20000, 2), (10, 200, 10)).save(data / "wide_20000x2.png")
    Image.new("L", (1, 100000), 128).save(data / "strip_1x100000.png")  # a few hundred bytes on disk
    Image.new("RGB", (1, 1), (0, 0, 0)).save(data / "one_pixel.png")
    for extra in ([], ["--buckets", "--no-cache-latents", "--random-crop"], ["--buckets", "--bucket-no-upscale"]):
        t0 = time.time()
        rc, out, err = cli(capsys, *TRAIN, "--data", data, "--output", tmp_path / f"o{len(extra)}", *extra)
        assert rc == 0, err
        assert time.time() - t0 < 120
        assert Path(out.strip().splitlines()[-1]).is_file()


def test_extreme_aspect_ratio_resamples_only_the_crop():
    from sdlora.data.images import resize_and_crop

    t0 = time.time()
    img, offset = resize_and_crop(Image.new("L", (1, 100000), 77).convert("RGB"), (512, 512))
    assert img.size == (512, 512) and img.getextrema() == ((77, 77),) * 3
    assert time.time() - t0 < 5  # scaling the whole strip first would make a 512 x 51,200,000 image
    wide, _ = resize_and_crop(Image.new("RGB", (20000, 2), (1, 2, 3)), (64, 64), crop="random")
    assert wide.size == (64, 64)


# captions, metadata.jsonl and file names -------------------------------------------------------------------------------

def _unicode_dataset(root: Path) -> Path:
    root.mkdir()
    names = [b"caf\xe9.png", b"\xff\xfe.png", "emoji_😀.png".encode(), "nfd_e\u0301.png".encode(), b"ctrl_\x1b[31m.png",
             b"nl\nname.png", "rtl_\u05d0\u05d1.png".encode()]
    for i, name in enumerate(names):
        Image.new("RGB", (64, 64), (30 * i, 80, 120)).save(os.fsdecode(bytes(root) + b"/" + name))
    (Path(os.fsdecode(bytes(root) + b"/caf\xe9.txt"))).write_bytes(b"a latin-1 caption: caf\xe9")
    Path(os.fsdecode(bytes(root) + b"/\xff\xfe.txt")).write_text("zero\u200bwidth, \u202eRTL override, e\u0301, 😀", "utf-8")
    lines = [
        '{"file_name": "emoji_😀.png", "text": "a lone surrogate \\ud800 from JSON"}',
        '{"file_name": "nfd_e\u0301.png", "text": 42}',
        "not json at all",
        "[" * 100000 + "]" * 100000,
        '{"file_name": "a\\u0000b.png", "text": "NUL in the name"}',
        '{"file_name": null}',
        '"just a string"',
        '{"file_name": "rtl_\u05d0\u05d1.png", "text": "' + "long " * 20000 + '"}',
        "\ufeff{\"file_name\": \"nl\\nname.png\", \"text\": \"BOM in the middle\"}",
        '{"file_name": ["a list"], "text": "x"}',
    ]
    (root / "metadata.jsonl").write_text("\n".join(lines), encoding="utf-8")
    return root


def test_malformed_metadata_odd_unicode_and_non_utf8_names_scan_and_train(tmp_path, capsys):
    data = _unicode_dataset(tmp_path / "data")
    rc, out, err = cli(capsys, "scan", data)
    assert rc == 0 and "Found 7 images" in out and "caf\\xe9.txt is not UTF-8" in out and "Traceback" not in err
    assert out.count("metadata.jsonl line") >= 6
    rc, out, err = cli(capsys, "scan", data, "--json")
    assert rc == 0 and json.loads(out)["num_images"] == 7
    trigger = os.fsdecode(b"trig\xff")  # a command-line argument that is not UTF-8
    rc, out, err = cli(capsys, *TRAIN, "--data", data, "--output", tmp_path / "o", "--trigger-word", trigger, "--shuffle-tags",
                       "--sample-prompt", os.fsdecode(b"pr\xe9view --s 2"), "--default-caption", os.fsdecode(b"d\xff"))
    assert rc == 0, err
    tensors, md = read_lora(Path(out.strip().splitlines()[-1]))
    assert md["ss_training_comment"] == "trigger word: trig\ufffd"
    assert "a lone surrogate \ufffd from JSON" in json.loads(md["ss_tag_frequency"])["data"]


def test_non_utf8_names_through_the_real_cli_streams(tmp_path):
    data = _unicode_dataset(tmp_path / "data")
    env = subprocess_env()
    env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8")
    env.pop("PYTHONIOENCODING", None)
    proc = subprocess.run([sys.executable, "-m", "sdlora", "scan", str(data)], cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr and b"Found 7 images" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "sdlora", "scan", os.fsencode(data) + b"/\xff\xfe.png"], cwd=ROOT, env=env,
                          capture_output=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count(b"error: ") == 1 and b"\\xff\\xfe.png" in proc.stderr


def test_run_tab_and_dataset_report_carry_non_utf8_names_as_json(tmp_path):
    """What the web page gets must encode as UTF-8 JSON (orjson refuses lone surrogates)."""
    import orjson

    from sdlora.data.scan import scan_dataset
    from sdlora.training.events import StatusEvent, StepEvent, WarningEvent
    from sdlora.training.jobs import Job

    report = scan_dataset(_unicode_dataset(tmp_path / "data"))
    orjson.dumps(report.summary())
    job = Job(config=make_config(data_dir=str(tmp_path)))
    job.handle(StatusEvent(step=0, total_steps=3, message=report.summary()))
    job.handle(WarningEvent(step=1, total_steps=3, message=f"Image {report.items[1].path} failed"))
    job.handle(StepEvent(step=1, total_steps=3, loss=None, lr=None, seconds=None))  # malformed: recorded nothing, raised nothing
    orjson.dumps(job.snapshot())


# binary and special files where text or a folder is expected ------------------------------------------------------------

@pytest.fixture
def special(tmp_path) -> dict[str, Path]:
    d = tmp_path / "special"
    d.mkdir()
    os.mkfifo(d / "fifo")
    (d / "binary.toml").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    (d / "latin1.toml").write_bytes(b'trigger_word = "caf\xe9"\n')
    (d / "deep.toml").write_text("a = " + "[" * 5000 + "]" * 5000)
    with open(d / "huge.toml", "wb") as fh:
        fh.truncate(5 << 20)
    (d / "folder.toml").mkdir()
    return {p.name: p for p in d.iterdir()}


@pytest.mark.parametrize("name", ["fifo", "binary.toml", "latin1.toml", "deep.toml", "huge.toml", "folder.toml"])
def test_binary_or_special_file_as_preset(capsys, special, name):
    rc, _, err = cli(capsys, "train", "--config", special[name])
    one_sentence(rc, err, f"Preset '{special[name]}'")


@pytest.mark.parametrize("name", ["fifo", "binary.toml", "huge.toml", "folder.toml"])
def test_binary_or_special_file_as_sample_prompts(capsys, special, demo_dataset, tmp_path, name):
    rc, _, err = cli(capsys, *TRAIN, "--data", demo_dataset, "--output", tmp_path / "o", "--sample-prompts", special[name])
    one_sentence(rc, err, "sample_prompts_file", str(special[name]))


def test_special_files_are_refused_by_the_one_reader_without_blocking(special):
    from sdlora.fileio import UserFileError, read_user_bytes

    for path, kind in ((special["fifo"], "special"), (Path("/dev/zero"), "special"), (special["folder.toml"], "folder"),
                       (special["huge.toml"], "too_large")):
        started = time.time()
        with pytest.raises(UserFileError, match=str(path)) as info:
            read_user_bytes(path)
        assert info.value.kind == kind and time.time() - started < 5


def test_import_kohya_answers_at_once_for_a_fifo(special, tmp_path):
    fifo = special["fifo"]
    proc = run_cli("import-kohya", fifo, "--out", tmp_path / "x.toml", check=False, timeout=120)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1 and str(fifo) in errors[0] and "not a regular file" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.toml").exists()


@pytest.mark.parametrize("name", ["folder.toml", "huge.toml", "binary.toml"])
def test_special_or_binary_file_as_kohya_config(capsys, special, tmp_path, name):
    rc, _, err = cli(capsys, "import-kohya", special[name], "--out", tmp_path / "x.toml")
    one_sentence(rc, err, f"kohya_ss config '{special[name]}'")


@pytest.mark.parametrize("name", ["fifo", "folder.toml", "huge.toml"])
def test_special_file_as_dataset_config(capsys, special, tmp_path, name):
    rc, _, err = cli(capsys, *TRAIN, "--dataset-config", special[name], "--output", tmp_path / "o")
    one_sentence(rc, err, f"Dataset config '{special[name]}'")


@pytest.mark.parametrize("flag", ["--data", "--resume", "--base-model"])
def test_special_file_where_a_folder_or_model_is_expected(capsys, special, demo_dataset, tmp_path, flag):
    args = {"--data": demo_dataset}
    args[flag] = special["fifo"]
    rc, _, err = cli(capsys, *TRAIN, *[x for kv in args.items() for x in kv], "--output", tmp_path / "o")
    one_sentence(rc, err, str(special["fifo"]))


@pytest.mark.parametrize("command", [["verify"], ["export", "--out", "x.safetensors"], ["generate-lora"]])
@pytest.mark.parametrize("name", ["fifo", "folder.toml", "binary.toml"])
def test_special_or_binary_file_as_lora(capsys, special, tmp_path, command, name):
    path = special[name]
    if command == ["generate-lora"]:
        argv = ["generate", "--prompt", "x", "--steps", "1", "--lora", path, "--out", tmp_path / "x.png"]
    elif command[0] == "export":
        argv = ["export", path, "--out", tmp_path / "x.safetensors"]
    else:
        argv = ["verify", path]
    rc, _, err = cli(capsys, *argv)
    one_sentence(rc, err, str(path))


# out-of-range numbers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["--seed", "-1"], "seed"), (["--seed", "4294967296"], "seed"), (["--seed", "99999999999999999999"], "seed"),
    (["--rank", "100000"], "rank"), (["--rank", "4000"], "rank: 4000 is larger than every UNet layer"),
    (["--conv-rank", "1000"], "conv_rank"), (["--sample-steps", "100000"], "sample_steps"),
    (["--steps", "1000000000000"], "steps"), (["--grad-accum", "1000000000"], "grad_accum"), (["--batch-size", "99999999"], "batch_size"),
    (["--set", "seed=inf"], "seed"), (["--lr", "nan"], "lr"), (["--lr", "inf"], "lr"), (["--alpha", "nan"], "alpha"),
    (["--sample-prompt", "a cat --d 99999999999999999999"], "--d seed 99999999999999999999"),
    (["--sample-prompt", "a cat --d -5"], "--d seed -5"), (["--sample-prompt", "a cat --w 99999992"], "--w width 99999992"),
    (["--sample-prompt", "a cat --s 100000"], "--s steps 100000"), (["--sample-prompt", "a cat --l nan"], "--l CFG scale nan"),
])
def test_out_of_range_training_settings(capsys, demo_dataset, tmp_path, args, needle):
    rc, _, err = cli(capsys, *TRAIN, "--data", demo_dataset, "--output", tmp_path / "o", *args)
    one_sentence(rc, err, needle)
    assert not (tmp_path / "o" / "lora.safetensors").exists()


@pytest.mark.parametrize("args, needle", [
    (["--seed", "-1"], "seed -1"), (["--seed", "18446744073709551616"], "seed"), (["--width", "99992"], "width 99992"),
    (["--steps", "0"], "steps 0"), (["--steps", "100000"], "steps 100000"), (["--cfg", "nan"], "CFG scale nan"),
    (["--grid", "nan,1"], "--grid"), (["--grid", ","], "--grid"), (["--grid", "a,b"], "--grid"),
])
def test_out_of_range_generate_settings(capsys, tmp_path, args, needle):
    rc, _, err = cli(capsys, "generate", "--prompt", "x", "--out", tmp_path / "x.png", *args)
    one_sentence(rc, err, needle)


# malformed LoRA files ------------------------------------------------------------------------------------------------

def _malformed(lora: Path, folder: Path) -> dict[str, Path]:
    from sdlora.tools.convert import reexport

    t, md = read_lora(lora)
    diffusers = reexport(lora, folder / "diffusers.safetensors", fmt="diffusers", precision="fp32", base_model="builtin:tiny")
    d, dmd = read_lora(diffusers)
    down = sorted(k for k in t if k.endswith(".lora_down.weight"))[0]
    prefix = down[: -len(".lora_down.weight")]
    up, alpha = f"{prefix}.lora_up.weight", f"{prefix}.alpha"
    variants = {
        "nan": {down: t[down].clone().fill_(float("nan"))},
        "inf_alpha": {alpha: torch.tensor(float("inf"))},
        "int8": {down: t[down].to(torch.int8)},
        "bool": {up: t[up].bool()},
        "alpha_vector": {alpha: torch.ones(4)},
        "odd_rank": {down: t[down][:1]},
        "rank0": {down: t[down][:0], up: t[up][:, :0]},
        "down_1d": {down: t[down].flatten()},
        "up_3d": {up: t[up][None]},
        "no_up": {up: None},
    }
    files = {}
    for name, change in variants.items():
        tensors = {k: v for k, v in {**t, **change}.items() if v is not None}
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / f"{name}.safetensors", metadata=md)
        files[name] = folder / f"{name}.safetensors"
    adapter = json.loads(dmd["lora_adapter_metadata"])
    bad_meta = {
        "meta_not_json": "{not json",
        "meta_list": "[1, 2]",
        "meta_alpha_text": json.dumps({**adapter, "unet.lora_alpha": "abc"}),
        "meta_bad_regex": json.dumps({**adapter, "unet.alpha_pattern": {"([": 3}}),
        "meta_wrong_rank": json.dumps({**adapter, "unet.r": 999, "unet.rank_pattern": {}}),
    }
    for name, meta in bad_meta.items():
        save_file(d, folder / f"{name}.safetensors", metadata={**dmd, "lora_adapter_metadata": meta})
        files[name] = folder / f"{name}.safetensors"
    a = next(k for k in d if ".lora_A." in k)
    save_file({**d, a: d[a].clone().fill_(float("nan"))}, folder / "diffusers_nan.safetensors", metadata=dmd)
    files["diffusers_nan"] = folder / "diffusers_nan.safetensors"
    (folder / "empty.safetensors").write_bytes(b"")
    (folder / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":1}garbage")
    (folder / "huge_header.safetensors").write_bytes((2**62).to_bytes(8, "little"))
    for name in ("empty", "garbage", "huge_header"):
        files[name] = folder / f"{name}.safetensors"
    return files


@pytest.fixture(scope="module")
def malformed(lora, tmp_path_factory):
    return _malformed(lora, tmp_path_factory.mktemp("malformed"))


@pytest.fixture(scope="module")
def tiny_and_pipe(tiny):
    pipe = tiny.make_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return tiny, pipe


MALFORMED = ["nan", "inf_alpha", "int8", "bool", "alpha_vector", "odd_rank", "rank0", "down_1d", "up_3d", "no_up",
             "meta_not_json", "meta_list", "meta_alpha_text", "meta_bad_regex", "meta_wrong_rank", "diffusers_nan", "empty",
             "garbage", "huge_header"]


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_lora_verify_generate_export(malformed, tiny_and_pipe, tmp_path, name):
    from sdlora.tools.convert import reexport
    from sdlora.errors import USER_ERRORS
    from sdlora.inference.loras import load_loras
    from sdlora.tools.verify import verify_lora

    base, pipe = tiny_and_pipe
    path = malformed[name]
    try:  # verify: a FAILED report naming the problem, or a sentence for an unreadable file
        report = verify_lora(path, base)
        assert not report.ok and report.problems, report.summary()
    except USER_ERRORS as exc:
        assert str(path) in str(exc)
    with pytest.raises(USER_ERRORS) as info:  # generate and the UI's Try load LoRAs this way
        load_loras(pipe, [(path, 1.0)])
    assert path.name in str(info.value)
    assert not getattr(pipe.unet, "peft_config", None)
    for fmt in ("kohya", "diffusers"):
        with pytest.raises(USER_ERRORS) as info:
            reexport(path, tmp_path / f"out_{fmt}.safetensors", fmt=fmt, base_model="builtin:tiny")
        assert path.name in str(info.value)
        assert not (tmp_path / f"out_{fmt}.safetensors").exists()


def test_malformed_lora_through_the_cli(malformed, capsys, tmp_path):
    rc, out, err = cli(capsys, "verify", malformed["alpha_vector"])
    assert rc == 1 and "alpha has shape (4,)" in out and out.strip().endswith("FAILED") and "Traceback" not in err
    rc, _, err = cli(capsys, "generate", "--prompt", "x", "--steps", "1", "--lora", f"{malformed['nan']}:0.7", "--out", tmp_path / "x.png")
    one_sentence(rc, err, str(malformed["nan"]), "NaN or infinite")
    rc, _, err = cli(capsys, "export", malformed["meta_not_json"], "--out", tmp_path / "y.safetensors")
    one_sentence(rc, err, str(malformed["meta_not_json"]), "not valid JSON")


# uploads ------------------------------------------------------------------------------------------------------------

def test_zip_entry_with_a_name_too_long_for_the_file_system(tmp_path):
    import zipfile

    from sdlora.config.train_config import ConfigError
    from sdlora.ui.uploads import import_uploads

    long_name = "a" * 296 + ".png"
    archive = tmp_path / "set.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.png", b"png")
        zf.writestr(long_name, b"png")
    with pytest.raises(ConfigError, match=f"'set.zip' contains the entry '{long_name}', whose name is longer than") as info:
        import_uploads([str(archive)], tmp_path / "uploads")
    assert "upload again" in str(info.value)
    assert list((tmp_path / "uploads").iterdir()) == []  # nothing half-imported is left behind


# caption writes that fail -------------------------------------------------------------------------------------------

def test_caption_for_an_image_with_a_very_long_name(tmp_path):
    from sdlora.data.captions import bulk_edit_captions, write_caption
    from sdlora.data.scan import scan_dataset

    stem = "x" * 250
    Image.new("RGB", (8, 8)).save(tmp_path / f"{stem}.png")
    (tmp_path / f"{stem}.txt").write_text("old")
    write_caption(tmp_path / f"{stem}.png", "new caption")  # the temp name must fit the 255-byte limit too
    assert (tmp_path / f"{stem}.txt").read_text().strip() == "new caption"
    assert bulk_edit_captions(scan_dataset(tmp_path), append="more") == 1


def test_failing_caption_writes_are_named_and_the_rest_is_done(tmp_path, monkeypatch):
    import sdlora.fileio as fileio
    from sdlora.data.captions import CaptionWriteError, bulk_edit_captions, write_caption
    from sdlora.data.scan import scan_dataset

    for name in ("a", "b", "c", "d"):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"caption {name}")
    (tmp_path / "e.png").write_bytes((tmp_path / "a.png").read_bytes())
    (tmp_path / "e.txt").mkdir()  # a folder where the caption file would go
    report = scan_dataset(tmp_path)
    real = fileio.tempfile.mkstemp

    def read_only(*a, dir=None, **k):  # tests run as root: a read-only folder is simulated
        if "b.txt" in k.get("prefix", ""):
            raise PermissionError(13, "Permission denied", str(Path(dir) / ".b.txt.tmp"))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(fileio.tempfile, "mkstemp", read_only)
    with pytest.raises(CaptionWriteError) as info:
        bulk_edit_captions(report, append="extra")
    msg = str(info.value)
    assert "could not be written: b.txt (Permission denied)" in msg and "3 caption file(s) changed" in msg
    assert info.value.written == 3 and {p.name for p, _ in info.value.failed} == {"b.txt"}
    assert (tmp_path / "a.txt").read_text().strip() == "caption a, extra"
    assert (tmp_path / "b.txt").read_text().strip() == "caption b"
    with pytest.raises(CaptionWriteError, match=r"Cannot write caption '.*b\.txt': Permission denied"):
        write_caption(tmp_path / "b.txt", "x")
    with pytest.raises(CaptionWriteError, match=r"e\.txt': it is a folder"):
        write_caption(tmp_path / "e.txt", "x")


# outputs that would replace folders or special files ------------------------------------------------------------------

@pytest.fixture
def device(tmp_path) -> Path:
    """A character device of our own (a /dev/null twin) where root may make one, else a FIFO."""
    path = tmp_path / "null"
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except (PermissionError, OSError):
        os.mkfifo(path)
    return path


def test_outputs_never_replace_a_device_a_folder_or_a_file_in_the_way(lora, capsys, tmp_path, device, demo_dataset):
    kind = os.stat(device).st_mode
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    for out, needle in ((device, "special file"), (tmp_path / "folder", "is a folder"), (tmp_path / "file" / "x.png", "is a file")):
        rc, _, err = cli(capsys, "generate", "--prompt", "x", "--steps", "1", "--out", out)
        one_sentence(rc, err, "--out", needle)
        rc, _, err = cli(capsys, "export", lora, "--out", out)
        one_sentence(rc, err, "--out", needle)
    for out, needle in ((device, "special file"), (tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "is a file")):
        rc, _, err = cli(capsys, *TRAIN, "--data", demo_dataset, "--output", out)
        one_sentence(rc, err, "output_dir", needle)
    assert os.stat(device).st_mode == kind and (tmp_path / "folder").is_dir() and (tmp_path / "file").read_text() == "x"


# the error boundary -------------------------------------------------------------------------------------------------

def test_unexpected_errors_become_one_sentence_with_a_log(capsys, monkeypatch, tmp_path, sdlora_cache):
    import sdlora.cli as cli_mod

    def boom(args):
        return {}["missing"]

    monkeypatch.setitem(cli_mod.COMMANDS, "scan", boom)
    rc, _, err = cli(capsys, "scan", tmp_path)
    line = one_sentence(rc, err, f"scan '{tmp_path}' failed: KeyError: 'missing'", code=1)
    log = Path(line.rsplit("The full error is in ", 1)[1].rstrip("."))
    assert log.is_file() and log.is_relative_to(sdlora_cache / "logs")
    assert "Traceback" in log.read_text() and "boom" in log.read_text()


@pytest.mark.parametrize("code, advice", [(errno.ENOSPC, "Free some disk space"), (errno.EROFS, "read-only")])
def test_write_failures_name_the_file_and_say_what_to_do(tmp_path, code, advice):
    from sdlora.errorlog import describe

    target = tmp_path / "out" / "lora.safetensors"
    message = describe(OSError(code, os.strerror(code), str(target)), context="Training into 'out'", out_dir=tmp_path)
    assert message.startswith(f"Training into 'out' failed. Could not write '{target}': ") and advice in message
    assert "The full error is in" in message


def test_a_failed_atomic_write_names_the_file(tmp_path, monkeypatch):
    from sdlora.errorlog import describe
    from sdlora.fileio import atomic_write_text

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() raises it: without a file name

    monkeypatch.setattr(Path, "write_text", full)
    target = tmp_path / "notes.txt"
    with pytest.raises(OSError) as info:
        atomic_write_text(target, "x")
    message = describe(info.value, context="Saving", out_dir=tmp_path)
    assert f"Could not write '{target}': the disk is full" in message and not target.exists()


def test_job_errors_become_one_sentence_with_a_log(monkeypatch, tmp_path):
    import sdlora.training.trainer as train_mod
    from sdlora.training.jobs import JobQueue

    def broken_train(config, **kw):
        (tmp_path / "out").mkdir(exist_ok=True)
        raise IndexError("list index out of range")

    monkeypatch.setattr(train_mod, "train", broken_train)
    queue = JobQueue()
    job = queue.submit(make_config(data_dir=str(tmp_path), output_dir=str(tmp_path / "out")))
    deadline = time.time() + 60
    while job.state in ("queued", "running") and time.time() < deadline:
        time.sleep(0.05)
    assert job.state == "failed"
    assert job.error.startswith(f"Training into '{tmp_path / 'out'}' failed: IndexError: list index out of range.")
    log = Path(job.error.rsplit("The full error is in ", 1)[1].rstrip("."))
    assert log.parent == tmp_path / "out" / "logs" and "broken_train" in log.read_text()
    assert not any("Traceback" in line for line in job.log)
