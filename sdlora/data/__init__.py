"""Datasets: folder scan and report, captions, robust image loading, aspect buckets, the demo dataset."""

from .buckets import assign_bucket, bucket_batches, make_buckets
from .captions import (
    CAPTION_EXTENSIONS,
    build_caption,
    bulk_edit_captions,
    split_tags,
    write_caption,
)
from .demo import make_demo_dataset
from .images import (
    MAX_PIXELS,
    ImageLoadError,
    image_to_tensor,
    load_training_image,
    open_image_rgb,
    resize_and_crop,
)
from .scan import (
    IMAGE_EXTENSIONS,
    DatasetError,
    DatasetReport,
    ImageItem,
    SkippedFile,
    scan_dataset,
)

__all__ = [
    "CAPTION_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "DatasetError",
    "DatasetReport",
    "ImageItem",
    "ImageLoadError",
    "SkippedFile",
    "assign_bucket",
    "bucket_batches",
    "build_caption",
    "bulk_edit_captions",
    "image_to_tensor",
    "load_training_image",
    "make_buckets",
    "make_demo_dataset",
    "open_image_rgb",
    "resize_and_crop",
    "scan_dataset",
    "split_tags",
    "write_caption",
]
