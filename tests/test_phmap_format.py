"""PH-Map's own saved files (`TrainedModel.save`: `<name>.pth` + `<name>_metadata.pkl`): `HierarchicalAnnotator.from_phmap`,
`to_phmap`, `calibrate`, and the restricted unpickler that reads the metadata.

The PH-Map files are made here from the format's description, with sklearn's LabelEncoder, by `phmap_save` below
(an imitation of PH-Map's `TrainedModel.save` and its `MultiTaskCellTypeClassifier`); predictions are checked against
a hand-written numpy forward pass of PH-Map's network. Tiny hand-made or SIMULATED data: every test runs in seconds.
"""
import builtins
import copy
import os
import pickle
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.preprocessing import LabelEncoder
from torch import nn

import cellmtl
from cellmtl.datasets import simulate_hierarchy
from cellmtl.mtl import HierarchicalAnnotator, PHMapUnpickler, UnsafePickleError, consistency_rate, decode_hierarchy, read_phmap_metadata
from cellmtl.train import CheckpointError

LEVELS = ["lv1", "lv2", "lv3", "lv4"]
# six root-to-leaf paths; lv2 holds numbers (cluster ids), so the encoder's order (2, 7, 10, 33) differs from the
# annotator's text order ("10", "2", "33", "7"); "B" is a class name at two levels, as in PH-Map's own model
PATHS = pd.DataFrame({"lv1": ["lymphoid", "lymphoid", "lymphoid", "myeloid", "myeloid", "myeloid"],
                      "lv2": [10, 10, 2, 33, 33, 7],
                      "lv3": ["CD4 T", "CD8 T", "B", "mono", "mono", "DC"],
                      "lv4": ["T naive", "T cytotoxic", "B", "CD14 mono", "CD16 mono", "DC"]})


class PHMapLike(nn.Module):
    "PH-Map's MultiTaskCellTypeClassifier as its format describes it: shared_fc = [Linear, ReLU, Dropout] per hidden size, one head per level."
    def __init__(self, input_size, num_classes, hidden_sizes, dropout_rate=0.4):
        super().__init__()
        sizes, layers = [input_size, *hidden_sizes], []
        for n_in, n_out in zip(sizes, sizes[1:]): layers += [nn.Linear(n_in, n_out), nn.ReLU(), nn.Dropout(dropout_rate)]
        self.shared_fc, self.output_layers = nn.Sequential(*layers), nn.ModuleList(nn.Linear(sizes[-1], c) for c in num_classes)

    def forward(self, x): return [head(self.shared_fc(x)) for head in self.output_layers]


def phmap_save(path, adata, levels, hidden_sizes=(200, 100), seed=0, protocol=pickle.DEFAULT_PROTOCOL):
    "What PH-Map's TrainedModel.save(path) writes for a model of `adata`'s genes and `levels` (seeded random weights); returns (net, encoders)."
    torch.manual_seed(seed)
    encoders = {level: LabelEncoder().fit(adata.obs[level].astype("category").cat.categories) for level in levels}  # as build_model fits them
    num_classes = [adata.obs[level].astype("category").cat.categories.size for level in levels]
    net = PHMapLike(adata.n_vars, num_classes, list(hidden_sizes)).eval()
    torch.save({"state_dict": net.state_dict(), "input_size": adata.shape[1], "num_classes": num_classes,
                "hidden_sizes": list(hidden_sizes), "dropout_rate": 0.4}, path)
    with open(str(path).replace(".pth", "_metadata.pkl"), "wb") as file:  # PH-Map's own naming rule
        pickle.dump({"label_columns": list(levels), "label_encoders": encoders, "train_genes": list(adata.var_names), "var_genes": None},
                    file, protocol=protocol)
    return net, encoders


def phmap_forward(net, x):
    "PH-Map's forward pass by hand, in numpy (dropout off): ReLU(x W^T + b) per hidden layer, then one Linear per head."
    state = {k: v.detach().numpy().astype(np.float64) for k, v in net.state_dict().items()}
    h, k = x.astype(np.float64), 0
    while f"shared_fc.{k}.weight" in state:
        h = np.maximum(h @ state[f"shared_fc.{k}.weight"].T + state[f"shared_fc.{k}.bias"], 0.0)
        k += 3
    i, logits = 0, []
    while f"output_layers.{i}.weight" in state:
        logits.append(h @ state[f"output_layers.{i}.weight"].T + state[f"output_layers.{i}.bias"])
        i += 1
    return logits


