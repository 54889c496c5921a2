"""Which images a run learns from and how each becomes a training sample: folders, masks, size, captions."""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BaseModel, Field, field_validator, model_validator

from ..checks import at_most, clean_text, non_negative_int
from ..flags import Flag


class DataSettings(BaseModel):
    # where the images are
    data_dir: Annotated[str, Flag("--data")] = Field("", description="folder of images with captions")
    dataset_config: Annotated[str, Flag("--dataset-config", help="kohya dataset TOML ([general], [[datasets]], "
                                                                 "[[datasets.subsets]])")] = Field(
        "", description="kohya dataset TOML ([general], [[datasets]], [[datasets.subsets]]); replaces data_dir")
    reg_data_dir: Annotated[str, Flag("--reg-data", help="regularization images in kohya N_class folders")] = Field(
        "", description="regularization images in kohya's N_class folders (class images)")
    prior_loss_weight: Annotated[float, Flag("--prior-loss-weight", help="loss weight of regularization samples "
                                                                         "(1.0)")] = Field(
        1.0, description="loss weight of regularization samples (kohya's prior_loss_weight)")
    masked_loss: Annotated[bool, Flag("--masked-loss", sets=True)] = Field(
        False, description="masked loss (kohya's masked_loss): weight the loss per pixel by each image's alpha "
                           "channel, else its mask in mask_dir (white = learn, black = ignore); images with neither "
                           "are learned whole")
    mask_dir: Annotated[str, Flag("--mask-dir", help="folder of grayscale loss masks named like their images (with "
                                                     "--masked-loss)")] = Field(
        "", description="folder of grayscale masks named like their images (used with masked_loss)")

    # how an image becomes a sample
    resolution: Annotated[int, Flag("--resolution")] = 512
    center_crop: Annotated[bool, Flag("--random-crop", sets=False)] = True
    random_flip: Annotated[bool, Flag("--random-flip", sets=True)] = False
    enable_buckets: Annotated[bool, Flag("--buckets", sets=True)] = False
    bucket_no_upscale: Annotated[bool, Flag("--bucket-no-upscale", sets=True)] = Field(
        False, description="with buckets: an image smaller than resolution² keeps its own size (sides rounded down "
                           "to the bucket step) instead of being upscaled")
    upscale_small: Annotated[bool, Flag("--no-upscale-small", sets=False)] = Field(
        True, description="upscale images smaller than the resolution (else skip them)")

    # captions
    default_caption: Annotated[str, Flag("--default-caption")] = ""
    trigger_word: Annotated[str, Flag("--trigger-word")] = ""
    caption_dropout: Annotated[float, Flag("--caption-dropout")] = 0.0
    shuffle_tags: Annotated[bool, Flag("--shuffle-tags", sets=True)] = False
    keep_tokens: Annotated[int, Flag("--keep-tokens")] = 0
    caption_tag_dropout_rate: Annotated[float, Flag("--caption-tag-dropout-rate")] = Field(
        0.0, description="drop each comma-separated tag with this probability per step (the first keep_tokens tags "
                         "and the trigger word stay)")

    # loading
    cache_latents: Annotated[bool, Flag("--no-cache-latents", sets=False)] = True
    num_workers: Annotated[int, Flag("--num-workers")] = 0

    _data_limits = field_validator("keep_tokens", "num_workers")(at_most({"keep_tokens": 1000, "num_workers": 256}))
    _data_counts = field_validator("keep_tokens", "num_workers")(non_negative_int)
    _data_text = field_validator("trigger_word", "default_caption")(clean_text)

    @field_validator("resolution")
    @classmethod
    def _resolution_valid(cls, v: int) -> int:
        if v < 64 or v % 8:
            raise ValueError("must be a multiple of 8 and at least 64 (e.g. 512 for SD1.5, 768 for SD2)")
        if v > 4096:
            raise ValueError("must be at most 4096")
        return v

    @field_validator("caption_dropout", "caption_tag_dropout_rate")
    @classmethod
    def _probability(cls, v: float) -> float:
        if not 0 <= v < 1:
            raise ValueError("must be between 0 and 1 (a probability; 0.05 is usual)")
        return v

    @field_validator("prior_loss_weight")
    @classmethod
    def _prior_weight(cls, v: float) -> float:
        if not math.isfinite(v) or v < 0 or v > 1000:
            raise ValueError("must be between 0 and 1000 (1.0 is usual)")
        return v

    @model_validator(mode="after")
    def _data_rules(self):
        if self.bucket_no_upscale and not self.enable_buckets:
            raise ValueError("bucket_no_upscale needs aspect-ratio buckets: turn on enable_buckets (--buckets) or remove bucket_no_upscale")
        if self.dataset_config and self.data_dir:
            raise ValueError("data_dir and dataset_config are both set: the dataset TOML names its own image folders, so "
                             "clear data_dir (--data) or dataset_config")
        if self.reg_data_dir and self.dataset_config:
            raise ValueError("reg_data_dir and dataset_config are both set: put the regularization folders in the dataset "
                             "TOML as subsets with is_reg = true, or clear dataset_config")
        if self.mask_dir and not self.masked_loss:
            raise ValueError("mask_dir is set but masked_loss is off: turn on masked_loss (--masked-loss) or clear mask_dir")
        return self
