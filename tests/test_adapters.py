"""Every adapter type (LoCon, LoHa, LoKr, DoRA) on tiny SD1 and tiny SDXL: trains, exports in the LyCORIS layout, and the
exported file -- applied with ComfyUI's/A1111's weight formula, written out below from their definitions independently of
sdlora's own -- reproduces the trained model; strength scales as those tools scale it; verify and generate read every
type; resume is exact; LoCon adapts kohya's module set."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from sdlora.config.train_config import ConfigError, make_config
from sdlora.formats.lora_file import module_index, read_lora
from sdlora.families import SampleGeometry
from sdlora.models import load_base_model
from sdlora.training.trainer import Trainer, train
from sdlora.tools.verify import verify_lora

TYPES = {
    "locon": dict(network="locon", conv_rank=2, conv_alpha=1.0),
    "loha": dict(network="loha", conv_rank=2, conv_alpha=1.0),
    "lokr": dict(network="lokr", lokr_factor=4, conv_rank=2, conv_alpha=1.0),
    "dora": dict(network="lora", dora=True, conv_rank=2, conv_alpha=1.0),
}
PARTS = {
    "locon": {"lora_down.weight", "lora_up.weight", "alpha"},
    "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"},
    "dora": {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"},
}
MODELS = {"sd1": "builtin:tiny", "sdxl": "builtin:tiny-xl"}


def _config(tmp: Path, data: Path, base: str, **over):
    te_lr = [1e-3, 1e-3] if base.endswith("xl") else 1e-3
    values = dict(output_name="t", rank=4, alpha=2.0, targets=["attn"], steps=6, lr=1e-2, seed=7, save_precision="fp32",
                  train_text_encoder=True, text_encoder_lr=te_lr)
    values.update(over)
    return tiny_config(tmp, data, base, **values)


# -- the loaders' formula, from ComfyUI's weight_adapter (lora, loha, lokr, weight_decompose) and A1111's networks ----
def _cp(t, wa, wb):  # Tucker: core r×r×k×k with the out (wa) and in (wb) factors
    return torch.einsum("i j k l, j r, i p -> p r k l", t, wb, wa).contiguous()


def loader_weight(weight: torch.Tensor, p: dict[str, torch.Tensor], strength: float) -> torch.Tensor:
    w = weight.float()
    p = {k: v.float() for k, v in p.items()}
    if "lora_up.weight" in p:
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        scale = p["alpha"].item() / down.shape[0]
        if "lora_mid.weight" in p:  # ComfyUI: fold the Tucker core into the down factor
            mid = p["lora_mid.weight"]
            shape = [down.shape[1], down.shape[0], mid.shape[2], mid.shape[3]]
            down = torch.mm(down.transpose(0, 1).flatten(1), mid.transpose(0, 1).flatten(1)).reshape(shape).transpose(0, 1)
        diff = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    elif "hada_w1_a" in p:
        scale = p["alpha"].item() / p["hada_w1_b"].shape[0]
        if "hada_t1" in p:
            m1 = _cp(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
            m2 = _cp(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        else:
            m1, m2 = p["hada_w1_a"] @ p["hada_w1_b"], p["hada_w2_a"] @ p["hada_w2_b"]
        diff = (m1 * m2).reshape(w.shape)
    else:
        dim = None
        w1 = p.get("lokr_w1")
        if w1 is None:
            dim, w1 = p["lokr_w1_b"].shape[0], p["lokr_w1_a"] @ p["lokr_w1_b"]
        w2 = p.get("lokr_w2")
        if w2 is None:
            dim = p["lokr_w2_b"].shape[0]
            w2 = _cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]) if "lokr_t2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        scale = p["alpha"].item() / dim if dim is not None else 1.0
        diff = torch.kron(w1, w2).reshape(w.shape)
    if "dora_scale" not in p:
        return w + strength * scale * diff
    calc = w + scale * diff  # ComfyUI weight_decompose: norm per input column, then W + s·(W_dora − W)
    norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
    norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1) + torch.finfo(torch.float32).eps
    return w + strength * (calc * (p["dora_scale"] / norm) - w)


@torch.no_grad()
def apply_file_by_loader_formula(base, tensors: dict, strength: float = 1.0) -> int:
    index = module_index(base.family, base.components())
    groups: dict[str, dict] = {}
    for key, value in tensors.items():
        prefix, part = key.split(".", 1)
        groups.setdefault(prefix, {})[part] = value
    for prefix, parts in groups.items():
        component, path = index[prefix]
        layer = base.components()[component].get_submodule(path)
        layer.weight.copy_(loader_weight(layer.weight, parts, strength))
    return len(groups)


def _probe(base):
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([150, 750])
    ids = base.family.tokenize(base.tokenizers, ["sdlora_mascot, a red circle", "a photo"])
    geometry = [SampleGeometry((64, 64), (0, 0), (64, 64))] * 2
    return latents, t, ids, geometry


@torch.no_grad()
def _outputs(family, unet, encoders, probe):
    latents, t, ids, geometry = probe
    text = family.encode_tokens(encoders, ids)
    return family.unet_forward(unet, latents, t, family.conditioning(text, geometry)), text.hidden


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_dataset):
    """Each type on each tiny model, kept in memory (trained modules) beside its exported file."""
    done = {}

    def get(family: str, kind: str):
        if (family, kind) not in done:
            out = tmp_path_factory.mktemp(f"{family}_{kind}")
            trainer = Trainer(_config(out, demo_dataset, MODELS[family], **TYPES[kind]))
            trainer.prepare()
            done[family, kind] = (trainer, trainer.run())
        return done[family, kind]

    return get


# Every type on each family. Each (family, type) run is one xdist group, so the two workers share the trainings and
# neither trains one twice.
RUNS = [pytest.param(kind, family, id=f"{kind}-{family}", marks=pytest.mark.xdist_group(f"adapters_{family}_{kind}"))
        for kind in TYPES for family in ("sd1", "sdxl")]


@pytest.mark.parametrize("kind,family", RUNS)
def test_exported_file_reproduces_the_trained_model_through_the_loader_formula(runs, family, kind):
    trainer, result = runs(family, kind)
    tensors, metadata = read_lora(result.lora_path)
    parts = {k.split(".", 1)[1] for k in tensors}
    if kind == "lokr":
        assert parts & {"lokr_w1", "lokr_w1_a"} and parts & {"lokr_w2", "lokr_w2_a"} and "alpha" in parts
    else:
        assert parts == PARTS[kind]
    if kind == "dora":  # one magnitude per input column, as kohya/LyCORIS/ComfyUI/A1111 read dora_scale
        for key, value in tensors.items():
            if key.endswith(".dora_scale"):
                down = tensors[key.replace("dora_scale", "lora_down.weight")]
                assert value.shape[0] == 1 and value.shape[1] == down.shape[1], key
    args = json.loads(metadata["ss_network_args"])
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert args["algo"] == ("lora" if kind == "dora" else kind) and args["conv_dim"] == "2"
    assert any(k.startswith(("lora_te_", "lora_te1_")) for k in tensors)

    trained = trainer.base
    probe = _probe(trained)
    encoders = [trained.components()[n] for n in trained.family.text_encoder_names]
    want_out, want_hidden = _outputs(trained.family, trained.unet, encoders, probe)

    fresh = load_base_model(MODELS[family])
    before, _ = _outputs(fresh.family, fresh.unet, fresh.text_encoders, probe)
    n = apply_file_by_loader_formula(fresh, tensors, 1.0)
    assert n == len({k.split(".", 1)[0] for k in tensors})
    got_out, got_hidden = _outputs(fresh.family, fresh.unet, fresh.text_encoders, probe)
    assert (want_out - before).abs().max() > 1e-3  # the adapter learned something to reproduce
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_hidden, want_hidden, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,family", RUNS)
def test_verify_and_generate_apply_every_type_as_the_loaders_do(runs, family, kind):
    from sdlora.inference.loras import load_loras, set_strengths, unload_loras

    _, result = runs(family, kind)
    base = load_base_model(MODELS[family])
    report = verify_lora(result.lora_path, base)
    assert report.ok, report.summary()
    assert report.lora_effect > 1e-3 and report.mapped == report.modules

    # sdlora's generate path at strength 0, 0.5 and 1 against the formula above at the same strength.
    tensors, _ = read_lora(result.lora_path)
    probe = _probe(base)
    pipe = base.make_pipeline()
    plain, _ = _outputs(base.family, pipe.unet, base.text_encoders, probe)
    names = load_loras(pipe, [(result.lora_path, 0.0)])
    ref = load_base_model(MODELS[family])
    originals = {k: {n: v.clone() for n, v in m.state_dict().items()} for k, m in ref.components().items()}
    for s in (0.0, 0.5, 1.0):
        set_strengths(pipe, names, [s])
        got, _ = _outputs(base.family, pipe.unet, base.text_encoders, probe)
        for k, m in ref.components().items():
            m.load_state_dict(originals[k])
        apply_file_by_loader_formula(ref, tensors, s)
        want, _ = _outputs(ref.family, ref.unet, ref.text_encoders, probe)
        if s == 0.0:
            assert torch.equal(got, plain)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"strength {s}")
    unload_loras(pipe)
    after, _ = _outputs(base.family, pipe.unet, base.text_encoders, probe)
    assert torch.equal(after, plain)  # the base weights come back exactly


@pytest.mark.parametrize("over", [dict(network="loha", tucker=True, conv_rank=2, module_dropout=0.2),
                                  dict(network="locon", tucker=True, conv_rank=2, conv_alpha=1.0, rank_dropout=0.3),
                                  dict(network="lokr", tucker=True, conv_rank=4, lokr_factor=2, rank_dropout=0.2)],
                         ids=["loha-tucker", "locon-tucker-rank-dropout", "lokr-tucker"])
def test_tucker_cores_and_dropouts_train_and_export_what_the_loaders_compute(tmp_path, demo_dataset, over):
    trainer = Trainer(_config(tmp_path, demo_dataset, MODELS["sd1"], train_text_encoder=False, text_encoder_lr=None,
                              **over))
    trainer.prepare()
    result = trainer.run()
    tensors, metadata = read_lora(result.lora_path)
    cores = {"loha": "hada_t1", "locon": "lora_mid.weight", "lokr": "lokr_t2"}[over["network"]]
    assert any(k.endswith("." + cores) for k in tensors), sorted({k.split(".", 1)[1] for k in tensors})
    assert json.loads(metadata["ss_network_args"])["use_tucker"] == "True"
    trained = trainer.base
    trained.unet.eval()  # dropout is a training-time thing: the file is the model without it
    fresh = load_base_model(MODELS["sd1"])  # its text encoder also serves the trained UNet (the run dropped its own)
    probe = _probe(fresh)
    want, _ = _outputs(trained.family, trained.unet, fresh.text_encoders, probe)
    apply_file_by_loader_formula(fresh, tensors, 1.0)
    got, _ = _outputs(fresh.family, fresh.unet, fresh.text_encoders, probe)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    report = verify_lora(result.lora_path, load_base_model(MODELS["sd1"]))
    assert report.ok and "Tucker" in report.algorithms, report.summary()


@pytest.mark.parametrize("kind", list(TYPES))
def test_resume_is_exact_for_every_type(tmp_path, demo_dataset, kind):
    common = dict(steps=4, save_every=2, train_text_encoder=False, text_encoder_lr=None, **TYPES[kind])
    full = train(_config(tmp_path / "full", demo_dataset, MODELS["sd1"], **common))
    stop = threading.Event()
    part = train(_config(tmp_path / "part", demo_dataset, MODELS["sd1"], **common),
                 on_event=lambda e: stop.set() if e.kind == "checkpoint" and e.step == 2 else None, stop_event=stop)
    assert part.stopped_early and part.steps == 2
    resumed = train(_config(tmp_path / "part", demo_dataset, MODELS["sd1"], resume="latest", **common))
    a, _ = read_lora(full.lora_path)
    b, _ = read_lora(resumed.lora_path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_locon_adapts_kohyas_module_set_on_the_real_sd15_unet():
    """kohya's SD1.5 LoCon at dim 16 / conv 4 with the text encoder has 1,050 keys: every ResNet's 3x3 convs, its
    time_emb_proj and 1x1 conv_shortcut, and the resampling convs, besides the transformer layers."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdlora.adapters.spec import AdapterSpec
    from sdlora.adapters.inject import resolve_text_encoder_targets, resolve_unet_targets
    from sdlora.models.component_configs import MODEL_CONFIGS

    cfg = MODEL_CONFIGS["sd15"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**{k: v for k, v in cfg["unet"].items() if not k.startswith("_")})
        te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg["text_encoder"].items() if not k.startswith("_")}))
    modules = resolve_unet_targets(unet, ["transformer"], conv_rank=4) + resolve_text_encoder_targets(te)
    assert len(modules) * 3 == 1050
    names = {m.name for m in modules}
    assert "down_blocks.0.resnets.0.time_emb_proj" in names and "up_blocks.1.resnets.2.conv_shortcut" in names
    assert "down_blocks.0.downsamplers.0.conv" in names and "mid_block.resnets.1.conv2" in names
    spec = AdapterSpec(network="locon", rank=16, conv_rank=4)
    ranks = {m.name: spec.rank_alpha(m.kind)[0] for m in modules}
    assert ranks["mid_block.resnets.1.time_emb_proj"] == 16 and ranks["mid_block.resnets.1.conv1"] == 4
    # parameter counts: LoCon by formula; LoHa/LoKr/DoRA from the modules LyCORIS builds (meta device)
    lora = spec.parameter_count(modules)
    assert lora == sum(spec.rank_alpha(m.kind)[0] * (m.in_features * m.kernel ** 2 + m.out_features) for m in modules)
    dora = AdapterSpec(network="locon", rank=16, conv_rank=4, dora=True).parameter_count(modules)
    assert dora == lora + sum(m.in_features for m in modules)
    assert AdapterSpec(network="loha", rank=16, conv_rank=4).parameter_count(modules) == 2 * lora