def softmax(z): return np.exp(z - z.max(1, keepdims=True)) / np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True)


def labelled_cells(n_cells=240, n_genes=40, seed=0):
    "Hand-made cells on PATHS' leaves: Poisson counts with a leaf-specific rate per gene, CSR."
    rng = np.random.default_rng(seed)
    leaf = rng.integers(0, len(PATHS), n_cells)
    rates = rng.gamma(0.5, 1.0, size=(len(PATHS), n_genes))
    X = sp.csr_matrix(rng.poisson(rates[leaf]).astype(np.float32))
    obs = PATHS.iloc[leaf].reset_index(drop=True)
    obs.index = [f"cell{i}" for i in range(n_cells)]
    return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


@pytest.fixture(scope="module")
def cells():
    return labelled_cells()


@pytest.fixture(scope="module")
def trained():
    "A cellmtl-trained annotator (2 epochs, the published binary input: the one PH-Map reads) on 300 SIMULATED cells, three levels; with its cells."
    adata = simulate_hierarchy(300, 60, n_classes=(2, 4, 6), density=0.2, effect_size=2.0, seed=1)
    annotator = HierarchicalAnnotator(label_keys=["anno_lv1", "anno_lv2", "anno_lv3"], hidden_sizes=(24, 12), input="binary").fit(adata, epochs=2, patience=None, seed=0)
    return annotator, adata


def shuffled_query(adata, seed=1):
    "The cells with their genes in another order (PH-Map aligns by name)."
    return adata[:, np.random.default_rng(seed).permutation(adata.n_vars)].copy()


# --- reading PH-Map's files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_levels, hidden_sizes", [(2, (16,)), (3, (24, 12)), (4, (32, 16, 8))])
def test_predictions_equal_phmaps_forward_pass(tmp_path, cells, n_levels, hidden_sizes):
    levels = LEVELS[:n_levels]
    net, encoders = phmap_save(tmp_path / "model.pth", cells, levels, hidden_sizes)
    annotator = HierarchicalAnnotator.from_phmap(tmp_path / "model.pth")
    assert annotator.config.hidden_sizes == hidden_sizes and annotator.levels == levels
    assert annotator.config.decoding == "independent" and set(annotator.temperatures_.values()) == {1.0}
    logits = phmap_forward(net, (cells.X.toarray() > 0).astype(np.float32))  # over train_genes, in their order
    query = shuffled_query(cells)
    predictions, probabilities = annotator.predict(query), annotator.predict_proba(query)
    for level, z in zip(levels, logits):
        expected = encoders[level].inverse_transform(z.argmax(1)).astype(str)
        np.testing.assert_array_equal(predictions[f"predicted_{level}"].astype(str).to_numpy(), expected)
        np.testing.assert_allclose(predictions[f"predicted_{level}_prob"].to_numpy(), softmax(z).max(1), atol=1e-5)
        columns = [list(encoders[level].classes_.astype(str)).index(c) for c in annotator.classes_[level]]  # by class name
        np.testing.assert_allclose(probabilities[level], softmax(z)[:, columns], atol=1e-5)
    assert annotator.classes_["lv2"] == ["10", "2", "33", "7"]  # the annotator's order differs from the encoder's (2, 7, 10, 33)


def test_without_hierarchy_joint_decoding_is_refused(tmp_path, cells):
    phmap_save(tmp_path / "model.pth", cells, LEVELS, (16,))
    annotator = HierarchicalAnnotator.from_phmap(tmp_path / "model.pth")
    assert all((annotator.hierarchy_.parent_index[level] == -1).all() for level in LEVELS)  # parents unknown
    for decoding in ("joint", "bottom_up"):
        with pytest.raises(ValueError, match="hierarchy="):
            annotator.predict(cells, decoding=decoding)


