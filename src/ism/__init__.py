"""iSM, the integrated Security Manager."""

__version__ = "0.1.0"
