"""Images per second of WD14 tagging at 448 px, end to end through sdlora.captioning (open, pad, resize, BGR, the
ONNX model, choosing tags, writing captions) and the model alone.

The tagger is a small convolutional net with random weights in the WD14 layout (input N x 448 x 448 x 3, BGR 0..255,
channels last; 10,861 tag probabilities as in wd-v1-4), built with onnx.helper, so no download is needed; the images
are random-noise JPEGs of 768 x 1024. A real wd-v1-4 / wd-v3 network is far heavier, so its model time dominates.

    python bench/caption_speed.py                       # 64 images, batch 8, CPU
    python bench/caption_speed.py --images 256 --batch-size 32 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

TAGS = 10861


def build_tagger(folder: Path, size: int = 448, tags: int = TAGS, seed: int = 0) -> Path:
    """model.onnx: NHWC -> NCHW, three strided convolutions with ReLU, global average pool, a dense layer, sigmoid."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32), name)

    inits = [weight("c1", 32, 3, 7, 7), weight("c2", 64, 32, 3, 3), weight("c3", 128, 64, 3, 3), weight("fc", 128, tags),
             numpy_helper.from_array(np.zeros(tags, np.float32), "fb"),
             numpy_helper.from_array(np.array([1 / 255.0], np.float32), "scale"),
             numpy_helper.from_array(np.array([-1, 128], np.int64), "flat")]
    nodes = [helper.make_node("Transpose", ["input_1:0"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Mul", ["nchw", "scale"], ["x0"]),
             helper.make_node("Conv", ["x0", "c1"], ["x1"], strides=[4, 4], pads=[3, 3, 3, 3]),
             helper.make_node("Relu", ["x1"], ["r1"]),
             helper.make_node("Conv", ["r1", "c2"], ["x2"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["x2"], ["r2"]),
             helper.make_node("Conv", ["r2", "c3"], ["x3"], strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["x3"], ["r3"]),
             helper.make_node("GlobalAveragePool", ["r3"], ["pool"]),
             helper.make_node("Reshape", ["pool", "flat"], ["feat"]),
             helper.make_node("MatMul", ["feat", "fc"], ["logits0"]),
             helper.make_node("Add", ["logits0", "fb"], ["logits"]),
             helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"])]
    graph = helper.make_graph(nodes, "bench_tagger",
                              [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["N", size, size, 3])],
                              [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, ["N", tags])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    categories = [9] * 4 + [4] * 1000 + [0] * (tags - 1004)
    rows = ["tag_id,name,category,count"] + [f"{i},tag_{i},{c},{tags - i}" for i, c in enumerate(categories)]
    (folder / "selected_tags.csv").write_text("\n".join(rows) + "\n")
    return folder


def make_images(folder: Path, n: int, seed: int = 1) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (1024, 768, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.jpg", quality=90)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from PIL import Image

    from sdlora.captioning import CaptionOptions, TagOptions
    from sdlora.captioning.run import CaptionDone, caption_dataset, load_model

    with tempfile.TemporaryDirectory() as tmp:
        tagger, data = build_tagger(Path(tmp) / "tagger", args.size), Path(tmp) / "data"
        make_images(data, args.images)
        options = CaptionOptions(kind="wd14", model=str(tagger), mode="overwrite", batch_size=args.batch_size,
                                 device=args.device, tags=TagOptions(max_tags=40))  # random weights pass many tags
        model = load_model(options)
        model.load()
        batch = [Image.open(data / "img0000.jpg").convert("RGB")] * args.batch_size
        model.probabilities(batch)  # warm-up: onnxruntime plans its kernels on the first run
        t = time.perf_counter()
        rounds = max(1, args.images // args.batch_size)
        for _ in range(rounds):
            model.probabilities(batch)
        model_only = rounds * args.batch_size / (time.perf_counter() - t)
        device = model.device
        t = time.perf_counter()
        summary = next(e.summary for e in caption_dataset(data, options, model=model) if isinstance(e, CaptionDone))
        handled = summary.tagged + summary.unchanged + summary.empty
        end_to_end = handled / (time.perf_counter() - t)
        assert handled == args.images, summary.lines()
    result = {"images": args.images, "batch_size": args.batch_size, "size": args.size, "device": device,
              "tags": TAGS, "end_to_end_images_per_s": round(end_to_end, 2), "model_images_per_s": round(model_only, 2)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"WD14 tagging at {args.size} px on {device}, batch {args.batch_size}, {args.images} images of 768x1024: "
              f"{end_to_end:.2f} images/s end to end, {model_only:.2f} images/s for the model alone")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
