"""builtin:toy draws what its prompts say, and the demo LoRA (presets/demo.toml, trained by the CLI) moves its images
from the base model toward the concept it teaches (the mascot: a pink star), monotonically in the strength, both
through sdlora's own generate and in a plain diffusers pipeline. A second demo LoRA (presets/demo-navy.toml) teaches
the word navy, and the two combine: a pink star on navy. Every check reads pixels."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, model_and_pipeline, run_cli
from toy_helpers import (COMBINED_PROMPT, CONCEPT_PROMPT, STRENGTHS, assert_both_concepts, assert_moves_to_concept,
                         concept_readings, grid_cells, navy_fraction, pink_fraction, pixels, scene_reading)


@pytest.fixture(scope="module")
def toy():
    return model_and_pipeline("builtin:toy")


# (prompt, the shape's colour, the background). Placement words ("on the left") are followed only loosely by this
# small model, so the checks are colour, background and the size words.
PROMPTS = [
    ("a red circle on a blue background", "red", "blue"),
    ("a yellow square on a black background", "yellow", "black"),
    ("a green triangle, white background, on the left", "green", "white"),
    ("a white circle on a purple background, at the top", "white", "purple"),
    ("a blue square, orange background, on the right", "blue", "orange"),
]


def test_toy_base_follows_its_prompts(toy):
    from sdlora.inference.sampling import SamplePrompt, generate

    _, pipe = toy
    misses = []
    for prompt, colour, background in PROMPTS:
        for seed in (0, 1):
            reading = scene_reading(generate(pipe, SamplePrompt(prompt=prompt, seed=seed), default_size=64))
            if (reading["colour"], reading["background"]) != (colour, background) or not 0.015 < reading["area"] < 0.5:
                misses.append((prompt, seed, reading))
    assert not misses, misses
    # size words change the area: "large" draws more of the shape than "small", same seeds
    areas = {size: np.mean([scene_reading(generate(pipe, SamplePrompt(prompt=f"a {size} red square on a green background",
                                                                      seed=seed), default_size=64))["area"]
                            for seed in (0, 1)]) for size in ("small", "large")}
    assert areas["large"] > 1.5 * areas["small"], areas


@pytest.fixture(scope="module")
def demo_lora(tmp_path_factory):
    """The demo preset as a user runs it (python -m sdlora train --config presets/demo.toml), into a temp folder."""
    out = tmp_path_factory.mktemp("toy_demo")
    proc = run_cli("train", "--config", ROOT / "presets" / "demo.toml", "--output", out, "--quiet")
    return Path(proc.stdout.strip().splitlines()[-1]), out


@pytest.mark.slow  # trains the demo LoRA(s) from the CLI
def test_demo_previews_move_toward_the_concept(demo_lora, toy):
    from sdlora.inference.sampling import SamplePrompt, generate

    _, out = demo_lora
    previews = sorted(out.rglob("step*_01.png"))  # the preset's second preview prompt: the mascot on blue, seed 2
    assert len(previews) >= 2, sorted(out.rglob("*.png"))
    before = pink_fraction(generate(toy[1], SamplePrompt(prompt=CONCEPT_PROMPT, seed=2, steps=20), default_size=64))
    assert before < 0.01, before
    # The last previews (both prompts, as the Run tab shows them) show the mascot. Training is noisy between previews,
    # and how pink one preview is moves with the float rounding of the machine's thread count, so the two are taken
    # together, as in tests/test_ui_browser.py.
    last = sorted(out.rglob(f"{previews[-1].name.split('_')[0]}_*.png"))
    assert len(last) == 2 and max(pink_fraction(Image.open(p)) for p in last) > 0.04, \
        [(p.name, pink_fraction(Image.open(p))) for p in sorted(out.rglob("step*.png"))]


@pytest.mark.slow  # trains the demo LoRA(s) from the CLI
def test_strengths_through_sdlora_generate(demo_lora, tmp_path):
    lora, _ = demo_lora
    rows = []
    for seed in (1, 2, 3):
        grid, base = tmp_path / f"grid{seed}.png", tmp_path / f"base{seed}.png"
        run_cli("generate", "--base-model", "builtin:toy", "--lora", f"{lora}:1", "--prompt", CONCEPT_PROMPT,
                "--seed", seed, "--grid", ",".join(f"{s:g}" for s in STRENGTHS), "--out", grid)
        run_cli("generate", "--base-model", "builtin:toy", "--prompt", CONCEPT_PROMPT, "--seed", seed, "--out", base)
        rows.append(grid_cells(Image.open(grid), len(STRENGTHS)))
        assert np.array_equal(pixels(rows[-1][0]), pixels(Image.open(base)))  # strength 0 is the base model, exactly
    assert_moves_to_concept(*rows)


def _plain_diffusers_pipeline():
    """builtin:toy's folder in diffusers' own StableDiffusionPipeline (Euler), no sdlora code in the way."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from sdlora.models import tiny_model_dir

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir("builtin:toy"), torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow  # trains the demo LoRA(s) from the CLI
def test_strengths_in_a_plain_diffusers_pipeline(demo_lora):
    lora, _ = demo_lora
    pipe = _plain_diffusers_pipeline()

    def images(seed):
        return pipe(CONCEPT_PROMPT, num_inference_steps=20, guidance_scale=7.0, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(seed)).images[0]

    seeds = (0, 1, 2, 3)
    base = {seed: images(seed) for seed in seeds}
    pipe.load_lora_weights(str(lora), adapter_name="demo")
    rows = []
    for seed in seeds:
        row = []
        for s in STRENGTHS:
            pipe.set_adapters(["demo"], adapter_weights=[s])
            img = images(seed)
            if s == 0:
                np.testing.assert_allclose(img, base[seed], atol=1e-6)
            row.append((img * 255).round())
        rows.append(row)
    assert_moves_to_concept(*rows)
    # fused at full strength: the same picture as the adapter at 1
    pipe.set_adapters(["demo"], adapter_weights=[1.0])
    adapter = images(seeds[0])
    pipe.fuse_lora(lora_scale=1.0, adapter_names=["demo"])
    pipe.unload_lora_weights()
    assert np.abs(images(seeds[0]) - adapter).max() < 0.02


SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def navy_lora(tmp_path_factory):
    """The second demo LoRA, as a user trains it: python -m sdlora train --config presets/demo-navy.toml."""
    out = tmp_path_factory.mktemp("toy_navy")
    proc = run_cli("train", "--config", ROOT / "presets" / "demo-navy.toml", "--output", out, "--quiet")
    return Path(proc.stdout.strip().splitlines()[-1])


def _images(pipe, prompt: str, seeds=SEEDS) -> list:
    from sdlora.inference.sampling import SamplePrompt, generate

    return [generate(pipe, SamplePrompt(prompt=prompt, seed=seed, steps=20), default_size=64) for seed in seeds]


@pytest.mark.slow  # trains the demo LoRA(s) from the CLI
def test_navy_lora_teaches_the_base_a_word(navy_lora):
    from sdlora.inference.loras import load_loras, set_strengths

    _, pipe = model_and_pipeline("builtin:toy")
    prompt = "a red circle on a navy background"
    names = load_loras(pipe, [(navy_lora, 1.0)])
    set_strengths(pipe, names, [0.0])
    before = _images(pipe, prompt)
    set_strengths(pipe, names, [1.0])
    after = _images(pipe, prompt)
    assert max(navy_fraction(i) for i in before) < 0.02  # the base has no word for navy
    assert np.mean([navy_fraction(i) for i in after]) > 0.3  # with the LoRA, the background is navy
    assert [scene_reading(i)["colour"] for i in after].count("red") >= 2  # ... and the circle is still red


