__version__ = "0.1.0"

def __getattr__(name):  # `cellmtl.load(dir)` without importing torch on `import cellmtl` (written by hand: nbdev only sets __version__)
    if name == "load":
        from .base import load
        return load
    raise AttributeError(f"module 'cellmtl' has no attribute {name!r}")
