"""The command line end to end, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import ROOT, run_cli, subprocess_env


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, demo_dataset):
    out = tmp_path_factory.mktemp("cli_out")
    prompts = out / "prompts.txt"
    prompts.write_text("sdlora_mascot, a red circle --d 3 --s 4\n# comment\na blue square --n red --w 64 --h 64 --l 5 --s 3\n")
    proc = run_cli("train", "--base-model", "builtin:tiny", "--data", demo_dataset, "--output", out, "--steps", 20,
                   "--rank", 4, "--alpha", 4, "--targets", "to_q,to_k,to_v,to_out.0,proj_in", "--resolution", 64,
                   "--batch-size", 2, "--lr", "1e-3", "--sample-every", 10, "--sample-prompts", prompts, "--save-every", 10,
                   "--trigger-word", "sdlora_mascot", "--output-name", "cli_lora", "--seed", 3, "--min-snr-gamma", 5,
                   "--noise-offset", "0.05", "--lr-scheduler", "cosine", "--warmup-steps", 2)
    return out, proc


def test_cli_train_end_to_end(cli_run):
    out, proc = cli_run
    last = proc.stdout.strip().splitlines()[-1]
    assert Path(last) == (out / "cli_lora.safetensors").resolve()
    assert Path(last).is_file()
    samples = sorted((out / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["step000010_00.png", "step000010_01.png", "step000020_00.png", "step000020_01.png"]
    assert Image.open(samples[0]).size == (64, 64)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 21))
    assert all({"step", "loss", "lr", "seconds"} <= r.keys() for r in log)
    assert (out / "checkpoints" / "step000010" / "lora.safetensors").is_file()
    assert "Found 6 images" in proc.stderr
    with safe_open(last, "pt") as fh:
        keys = list(fh.keys())
        md = fh.metadata()
    assert any(k.endswith("attn1_to_q.lora_down.weight") for k in keys)
    assert not any("ff_net" in k for k in keys)
    assert md["modelspec.trigger_phrase"] == "sdlora_mascot"


def test_cli_verify_and_generate(cli_run, tmp_path):
    out, proc = cli_run
    lora = proc.stdout.strip().splitlines()[-1]
    v = run_cli("verify", lora, "--base-model", "builtin:tiny")
    assert "OK" in v.stdout
    # a LoRA whose keys do not fit the model fails verification
    tensors = {}
    with safe_open(lora, "pt") as fh:
        for k in fh.keys():
            tensors[k.replace("down_blocks_0", "down_blocks_7")] = fh.get_tensor(k)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad)
    v_bad = run_cli("verify", bad, "--base-model", "builtin:tiny", check=False)
    assert v_bad.returncode != 0 and "unmapped" in v_bad.stdout
    imgs = {}
    for s in ("0", "1", "0.5"):
        target = tmp_path / f"s{s}.png"
        g = run_cli("generate", "--base-model", "builtin:tiny", "--lora", f"{lora}:{s}", "--prompt", "sdlora_mascot",
                    "--seed", 5, "--steps", 4, "--out", target)
        assert Path(g.stdout.strip().splitlines()[-1]) == target.resolve()
        imgs[s] = Image.open(target).tobytes()
    base = tmp_path / "base.png"
    run_cli("generate", "--base-model", "builtin:tiny", "--prompt", "sdlora_mascot", "--seed", 5, "--steps", 4, "--out", base)
    assert imgs["0"] == Image.open(base).tobytes()
    assert imgs["1"] != imgs["0"] and imgs["0.5"] != imgs["1"]
    # two LoRAs combine; a grid renders one column per strength
    grid = tmp_path / "grid.png"
    run_cli("generate", "--base-model", "builtin:tiny", "--lora", f"{lora}:0.5", "--lora", f"{lora}:0.5",
            "--prompt", "x", "--steps", 2, "--grid", "0,0.5,1", "--out", grid)
    assert Image.open(grid).size[0] == 3 * 64


def test_cli_config_and_set_override(tmp_path, demo_dataset):
    preset = tmp_path / "p.toml"
    preset.write_text(f'base_model = "builtin:tiny"\ndata_dir = "{demo_dataset}"\n[lora]\nrank = 2\n[training]\nsteps = 3\nresolution = 64\n')
    out = tmp_path / "o"
    proc = run_cli("train", "--config", preset, "--set", "rank=3", "--set", "output_name='x'", "--output", out, "--quiet")
    with safe_open(proc.stdout.strip().splitlines()[-1], "pt") as fh:
        assert fh.metadata()["ss_network_dim"] == "3"
        assert fh.metadata()["ss_steps"] == "3"


@pytest.mark.parametrize("args, needle", [
    (["--set", "rnak=4"], "rnak"),
    (["--rank", "0"], "rank"),
    (["--alpha", "-1"], "alpha"),
    (["--resolution", "100"], "resolution"),
    (["--set", "lr='fast'"], "lr"),
    (["--set", "optimizer='sgdx'"], "optimizer"),
    (["--text-encoder-lr", "1e-5"], "text_encoder_lr"),
    (["--targets", "to_qq"], "to_qq"),
])
def test_cli_bad_config_is_refused_with_field_name(tmp_path, demo_dataset, args, needle, capsys):
    from sdlora.cli import main

    code = main(["train", "--base-model", "builtin:tiny", "--data", str(demo_dataset), "--output", str(tmp_path), "--steps", "2",
                 "--resolution", "64", *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.safetensors"))


def test_cli_missing_dataset_fails_before_model_load(tmp_path):
    proc = run_cli("train", "--base-model", "/nonexistent/model.safetensors", "--data", tmp_path / "nope", "--output", tmp_path,
                   check=False)
    assert proc.returncode == 2 and "nope" in proc.stderr and "Traceback" not in proc.stderr


def test_generate_refuses_a_lora_for_another_architecture(tmp_path):
    import torch

    sdxl = tmp_path / "sdxl_lora.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 768),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 4),
               "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 640)}, sdxl)
    proc = run_cli("generate", "--base-model", "builtin:tiny", "--lora", f"{sdxl}:1", "--prompt", "x", "--out", tmp_path / "x.png",
                   check=False)
    assert proc.returncode == 2 and "SDXL" in proc.stderr and "Traceback" not in proc.stderr
    missing = run_cli("generate", "--lora", tmp_path / "nope.safetensors", "--prompt", "x", "--out", tmp_path / "y.png", check=False)
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_scan_and_help_do_not_import_torch(tmp_path):
    """The first commands a new user types answer at once: no torch/diffusers/bitsandbytes imports."""
    from PIL import Image

    Image.new("RGB", (64, 64), "red").save(tmp_path / "a.png")
    code = ("import sys; from sdlora.cli import main; rc = main(['scan', sys.argv[1]]); "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'bitsandbytes', 'peft') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout
    proc = subprocess.run([sys.executable, "-c", "import sys; import sdlora.cli as c\ntry:\n    c.main(['--help'])\n"
                           "except SystemExit:\n    pass\nprint('HEAVY', [m for m in ('torch', 'diffusers') if m in sys.modules])"],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
