"""Errors the command line reports as one clear sentence instead of a traceback."""


class BrainMRIError(Exception):
    """Base class for errors caused by the user's input, configuration or data."""


class ConfigError(BrainMRIError):
    """params.yaml is missing, malformed, or holds an unknown key or impossible value."""


class DataError(BrainMRIError):
    """The dataset (folder or archive) is laid out wrongly or has too few usable images."""


class ImageError(BrainMRIError):
    """One image file cannot be used; ingest quarantines it and goes on."""


class DecodeError(ImageError):
    """The image library (Pillow or a plugin) failed on a file's content: hostile or damaged input, never retried."""


class WeightsError(BrainMRIError):
    """Pretrained weights were asked for but cannot be had (offline ImageNet download)."""