@pytest.mark.parametrize("as_anndata", [False, True])
def test_with_hierarchy_decodes_jointly(tmp_path, cells, as_anndata):
    net, encoders = phmap_save(tmp_path / "model.pth", cells, LEVELS, (16, 8))
    annotator = HierarchicalAnnotator.from_phmap(tmp_path / "model.pth", hierarchy=cells if as_anndata else PATHS)
    assert annotator.config.decoding == "joint"
    hierarchy = annotator.hierarchy_
    parent = lambda level, name: hierarchy.classes[LEVELS[LEVELS.index(level) - 1]][hierarchy.parent_index[level][hierarchy.classes[level].index(name)]]
    assert parent("lv2", "2") == "lymphoid" and parent("lv3", "mono") == "33" and parent("lv4", "B") == "B"
    predictions = annotator.predict(shuffled_query(cells))
    assert consistency_rate(predictions, hierarchy) == 1.0
    # joint decoding of PH-Map's own probabilities, by hand, in the annotator's class order
    logits = phmap_forward(net, (cells.X.toarray() > 0).astype(np.float32))
    probabilities = [softmax(z)[:, [list(encoders[l].classes_.astype(str)).index(c) for c in hierarchy.classes[l]]] for l, z in zip(LEVELS, logits)]
    codes, _ = decode_hierarchy(probabilities, [hierarchy.parent_index[l] for l in LEVELS], "joint")
    for level, level_codes in zip(LEVELS, codes):
        np.testing.assert_array_equal(predictions[f"predicted_{level}"].astype(str).to_numpy(), np.array(hierarchy.classes[level])[level_codes])


def test_hierarchy_must_place_every_class_of_the_model(tmp_path, cells):
    phmap_save(tmp_path / "model.pth", cells, LEVELS, (16,))
    path = tmp_path / "model.pth"
    with pytest.raises(ValueError, match="does not place.*CD16 mono"):  # a class of the model missing from the table
        HierarchicalAnnotator.from_phmap(path, hierarchy=PATHS[PATHS.lv4 != "CD16 mono"])
    with pytest.raises(KeyError, match="lv3"):
        HierarchicalAnnotator.from_phmap(path, hierarchy=PATHS.drop(columns="lv3"))
    more = pd.concat([PATHS, pd.DataFrame({"lv1": ["myeloid"], "lv2": [33], "lv3": ["mono"], "lv4": ["intermediate mono"]})])
    with pytest.warns(UserWarning, match="intermediate mono"):  # a table class the model does not know: left out, said so
        annotator = HierarchicalAnnotator.from_phmap(path, hierarchy=more)
    assert "intermediate mono" not in annotator.classes_["lv4"] and consistency_rate(annotator.predict(cells), annotator.hierarchy_) == 1.0
    moved = pd.concat([PATHS.assign(lv2=PATHS.lv2.replace(7, 99)), pd.DataFrame({"lv1": ["myeloid"], "lv2": [7]})])  # DC under 99; 7 childless
    with pytest.warns(UserWarning, match="99"), pytest.raises(ValueError, match="'lv3' classes sit under 'lv2' classes the model does not predict"):
        HierarchicalAnnotator.from_phmap(path, hierarchy=moved)
    with pytest.raises(ValueError, match="exactly one parent"):  # not a tree: LabelHierarchy's own check
        HierarchicalAnnotator.from_phmap(path, hierarchy=pd.concat([PATHS, PATHS.iloc[[0]].assign(lv3="CD8 T", lv2=2)]))


def test_phmap_files_from_other_pickle_protocols_and_numpy_1(tmp_path, cells):
    "Protocols 3-5 (Python's defaults over the years) and numpy 1's module names (numpy.core.multiarray) load."
    for protocol in (3, 4, 5):
        phmap_save(tmp_path / f"p{protocol}.pth", cells, LEVELS[:2], (8,), protocol=protocol)
        assert HierarchicalAnnotator.from_phmap(tmp_path / f"p{protocol}.pth").classes_["lv2"] == ["10", "2", "33", "7"]
    metadata = (tmp_path / "p3_metadata.pkl").read_bytes()
    assert b"cnumpy._core.multiarray\n_reconstruct\n" in metadata  # protocol 3 names globals as text
    (tmp_path / "p3_metadata.pkl").write_bytes(metadata.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))  # as numpy 1 wrote it
    assert read_phmap_metadata(tmp_path / "p3_metadata.pkl")["classes"]["lv1"] == ["lymphoid", "myeloid"]


def test_phmap_model_saved_and_loaded_by_cellmtl(tmp_path, cells):
    phmap_save(tmp_path / "model.pth", cells, LEVELS, (16,))
    annotator = HierarchicalAnnotator.from_phmap(tmp_path / "model.pth")
    annotator.save(tmp_path / "saved")
    again = cellmtl.load(tmp_path / "saved")
    pd.testing.assert_frame_equal(again.predict(cells), annotator.predict(cells))
    with pytest.raises(ValueError, match="hierarchy="):  # the unknown parents survive save/load
        again.predict(cells, decoding="joint")


