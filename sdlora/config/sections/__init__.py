"""The sections of a TrainConfig, each with its own fields and checks, in the order a saved preset lists them."""

from .adapter import AdapterSettings
from .data import DataSettings
from .loss import LossSettings
from .model import ModelSettings
from .optimisation import OptimisationSettings
from .output import OutputSettings
from .previews import PreviewSettings
from .schedule import ScheduleSettings
from .validation import ValidationSettings

SECTIONS = (ModelSettings, DataSettings, ValidationSettings, AdapterSettings, OptimisationSettings, LossSettings,
            ScheduleSettings,
            PreviewSettings, OutputSettings)

__all__ = ["SECTIONS", "AdapterSettings", "DataSettings", "LossSettings", "ModelSettings", "OptimisationSettings", "OutputSettings",
           "PreviewSettings", "ScheduleSettings", "ValidationSettings"]