@pytest.mark.slow  # trains the demo LoRA(s) from the CLI
def test_two_loras_combine_through_sdlora_generate(demo_lora, navy_lora, tmp_path):
    """Both files on the command line: the grid's 0 column is the base model, its 1 column both LoRAs at full
    strength. The library gives the same picture, and the other seeds; each LoRA alone draws only its half."""
    from sdlora.inference.loras import load_loras, set_strengths

    mascot, _ = demo_lora
    grid = tmp_path / "both.png"
    run_cli("generate", "--base-model", "builtin:toy", "--lora", f"{mascot}:1", "--lora", f"{navy_lora}:1", "--prompt",
            COMBINED_PROMPT, "--seed", SEEDS[0], "--grid", "0,1", "--out", grid)
    cli_base, cli_both = grid_cells(Image.open(grid), 2)
    _, pipe = model_and_pipeline("builtin:toy")
    names = load_loras(pipe, [(mascot, 1.0), (navy_lora, 1.0)])
    runs = {}
    for label, weights in (("base", [0.0, 0.0]), ("both", [1.0, 1.0]), ("mascot", [1.0, 0.0]), ("navy", [0.0, 1.0])):
        set_strengths(pipe, names, weights)
        runs[label] = _images(pipe, COMBINED_PROMPT)
    assert np.array_equal(pixels(runs["base"][0]), pixels(cli_base)) and np.array_equal(pixels(runs["both"][0]), pixels(cli_both))
    # the base model does not know either word (it draws some shape on some background, now and then purplish)
    (base_pink, base_navy), (both_pink, both_navy) = concept_readings(runs["base"]), concept_readings(runs["both"])
    assert both_pink > base_pink + 0.04 and both_navy > base_navy + 0.25, (base_pink, base_navy, both_pink, both_navy)
    assert_both_concepts(runs["both"], runs["mascot"], runs["navy"])


@pytest.mark.slow  # trains the demo LoRA(s) from the CLI
def test_two_loras_combine_in_a_plain_diffusers_pipeline(demo_lora, navy_lora):
    mascot, _ = demo_lora
    pipe = _plain_diffusers_pipeline()
    pipe.load_lora_weights(str(mascot), adapter_name="mascot")
    pipe.load_lora_weights(str(navy_lora), adapter_name="navy")

    def images(weights):
        pipe.set_adapters(["mascot", "navy"], adapter_weights=weights)
        return [(pipe(COMBINED_PROMPT, num_inference_steps=20, guidance_scale=7.0, height=64, width=64, output_type="np",
                      generator=torch.Generator().manual_seed(seed)).images[0] * 255).round() for seed in (0, 1, 2, 3)]

    assert_both_concepts(images([1.0, 1.0]), images([1.0, 0.0]), images([0.0, 1.0]))


def test_toy_weights_are_checked_before_use(tmp_path):
    from sdlora.models import ModelLoadError
    from sdlora.models.toy import TOY_ASSETS, TOY_SHA256, unpack_toy_model

    assets = tmp_path / "assets"
    shutil.copytree(TOY_ASSETS, assets)
    unpack_toy_model(tmp_path / "ok", assets=assets, expected=TOY_SHA256)
    assert (tmp_path / "ok" / "unet" / "config.json").is_file()
    weights = assets / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="diffusion_pytorch_model.safetensors is missing or altered"):
        unpack_toy_model(tmp_path / "bad", assets=assets, expected=TOY_SHA256)
    (assets / "SHA256SUMS").write_text("0" * 64 + "  unet/config.json\n")
    with pytest.raises(ModelLoadError, match="does not match the hash pinned"):
        unpack_toy_model(tmp_path / "bad2", assets=assets, expected=TOY_SHA256)


def test_an_older_demo_set_is_replaced(tmp_path):
    from sdlora.data.demo import make_demo_dataset

    old = tmp_path / "demo" / "10_demo"
    old.mkdir(parents=True)
    (old / "mascot_00.png").write_bytes(b"old")
    (old / ".complete").write_text("ok\n")  # what sdlora before the pink star wrote
    make_demo_dataset(tmp_path / "demo", count=2, size=64)
    assert sorted(p.name for p in old.iterdir()) == [".complete", *sorted(f"mascot_0{i}.{e}" for i in (0, 1) for e in ("png", "txt"))]
    assert pink_fraction(Image.open(old / "mascot_00.png")) > 0.05
    assert [p.name for p in (tmp_path / "demo").iterdir()] == ["10_demo"]