# --- the restricted unpickler ----------------------------------------------------------------------------------------

def _payloads(marker):
    "Pickles whose loading creates `marker`: the classic attacks."
    class System:
        def __reduce__(self): return (os.system, (f"touch {marker}",))
    class Exec:
        def __reduce__(self): return (builtins.exec, (f"open({str(marker)!r}, 'w').close()",))
    return {"os.system": System(), "builtins.exec": Exec()}


@pytest.mark.parametrize("attack", ["os.system", "builtins.exec"])
def test_malicious_metadata_is_refused_before_it_runs(tmp_path, cells, attack):
    marker = tmp_path / "it_ran"
    payload = {"label_columns": ["lv1"], "label_encoders": {"lv1": _payloads(marker)[attack]}, "train_genes": list(cells.var_names)}
    data = pickle.dumps(payload)
    pickle.loads(data)  # the attack is real: a plain pickle.load runs it
    assert marker.exists()
    marker.unlink()
    phmap_save(tmp_path / "model.pth", cells, ["lv1"], (8,))
    (tmp_path / "model_metadata.pkl").write_bytes(data)
    with pytest.raises(UnsafePickleError, match="refused before being imported or called") as raised:
        HierarchicalAnnotator.from_phmap(tmp_path / "model.pth")
    assert "model_metadata.pkl" in str(raised.value) and "run any program" in str(raised.value)
    assert not marker.exists()
    with open(tmp_path / "model_metadata.pkl", "rb") as file, pytest.raises(pickle.UnpicklingError):  # the class alone, on any file object
        PHMapUnpickler(file).load()
    assert not marker.exists()


def test_unpickler_admits_only_what_phmap_writes(tmp_path):
    assert PHMapUnpickler.find_class(None, "sklearn.preprocessing._label", "LabelEncoder") is LabelEncoder
    assert PHMapUnpickler.find_class(None, "numpy.core.multiarray", "_reconstruct") is PHMapUnpickler.find_class(None, "numpy._core.multiarray", "_reconstruct")
    for module, name in [("builtins", "eval"), ("posix", "system"), ("subprocess", "Popen"), ("numpy", "load"), ("sklearn.pipeline", "Pipeline"),
                         ("builtins", "getattr"), ("torch", "load"), ("copyreg", "_reconstructor")]:
        with pytest.raises(UnsafePickleError, match=f"{module}.{name}"):
            PHMapUnpickler.find_class(None, module, name)


# --- writing PH-Map's files --------------------------------------------------------------------------------------------

def test_to_phmap_is_read_by_phmap_and_gives_the_same_logits(tmp_path, trained):
    annotator, adata = trained
    path = annotator.to_phmap(tmp_path / "cellmtl.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cellmtl.pth", "cellmtl_metadata.pkl"]
    saved = torch.load(path, weights_only=True)  # exactly as PH-Map's MultiTaskCellTypeClassifier.load
    with open(tmp_path / "cellmtl_metadata.pkl", "rb") as file: metadata = pickle.load(file)  # and TrainedModel.load
    assert set(saved) == {"state_dict", "input_size", "num_classes", "hidden_sizes", "dropout_rate"}
    assert saved["input_size"] == adata.n_vars and saved["num_classes"] == [2, 4, 6] and saved["hidden_sizes"] == [24, 12]
    assert all(type(n) is int for n in saved["num_classes"] + saved["hidden_sizes"] + [saved["input_size"]])
    assert sorted(saved["state_dict"]) == sorted(f"{p}.{k}" for p in ["shared_fc.0", "shared_fc.3", "output_layers.0", "output_layers.1", "output_layers.2"]
                                                 for k in ("weight", "bias"))
    assert metadata["label_columns"] == annotator.levels and metadata["train_genes"] == list(adata.var_names) and metadata["var_genes"] is None
    for level in annotator.levels:
        encoder = metadata["label_encoders"][level]
        assert isinstance(encoder, LabelEncoder) and list(encoder.classes_) == sorted(encoder.classes_) == sorted(annotator.classes_[level])
    net = PHMapLike(saved["input_size"], saved["num_classes"], saved["hidden_sizes"], saved["dropout_rate"]).eval()
    net.load_state_dict(saved["state_dict"])  # strict: PH-Map's keys, PH-Map's shapes
    with torch.no_grad(): phmap_logits = net(torch.from_numpy((adata.X.toarray() > 0).astype(np.float32)))
    for level, z_phmap, z in zip(annotator.levels, phmap_logits, annotator._logits(adata)):
        rows = [annotator.classes_[level].index(c) for c in metadata["label_encoders"][level].classes_]
        np.testing.assert_allclose(z_phmap.numpy(), z[:, rows], atol=1e-5)
    back = HierarchicalAnnotator.from_phmap(path, hierarchy=adata)
    pd.testing.assert_frame_equal(back.predict(adata), annotator.predict(adata, calibrated=False))
    flat = HierarchicalAnnotator.from_phmap(path)
    pd.testing.assert_frame_equal(flat.predict(adata), annotator.predict(adata, decoding="independent", calibrated=False))


