"""MindSpore inference stack for Open-Sora 2.0."""

__version__ = "0.1.0"
