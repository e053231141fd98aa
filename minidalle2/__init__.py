"""minidalle2: DALL-E 2 (unCLIP) rebuilt from first principles at toy scale."""

__version__ = "0.1.0"
