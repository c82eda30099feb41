"""The error every bad config value raises (its message names the dotted key and the fix)."""


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range."""


def check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


class DiskFullError(OSError):
    """A stage could not be written: no space left on the device of its folder (the message names stage and folder)."""
