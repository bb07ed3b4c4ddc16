"""Kernel families: each module holds the kernel(s) and its pure-torch ``*_reference``."""