def _reordered(annotator, level, order):
    "A copy whose hierarchy lists `level`'s classes in `order` (old codes), head rows and parent codes moved along: the same model."
    other = copy.deepcopy(annotator)
    state, index, new_code = other.hierarchy_.to_dict(), other.levels.index(level), np.argsort(order)
    state["classes"][level] = [state["classes"][level][i] for i in order]
    state["class_counts"][level] = [state["class_counts"][level][i] for i in order]
    state["parent_index"][level] = [state["parent_index"][level][i] for i in order]
    if index + 1 < len(other.levels):
        child = other.levels[index + 1]
        state["parent_index"][child] = [int(new_code[p]) for p in state["parent_index"][child]]
    other.hierarchy_ = type(annotator.hierarchy_).from_dict(state)
    head = other.model_.heads[index]
    with torch.no_grad(): head.weight.copy_(head.weight[order]); head.bias.copy_(head.bias[order])
    return other


def test_heads_are_matched_by_class_name_when_orders_differ(tmp_path, trained):
    annotator, adata = trained
    reordered = _reordered(annotator, "anno_lv2", [3, 1, 0, 2])
    assert reordered.classes_["anno_lv2"] != sorted(reordered.classes_["anno_lv2"])
    pd.testing.assert_series_equal(reordered.predict(adata)["predicted_anno_lv3"], annotator.predict(adata)["predicted_anno_lv3"])
    reordered.to_phmap(tmp_path / "reordered.pth")
    net_state = torch.load(tmp_path / "reordered.pth", weights_only=True)
    annotator.to_phmap(tmp_path / "plain.pth")
    plain_state = torch.load(tmp_path / "plain.pth", weights_only=True)
    for key in plain_state["state_dict"]:  # PH-Map's file does not depend on the annotator's internal class order
        torch.testing.assert_close(net_state["state_dict"][key], plain_state["state_dict"][key])
    with open(tmp_path / "reordered_metadata.pkl", "rb") as file: encoders = pickle.load(file)["label_encoders"]
    net = PHMapLike(net_state["input_size"], net_state["num_classes"], net_state["hidden_sizes"]).eval()
    net.load_state_dict(net_state["state_dict"])
    logits = phmap_forward(net, (adata.X.toarray() > 0).astype(np.float32))
    independent = reordered.predict(adata, decoding="independent", calibrated=False)
    for level, z in zip(reordered.levels, logits):
        np.testing.assert_array_equal(encoders[level].inverse_transform(z.argmax(1)), independent[f"predicted_{level}"].astype(str).to_numpy())


def test_round_trip_phmap_cellmtl_phmap(tmp_path, cells):
    "PH-Map (numeric labels) -> from_phmap -> to_phmap -> from_phmap: same predictions, same weights up to row order."
    net, encoders = phmap_save(tmp_path / "model.pth", cells, LEVELS, (16, 8))
    first = HierarchicalAnnotator.from_phmap(tmp_path / "model.pth", hierarchy=PATHS)
    first.to_phmap(tmp_path / "again.pth")
    second = HierarchicalAnnotator.from_phmap(tmp_path / "again.pth", hierarchy=PATHS)
    pd.testing.assert_frame_equal(second.predict(cells), first.predict(cells))
    saved = torch.load(tmp_path / "again.pth", weights_only=True)
    rows = [list(encoders["lv2"].classes_.astype(str)).index(c) for c in ["10", "2", "33", "7"]]  # written: sorted as text
    torch.testing.assert_close(saved["state_dict"]["output_layers.1.weight"], net.state_dict()["output_layers.1.weight"][rows])


