"""The docments comments reach `__doc__` (help(), pydoc, IPython's `?`): cellmtl.docstrings on the real modules."""
import importlib
import inspect
import pkgutil
import pydoc
import subprocess
import sys
import textwrap

import pytest
from fastcore.basics import patch
from fastcore.docments import docments

import cellmtl
from cellmtl.docstrings import SourceIndex, document, document_module, parameter_docs

MODULES = ["cellmtl.mtl", "cellmtl.data", "cellmtl.train", "cellmtl.base", "cellmtl.scgpt.annotator"]


def _own_objects(module):
    "Every function, class and public class member that `document_module` looks at in `module`."
    from cellmtl.docstrings import _members, _own
    for name in module.__all__:
        obj = getattr(module, name, None)
        if inspect.isclass(obj) and _own(obj, module.__name__): yield from ((f"{name}.{getattr(m, '__name__', '')}", m) for m in _members(obj, module.__name__))
        elif inspect.isfunction(obj) and _own(obj, module.__name__): yield name, obj


@pytest.fixture(scope="module")
def modules():
    mods = {name: importlib.import_module(name) for name in MODULES}
    before = {(name, label): obj.__doc__ for name, m in mods.items() for label, obj in _own_objects(m)}
    for m in mods.values(): document_module(vars(m))
    return mods, before


def test_fit_parameters_reach_help(modules):
    from cellmtl.mtl import HierarchicalAnnotator
    text = pydoc.render_doc(HierarchicalAnnotator.fit, renderer=pydoc.plaintext)
    assert "Adam learning rate (PH-Map: 1e-3)" in text  # fit's comment on `lr`, in nbs/10_mtl.ipynb
    assert "stratify_by : str | None, default None" in text
    assert "**train_overrides\n" in inspect.getdoc(HierarchicalAnnotator.fit)
    assert inspect.getdoc(HierarchicalAnnotator.fit).splitlines()[0] == "Train PH-Map on `adata`'s labels (obs columns `label_keys`); returns self."
    assert "the first count" not in text


def test_config_fields_reach_help(modules):
    from cellmtl.mtl import PHMapConfig
    from cellmtl.train import TrainConfig
    assert "dropout : float, default 0.4\n    trunk dropout (PH-Map: 0.4)" in inspect.getdoc(PHMapConfig)
    assert "label_keys : list[str], default ['anno_lv1', 'anno_lv2', 'anno_lv3', 'anno_lv4']" in inspect.getdoc(PHMapConfig)
    doc = pydoc.render_doc(TrainConfig, renderer=pydoc.plaintext)
    assert "maximum number of epochs" in doc and "clip the global gradient norm to this; None = no clipping" in doc
    assert inspect.getdoc(TrainConfig).startswith("Options of `fit`; every field can also be passed to `fit` as a keyword.\n\nParameters\n")


def test_idempotent(modules):
    mods, _ = modules
    docs = {(n, label): obj.__doc__ for n, m in mods.items() for label, obj in _own_objects(m)}
    for m in mods.values(): assert document_module(vars(m)) == 0
    assert docs == {(n, label): obj.__doc__ for n, m in mods.items() for label, obj in _own_objects(m)}
    from cellmtl.mtl import HierarchicalAnnotator
    assert HierarchicalAnnotator.fit.__doc__.count("Parameters\n") == 1


def test_without_docments_unchanged(modules):
    mods, before = modules
    plain_real = [(n, label) for n, m in mods.items() for label, obj in _own_objects(m) if parameter_docs(obj) is None]
    assert plain_real, "expected some real objects without docments"
    for n, label in plain_real:
        obj = dict(_own_objects(mods[n]))[label]
        assert obj.__doc__ == before[n, label], label
    def plain(x, y=1):
        "Add."
        return x + y
    assert document(plain) is False and plain.__doc__ == "Add."


def test_index_agrees_with_fastcore(modules):
    "The one-parse SourceIndex reads the same comments as fastcore's docments, on every object of the real modules."
    mods, _ = modules
    compared = 0
    for m in mods.values():
        index = SourceIndex(m.__file__, vars(m))
        for label, obj in _own_objects(m):
            f = obj.fget if isinstance(obj, property) else getattr(obj, "__func__", obj)
            fast = index.docments(f)
            if fast is None: continue  # not in this file (a decorator's, an inherited __init__): docments is used for it
            slow = {k: v for k, v in docments(f, args_kwargs=True).items() if v}
            assert {k: v for k, v in fast.items() if v} == slow, label
            compared += 1
    assert compared > 80


# a class like cellmtl's: a method, a classmethod, a property, an `@patch`ed method, **kwargs
class _Counter:
    "Count things."
    def __init__(self, start:int=0, # the first count
                ): self.n = start

    def add(self, k:int=1, # how much to add
            # further amounts,
            # one per extra argument
            *more,
            **options, # ignored options
           ) -> "_Counter": # the counter itself
        "Add `k`."
        self.n += k + sum(more)
        return self

    @classmethod
    def from_list(cls, items:list, # the things to count
                 ): return cls(len(items))

    @property
    def doubled(self) -> int: # twice the count
        "The count times two."
        return 2 * self.n

    def bare(self, x): "No comments."

