"""Datasets: folder scan and report, captions, robust image loading, aspect buckets, the demo dataset."""

from .buckets import assign_bucket, bucket_batches, make_buckets
from .captions import build_caption, bulk_edit_captions, split_tags, write_caption
from .demo import make_demo_dataset
from .images import ImageLoadError, image_to_tensor, load_training_image, open_image_rgb, resize_and_crop
from .scan import IMAGE_EXTENSIONS, DatasetError, DatasetReport, ImageItem, SkippedFile, scan_dataset

__all__ = [
    "assign_bucket", "bucket_batches", "make_buckets", "build_caption", "bulk_edit_captions", "split_tags", "write_caption",
    "make_demo_dataset", "ImageLoadError", "image_to_tensor", "load_training_image", "open_image_rgb", "resize_and_crop",
    "IMAGE_EXTENSIONS", "DatasetError", "DatasetReport", "ImageItem", "SkippedFile", "scan_dataset",
]