def test_to_phmap_never_overwrites_without_permission(tmp_path, trained):
    annotator, _ = trained
    (tmp_path / "model.pth").write_bytes(b"someone's file")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        annotator.to_phmap(tmp_path / "model.pth")
    assert (tmp_path / "model.pth").read_bytes() == b"someone's file" and not (tmp_path / "model_metadata.pkl").exists()
    (tmp_path / "other_metadata.pkl").write_bytes(b"a user's metadata")  # the metadata name alone is taken
    with pytest.raises(FileExistsError, match="other_metadata.pkl"):
        annotator.to_phmap(tmp_path / "other.pth")
    assert not (tmp_path / "other.pth").exists() and (tmp_path / "other_metadata.pkl").read_bytes() == b"a user's metadata"
    annotator.to_phmap(tmp_path / "model.pth", overwrite=True)
    assert HierarchicalAnnotator.from_phmap(tmp_path / "model.pth").levels == annotator.levels
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "model_metadata.pkl", "other_metadata.pkl"]  # no temp files left
    with pytest.raises(ValueError, match=r"\.pth"):
        annotator.to_phmap(tmp_path / "model.pt")


def test_to_phmap_refuses_non_binary_input(tmp_path, trained):
    annotator = copy.deepcopy(trained[0])
    annotator.config.input = "log1p"  # the coming PHMapConfig.input option
    with pytest.raises(ValueError, match="X > 0"):
        annotator.to_phmap(tmp_path / "model.pth")
    assert not any(tmp_path.iterdir())


# --- bad files ---------------------------------------------------------------------------------------------------------

def test_missing_and_misnamed_files(tmp_path, cells):
    phmap_save(tmp_path / "model.pth", cells, LEVELS, (16,))
    with pytest.raises(FileNotFoundError, match="weights file .*nowhere.pth does not exist"):
        HierarchicalAnnotator.from_phmap(tmp_path / "nowhere.pth")
    (tmp_path / "model_metadata.pkl").rename(tmp_path / "renamed.pkl")
    with pytest.raises(FileNotFoundError, match="model_metadata.pkl does not exist.*metadata_path="):
        HierarchicalAnnotator.from_phmap(tmp_path / "model.pth")
    assert HierarchicalAnnotator.from_phmap(tmp_path / "model.pth", metadata_path=tmp_path / "renamed.pkl").levels == LEVELS
    with pytest.raises(ValueError, match=r"does not end in \.pth"):
        HierarchicalAnnotator.from_phmap(tmp_path / "model.pt")
    with pytest.raises(IsADirectoryError, match="HierarchicalAnnotator.load"):
        HierarchicalAnnotator.from_phmap(tmp_path, metadata_path=tmp_path / "renamed.pkl")


def _edited(tmp_path, cells, edit_weights=None, edit_metadata=None):
    "A PH-Map file pair with its weights dict and/or metadata dict changed by the given functions."
    phmap_save(tmp_path / "model.pth", cells, LEVELS, (16, 8))
    if edit_weights:
        saved = torch.load(tmp_path / "model.pth", weights_only=True)
        torch.save(edit_weights(saved), tmp_path / "model.pth")
    if edit_metadata:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metadata = pickle.loads((tmp_path / "model_metadata.pkl").read_bytes())  # our own test file: trusted
        (tmp_path / "model_metadata.pkl").write_bytes(pickle.dumps(edit_metadata(metadata)))
    return tmp_path / "model.pth"


def _without(d, key): return {k: v for k, v in d.items() if k != key}


@pytest.mark.parametrize("edit_weights, message", [
    (lambda s: s["state_dict"], "bare state_dict"),
    (lambda s: _without(s, "num_classes"), "not a PH-Map model file.*num_classes"),
    (lambda s: {**s, "num_classes": [2, 4, 6, 6]}, r"output_layers.2.weight is \(5, 8\), expected \(6, 8\)"),
    (lambda s: {**s, "hidden_sizes": [16]}, "unexpected shared_fc.3.weight"),
    (lambda s: {**s, "input_size": 41, "state_dict": {**s["state_dict"], "shared_fc.0.weight": torch.zeros(16, 41)}}, "40 train_genes for input_size 41"),
    (lambda s: {**s, "hidden_sizes": np.array([16, 8])}, "weights_only"),
    (lambda s: {**s, "state_dict": _without(s["state_dict"], "output_layers.3.bias")}, "missing output_layers.3.bias"),
])
def test_bad_weights_file(tmp_path, cells, edit_weights, message):
    with pytest.raises(CheckpointError, match=message):
        HierarchicalAnnotator.from_phmap(_edited(tmp_path, cells, edit_weights=edit_weights))


