"""Errors the command line reports as one clear sentence instead of a traceback."""

MAX_MESSAGE = 2000  # characters: a message quoting a hostile value (a 500 KB class name) stays a sentence


class BrainMRIError(Exception):
    """Base class for errors caused by the user's input, configuration or data. Its text is one line: a newline or
    other control character inside a value it quotes (a key named "a\nb") is shown escaped, and it is capped."""

    def __str__(self) -> str:
        return one_line(super().__str__())


def one_line(text: str) -> str:
    """`text` with control characters written as escapes (\n, \x1b...) and cut at MAX_MESSAGE characters."""
    out = "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)
    return out if len(out) <= MAX_MESSAGE else out[: MAX_MESSAGE - 20] + " ... (message cut)"


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
