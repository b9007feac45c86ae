r"""Short forms of values for error messages."""


def shorten(text: str, width: int = 80) -> str:
    r"""`text` cut to `width` characters, with "..." marking a cut."""
    return text if len(text) <= width else text[: width - 3] + "..."