@pytest.mark.parametrize("edit_metadata, message", [
    (lambda m: _without(m, "label_encoders"), "not PH-Map's metadata.*label_encoders"),
    (lambda m: {**m, "train_genes": m["train_genes"][:-1]}, "39 train_genes for input_size 40"),
    (lambda m: {**m, "label_columns": m["label_columns"][:3]}, "3 label_columns for 4 heads"),
    (lambda m: {**m, "label_encoders": {**m["label_encoders"], "lv3": LabelEncoder().fit(["a", "b"])}}, "'lv3' has 2 encoder classes for 5 outputs"),
    (lambda m: {**m, "label_encoders": {**m["label_encoders"], "lv1": LabelEncoder()}}, "no fitted LabelEncoder for level"),
    (lambda m: [m], "not PH-Map's metadata: it holds a list"),
])
def test_bad_metadata_file(tmp_path, cells, edit_metadata, message):
    with pytest.raises(CheckpointError, match=message):
        HierarchicalAnnotator.from_phmap(_edited(tmp_path, cells, edit_metadata=edit_metadata))


def test_corrupt_files(tmp_path, cells):
    path = _edited(tmp_path, cells)
    (tmp_path / "model_metadata.pkl").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="cannot be read as a pickle"):
        HierarchicalAnnotator.from_phmap(path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot be read by torch.load"):
        HierarchicalAnnotator.from_phmap(path)


# --- calibration -------------------------------------------------------------------------------------------------------

def test_calibrate_fits_the_temperatures_fit_would(tmp_path, trained):
    annotator, adata = trained
    annotator.to_phmap(tmp_path / "model.pth")
    loaded = HierarchicalAnnotator.from_phmap(tmp_path / "model.pth", hierarchy=adata)
    assert set(loaded.temperatures_.values()) == {1.0}
    val = adata[annotator.val_indices_]
    before = loaded.predict_proba(val)
    assert loaded.calibrate(val) is loaded
    assert any(abs(t - 1.0) > 1e-3 for t in loaded.temperatures_.values())
    np.testing.assert_allclose(list(loaded.temperatures_.values()), list(annotator.temperatures_.values()), rtol=1e-4)  # fit's own, on the same cells
    after = loaded.predict_proba(val)
    for level in loaded.levels:  # a temperature rescales confidence, never the argmax
        np.testing.assert_array_equal(after[level].argmax(1), before[level].argmax(1))


def test_calibrate_needs_labelled_cells(trained):
    annotator, adata = trained
    model = copy.deepcopy(annotator)
    unlabelled = adata[:50].copy()
    for level in model.levels: unlabelled.obs[level] = np.nan
    with pytest.raises(ValueError, match="none of the 50 cells has a label"):
        model.calibrate(unlabelled)
    with pytest.raises(KeyError, match="anno_lv3"):
        model.calibrate(ad.AnnData(unlabelled.X, obs=unlabelled.obs.drop(columns="anno_lv3"), var=unlabelled.var))
    novel = adata[:50].copy()
    novel.obs["anno_lv3"] = novel.obs["anno_lv3"].astype(str)
    novel.obs.iloc[:5, novel.obs.columns.get_loc("anno_lv3")] = "never seen"
    with pytest.warns(UserWarning, match="5 cells carry anno_lv3 labels the model does not predict"):
        model.calibrate(novel)
    with pytest.raises(RuntimeError, match="not fitted"):
        HierarchicalAnnotator().calibrate(adata)


def test_consistency_is_nan_without_a_tree(tmp_path, cells):
    "Without the parents, consistency is undefined (NaN), not 0: score says so instead of reporting every path broken."
    phmap_save(tmp_path / "model.pth", cells, LEVELS, (16,))
    scores = HierarchicalAnnotator.from_phmap(tmp_path / "model.pth").score(cells)
    assert scores["consistency"].isna().tolist() == [False, True, True, True] and scores.loc["lv1", "consistency"] == 1.0
    assert (scores["consistency"].notna() | (scores.index != "lv1")).all()
    tree = HierarchicalAnnotator.from_phmap(tmp_path / "model.pth", hierarchy=PATHS).score(cells)
    assert (tree["consistency"] == 1.0).all()
