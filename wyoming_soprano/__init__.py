"""Wyoming protocol server for the Soprano text-to-speech engine."""

from importlib.metadata import version

__version__ = version("wyoming-soprano")