def test_adapter_settings_that_cannot_work_are_refused_with_a_sentence(tmp_path, demo_dataset):
    with pytest.raises(ConfigError, match="conv_rank"):
        _config(tmp_path, demo_dataset, MODELS["sd1"], network="locon")
    with pytest.raises(ConfigError, match="format diffusers"):
        _config(tmp_path, demo_dataset, MODELS["sd1"], network="loha", format="diffusers")
    with pytest.raises(ConfigError, match="loraplus"):
        _config(tmp_path, demo_dataset, MODELS["sd1"], network="lokr", loraplus_lr_ratio=16)
    with pytest.raises(ConfigError, match="rank_dropout"):
        _config(tmp_path, demo_dataset, MODELS["sd1"], network="loha", dropout=0.1)


@pytest.mark.xdist_group("adapters_sd1_loha")  # the run it uses
def test_ui_service_offers_every_type(runs, tmp_path):
    """The form carries the adapter settings both ways; the parameter count follows the type; Try applies a LoHa file
    (strength 0 = base, 1 = changed); the Export tab refuses a diffusers copy of it with a sentence and re-exports the
    kohya/LyCORIS layout, verified."""
    import shutil

    import numpy as np

    from sdlora.adapters.spec import AdapterSpec
    from sdlora.ui.fields import config_to_form, form_to_config
    from sdlora.ui.services import Services

    cfg = make_config(network="lokr", lokr_factor=4, dora=True, tucker=True, conv_rank=2, rank_dropout=0.1,
                      module_dropout=0.05, dropout=0.0, lokr_full_matrix=True)
    values = form_to_config(config_to_form(cfg.model_dump()))
    assert {k: values[k] for k in ("network", "lokr_factor", "dora", "tucker", "rank_dropout", "module_dropout",
                                   "lokr_full_matrix")} == {"network": "lokr", "lokr_factor": 4, "dora": True,
                                                            "tucker": True, "rank_dropout": 0.1, "module_dropout": 0.05,
                                                            "lokr_full_matrix": True}
    with pytest.raises(ConfigError, match="tick 'conv 3x3"):
        form_to_config(dict(config_to_form(make_config().model_dump()), network="locon"))

    service = Services(output_root=tmp_path / "out", presets_dir=tmp_path)
    counts = {net: service.models.count_parameters("builtin:tiny", ["attn"], 4, 0, False,
                                            adapter=AdapterSpec(network=net, rank=4))[0] for net in ("lora", "loha")}
    assert counts["loha"] == 2 * counts["lora"]

    _, result = runs("sd1", "loha")
    lora = service.output_root / "loha_run" / "loha.safetensors"
    lora.parent.mkdir(parents=True)
    shutil.copy(result.lora_path, lora)
    assert str(lora) in service.loras.list_loras()
    common = dict(prompt="sdlora_mascot, a red circle", seed=3, steps=2)
    base_img = np.asarray(service.tryout.generate("builtin:tiny", [], **common)).astype(int)
    zero = np.asarray(service.tryout.generate("builtin:tiny", [(str(lora), 0.0)], **common)).astype(int)
    full = np.asarray(service.tryout.generate("builtin:tiny", [(str(lora), 1.0)], **common)).astype(int)
    assert np.abs(base_img - zero).max() <= 1 and np.abs(base_img - full).max() > 8
    with pytest.raises(Exception, match="plain LoRA only"):
        service.exporter.export(str(lora), fmt="diffusers", precision="fp16", name="loha_d", base_spec="builtin:tiny")
    out, summary, ok = service.exporter.export(str(lora), fmt="kohya", precision="fp16", name="loha_k", base_spec="builtin:tiny")
    assert ok and "LoHa" in summary, summary


def test_ui_parameter_count_builds_the_adapter_training_uses():
    """The Model tab counts with the AdapterSpec a run of the same settings trains, LoKr's full matrix and Tucker
    cores included."""
    from sdlora.adapters.spec import AdapterSpec
    from sdlora.ui.fields import CONV_GROUP
    from sdlora.ui.tabs.model import parameter_summary

    class Models:
        def count_parameters(self, spec, targets, rank, conv_rank, train_te, allow_pickle=False, adapter=None):
            self.adapter = adapter
            return 1234, 3, 0

    models = Models()
    text = parameter_summary(models, "builtin:tiny", ["cross-attention q/k/v/out", CONV_GROUP], 4, 2, False, False,
                             "lokr", False, 8, True, True)
    assert "**1,234**" in text
    cfg = make_config(network="lokr", rank=4, alpha=4.0, conv_rank=2, lokr_factor=8, lokr_full_matrix=True, tucker=True,
                      targets=["attn2"])
    assert models.adapter == AdapterSpec.from_config(cfg)
