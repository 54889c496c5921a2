"""Using LoRAs: pipelines with LoRAs at chosen strengths, sampling, strength grids."""
