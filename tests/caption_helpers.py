"""Tiny captioning models built on the spot (never downloaded): a WD14-style ONNX tagger whose tag probabilities
follow the image's colour, in kohya's folder layout, and random BLIP / GIT models with a tokenizer written to disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REPO_ID = "SmilingWolf/wd-v1-4-moat-tagger-v2"
# (name, category, weights on the B, G, R channel means in 0..1, bias): p = sigmoid(w . mean + bias)
TAGS = [
    ("general", 9, (0, 0, 0), 2.0),           # rating, p 0.88 always
    ("explicit", 9, (0, 0, 0), -2.0),         # rating, p 0.12
    ("blue_background", 0, (10, 0, 0), -5.0),
    ("green_background", 0, (0, 10, 0), -5.0),
    ("red_background", 0, (0, 0, 10), -5.0),
    ("hatsune_miku", 4, (0, 0, 10), -5.0),    # character, on red
    ("^_^", 0, (0, 0, 0), 0.0),               # p 0.5 always: a kaomoji keeps its underscore
]
SIZE = 32


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def build_tagger(folder: Path, size: int = SIZE, tags=TAGS, *, fixed_batch: int | None = None) -> Path:
    """model.onnx (input N x size x size x 3 float, BGR 0..255: channel means -> MatMul -> Sigmoid) and
    selected_tags.csv in `folder`."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    weights = np.array([t[2] for t in tags], dtype=np.float32).T / 255.0  # 3 x T, on 0..255 means
    bias = np.array([t[3] for t in tags], dtype=np.float32)
    nodes = [helper.make_node("ReduceMean", ["input_1:0", "axes"], ["means"], keepdims=0),
             helper.make_node("MatMul", ["means", "w"], ["logits0"]),
             helper.make_node("Add", ["logits0", "b"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])]
    inits = [helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
             helper.make_tensor("w", TensorProto.FLOAT, list(weights.shape), weights.flatten().tolist()),
             helper.make_tensor("b", TensorProto.FLOAT, [len(tags)], bias.tolist())]
    graph = helper.make_graph(nodes, "tiny_tagger",
                              [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, [fixed_batch or "N", size, size, 3])],
                              [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [fixed_batch or "N", len(tags)])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    lines = ["tag_id,name,category,count"] + [f"{i},{n},{c},{100 - i}" for i, (n, c, _, _) in enumerate(tags)]
    (folder / "selected_tags.csv").write_text("\n".join(lines) + "\n")
    return folder


def kohya_tagger(model_dir: Path) -> Path:
    """The tagger where kohya's script keeps REPO_ID: MODEL_DIR/SmilingWolf_wd-v1-4-moat-tagger-v2/."""
    return build_tagger(model_dir / REPO_ID.replace("/", "_"))


def colour_dataset(folder: Path, colours: dict[str, tuple[int, int, int]], size=(40, 40)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rgb in colours.items():
        Image.new("RGB", size, rgb).save(folder / f"{name}.png")
    return folder


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "red", "green", "blue", "cat",
         "dog", "square", "white", ",", "."]


def _tiny_blip2(folder: Path, vision: dict):
    """BLIP-2 over a one-layer OPT, with a byte-level BPE vocabulary of a few words."""
    import json

    import transformers as T

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "\u0120photo": 4, "\u0120of": 5, "\u0120red": 6, "\u0120cat": 7,
             "<image>": 8, "\u0120": 9}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = T.GPT2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<unk>", bos_token="</s>",
                          eos_token="</s>", pad_token="<pad>")
    tok.image_token = "<image>"
    processor = T.Blip2Processor(image_processor=T.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok,
                                 num_query_tokens=4)
    qformer = dict(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   encoder_hidden_size=16, max_position_embeddings=32)
    text = dict(model_type="opt", vocab_size=len(vocab), hidden_size=16, ffn_dim=32, num_hidden_layers=1,
                num_attention_heads=2, word_embed_proj_dim=16, max_position_embeddings=64, bos_token_id=1, eos_token_id=1,
                pad_token_id=0)
    config = T.Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=4,
                           image_token_index=8)
    return T.Blip2ForConditionalGeneration(config), processor


def build_caption_model(folder: Path, kind: str = "blip") -> Path:
    """A random BLIP, GIT or BLIP-2 (hidden size 16, one layer) with its processor, from configs and a vocabulary
    written here."""
    import torch
    import transformers as T

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = T.BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=16)
    torch.manual_seed(0)
    if kind == "blip-2":
        model, processor = _tiny_blip2(folder, vision)
    elif kind == "blip":
        tok.add_special_tokens({"bos_token": "[DEC]"})
        processor = T.BlipProcessor(image_processor=T.BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
        text = dict(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                    encoder_hidden_size=16, max_position_embeddings=64, bos_token_id=5, pad_token_id=0, sep_token_id=3)
        model = T.BlipForConditionalGeneration(T.BlipConfig(vision_config=vision, text_config=text, projection_dim=16))
    else:
        image_processor = T.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        processor = T.GitProcessor(image_processor=image_processor, tokenizer=tok)
        model = T.GitForCausalLM(T.GitConfig(vision_config=vision, vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                                             bos_token_id=2, eos_token_id=3, pad_token_id=0))
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
