"""embedtrain's version (setup.py's `version`; CHANGELOG.md): its own module so that an export can
record which embedtrain wrote it without importing the package's user-facing entry point."""

__version__ = "0.1.0"
