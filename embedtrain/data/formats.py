"""The input formats `embedtrain prepare` reads, each converted into the embed-nemotron folder layout
(embedtrain.data.nemotron) before validation and sharding."""

from pathlib import Path

FORMATS = ("auto", "nemotron")


def to_layout(src, input_format, staging):
    """A folder in the embed-nemotron layout holding `src`'s data; `staging` is where conversions go."""
    return Path(src)
