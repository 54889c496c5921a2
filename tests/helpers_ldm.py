"""Test helper: write a diffusers pipeline as one checkpoint in the original layout. The conversion is the library's
(sdlora.formats.ldm_checkpoint, which `merge` writes with); this module only re-exports it for the tests."""

from __future__ import annotations

from sdlora.formats.ldm_checkpoint import (  # noqa: F401 (re-exported for the tests)
    pipeline_to_ldm,
    sdxl_pipeline_to_ldm,
    text_encoder_to_ldm,
    text_encoder_to_openclip_ldm,
    unet_to_ldm,
    vae_to_ldm,
)
