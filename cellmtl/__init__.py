"""cellmtl: multi-task deep learning on single-cell data, one literate notebook per component.

The models take AnnData and share one set of verbs (fit / predict / predict_proba / embed / annotate /
save / load): PH-Map's hierarchical annotator (`cellmtl.mtl.HierarchicalAnnotator`), HRCA's Gene-AE and
SE-Classifier (`cellmtl.hrca.HRCAAnnotator`) and the scGPT family (`cellmtl.scgpt.annotator.TransformerAnnotator`).
`cellmtl.load(directory)` reloads any saved model; `cellmtl.datasets` loads the real datasets; the tutorials
in the repository's nbs/tutorials/ walk through whole workflows. help() on any function lists its parameters.
"""
__version__ = "0.1.0"

def __getattr__(name):  # `cellmtl.load(dir)` without importing torch on `import cellmtl` (written by hand: nbdev only sets __version__)
    if name == "load":
        from .base import load
        return load
    raise AttributeError(f"module 'cellmtl' has no attribute {name!r}")