@patch
def reset(self:_Counter, to:int=0, # the new count
         ):
    "Set the count to `to`."
    self.n = to


def test_members_patch_classmethod_property_kwargs():
    ns = {"__name__": __name__, "__file__": __file__, "__all__": ["_Counter"], "_Counter": _Counter}
    assert document_module(ns) == 5  # the class, add, from_list, doubled, reset (bare has no comments)
    assert "start : int, default 0\n    the first count" in _Counter.__doc__
    add = inspect.getdoc(_Counter.add)
    assert add.startswith("Add `k`.\n\nParameters\n----------\nk : int, default 1\n    how much to add\n")  # no `self`
    assert "*more\n    further amounts,\n    one per extra argument\n**options\n    ignored options\n\nReturns\n-------\n_Counter\n    the counter itself" in add
    assert "the things to count" in inspect.getdoc(_Counter.from_list) and inspect.getdoc(_Counter.from_list).startswith("Parameters")
    assert inspect.getdoc(_Counter.doubled) == "The count times two.\n\nReturns\n-------\nint\n    twice the count"
    assert "to : int, default 0\n    the new count" in inspect.getdoc(_Counter.reset)
    assert "self" not in inspect.getdoc(_Counter.reset)
    assert _Counter.bare.__doc__ == "No comments."
    assert document_module(ns) == 0


def test_odd_objects_never_raise():
    exec_ns = {}
    exec(compile("def from_string(a, # no file behind this\n): pass", "<string>", "exec"), exec_ns)  # no readable source
    odd = exec_ns["from_string"]
    odd.__module__ = "oddmod"
    class Weird:  # a class whose attribute access fails
        def __getattr__(self, name): raise RuntimeError("boom")
    ns = {"__name__": "oddmod", "__all__": ["len", "odd", "missing", "weird", "lam", "partial"], "len": len, "odd": odd,
          "weird": Weird(), "lam": lambda x: x, "partial": __import__("functools").partial(print, 1)}
    ns["lam"].__module__ = "oddmod"
    assert document_module(ns) == 0
    assert document_module({"__name__": "x"}) == 0


def test_import_cost_is_small(modules):
    "One parse of each module's file: SourceIndex is built once per module."
    built = []
    orig = SourceIndex.__init__
    def counting(self, filename, module_globals=None):
        built.append(filename)
        orig(self, filename, module_globals)
    SourceIndex.__init__ = counting
    try:
        for m in modules[0].values(): document_module(vars(m))
    finally: SourceIndex.__init__ = orig
    assert sorted(built) == sorted(m.__file__ for m in modules[0].values())


def test_docstrings_is_torch_free():
    code = "import sys, cellmtl.docstrings; bad = [m for m in ('torch', 'numpy', 'pandas') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)


_PLAIN_IMPORT_CHECK = textwrap.dedent("""
    import importlib, inspect, pkgutil, cellmtl
    from cellmtl.docstrings import _members, _own, parameter_docs
    missing = []
    for info in pkgutil.walk_packages(cellmtl.__path__, 'cellmtl.'):
        if info.name.endswith('_modidx'): continue
        m = importlib.import_module(info.name)
        for name in getattr(m, '__all__', []):
            obj = getattr(m, name, None)
            objs = _members(obj, m.__name__) if inspect.isclass(obj) and _own(obj, m.__name__) else [obj] if inspect.isfunction(obj) and _own(obj, m.__name__) else []
            for o in objs:
                section = parameter_docs(o)
                if section and section not in (o.__doc__ or ''): missing.append(f"{m.__name__}.{getattr(o, '__qualname__', name)}")
    print(len(missing), 'undocumented:', missing[:20])
    assert not missing
""")


def test_every_module_documents_itself_on_import():
    "After a plain import (no document_module call by the test) every documented signature is in `__doc__`."
    result = subprocess.run([sys.executable, "-c", _PLAIN_IMPORT_CHECK], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_help_shows_the_parameter_comments_and_the_package_says_what_it_is():
    import pydoc
    import cellmtl
    from cellmtl.mtl import HierarchicalAnnotator
    text = pydoc.render_doc(HierarchicalAnnotator.fit, renderer=pydoc.plaintext)
    assert "Parameters" in text and "read the values from adata.layers[layer] instead of X" in text
    assert "HierarchicalAnnotator" in cellmtl.__doc__ and "cellmtl.load" in cellmtl.__doc__


def test_class_methods_attached_by_patch_get_parameter_docs():
    "fastcore's @patch(cls_method=True) (from_phmap, BaseModel.load): the summary stays first, the parameters follow."
    import cellmtl.mtl
    from cellmtl.base import BaseModel
    for method in (cellmtl.mtl.HierarchicalAnnotator.from_phmap, BaseModel.load):
        doc = inspect.getdoc(method)
        assert not doc.startswith("Parameters") and "\nParameters\n----------\n" in doc, doc[:200]
    assert "metadata_path : " in inspect.getdoc(cellmtl.mtl.HierarchicalAnnotator.from_phmap)
