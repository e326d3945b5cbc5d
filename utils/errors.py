"""Errors a user can fix: scripts print the message on one line and exit with code 2."""


class MemFlowError(Exception):
    """A user-fixable problem (bad config value, missing or malformed file)."""


class ConfigError(MemFlowError):
    """A configuration field has a bad value; the message names the field and the fix."""


class WeightsError(MemFlowError):
    """A weights file is missing, truncated or has the wrong layout."""
