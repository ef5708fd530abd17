"""The real PBMC reference loaders (Zheng sorted, Kang, Symphony) and their shared Cell Ontology hierarchy."""
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellmtl import datasets
from cellmtl.datasets import (PBMC_REFERENCE_LEVELS, DatasetNotFoundError, cell_ontology, kang_pbmc, ontology_ancestors,
                              pbmc68k_hierarchy_table, pbmc_reference_hierarchy_table, symphony_pbmc, zheng_sorted_pbmc)

LEVELS = list(PBMC_REFERENCE_LEVELS)


@pytest.fixture(scope="module")
def zheng(data_dir): return zheng_sorted_pbmc(data_dir)

@pytest.fixture(scope="module")
def kang(data_dir): return kang_pbmc(data_dir)

@pytest.fixture(scope="module")
def symphony(data_dir): return symphony_pbmc(data_dir)


def _check_counts(adata):
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.int32
    assert adata.X.data.min() >= 1  # stored entries are positive whole numbers (int32 after the integrality check)
    assert (np.asarray(adata.X.sum(axis=1)).ravel() > 0).all()
    assert adata.var_names.is_unique and adata.obs_names.is_unique
    for level in LEVELS:
        assert {level, f"{level}_cl_id", f"{level}_cl_name"} <= set(adata.obs.columns)
        # a level is missing exactly where its CL term is missing
        assert (adata.obs[level].isna().to_numpy() == adata.obs[f"{level}_cl_id"].isna().to_numpy()).all()
    assert adata.obs["anno_lv1"].notna().all() and adata.obs["anno_lv3"].notna().all()


def test_zheng_sorted_shapes_labels_and_counts(zheng):
    assert zheng.shape == (3500, 8846)
    assert zheng.obs["trueLabel"].value_counts().to_dict() == {k: 500 for k in ["B", "CD4TCM", "CD4TN", "CD4Treg", "CD8TN", "Monocyte", "NK"]}
    _check_counts(zheng)
    assert zheng.obs["n_counts"].between(464, 3671).all()
    assert ((zheng.obs["nUMI"] - zheng.obs["n_counts"]).between(0, 85)).all()  # counts of the genes not kept
    assert zheng.obs.loc[zheng.obs["trueLabel"] == "B", "anno_lv4"].isna().all()  # B has no subtype
    assert zheng.obs.loc[zheng.obs["trueLabel"] == "CD4Treg", "anno_lv4_cl_id"].eq("CL:0000792").all()


def test_kang_shapes_condition_and_counts(kang):
    assert kang.shape == (1975, 6998)
    assert kang.obs["condition"].value_counts().to_dict() == {"stimulated": 1039, "control": 936}
    assert kang.obs["cell_type"].value_counts().to_dict() == {"CD4T": 634, "FCGR3A+Mono": 421, "CD14+Mono": 321, "B": 222,
                                                              "NK": 141, "CD8T": 122, "Dendritic": 114}
    _check_counts(kang)
    assert kang.obs["anno_lv4"].isna().all()  # no Kang label resolves a subtype


def test_symphony_shapes_technology_and_counts(symphony):
    assert symphony.shape == (1200, 1767)
    assert symphony.obs["technology"].value_counts().to_dict() == {"3pv2": 480, "5p": 430, "3pv1": 290}
    assert symphony.obs["cell_type"].nunique() == 9
    _check_counts(symphony)
    assert (symphony.obs["n_counts"] <= symphony.obs["nUMI"]).all()


def test_recovered_counts_must_be_integers(data_dir):
    # float32 storage puts Kang's counts about 1e-4 from integers: a tolerance far below that must refuse the file
    with pytest.raises(ValueError, match="not positive whole numbers"): kang_pbmc(data_dir, tolerance=1e-9)


def test_hierarchy_is_a_tree_with_consistent_terms():
    table = pbmc_reference_hierarchy_table()
    assert set(table["dataset"]) == {"zheng_sorted_pbmc", "kang_pbmc", "symphony_pbmc"}
    both = pd.concat([table[LEVELS], pbmc68k_hierarchy_table()[LEVELS]])  # shared keys: same parents as pbmc68k
    for parent, child in zip(LEVELS[:-1], LEVELS[1:]):
        rows = both.dropna(subset=[child])
        assert rows[parent].notna().all()  # a finer level is only set under a set coarser one
        assert rows.groupby(child)[parent].nunique().max() == 1, f"a {child} class has several {parent} parents"
    for level in LEVELS:
        rows = table.dropna(subset=[level])
        assert rows.groupby(level)[f"{level}_cl_id"].nunique().max() == 1  # one CL term per key
        assert rows.groupby(f"{level}_cl_id")[f"{level}_cl_name"].nunique().max() == 1
        assert rows[f"{level}_cl_id"].str.fullmatch(r"CL:\d{7}").all()


def test_hierarchy_terms_follow_the_cell_ontology(data_dir):
    graph, table = cell_ontology(data_dir), pbmc_reference_hierarchy_table()
    assert len(graph) == 2801
    names = set(pd.concat([table[f"{level}_cl_name"] for level in LEVELS]).dropna())
    assert sorted(names - set(graph)) == []
    for _, row in table.iterrows():
        for coarse, fine in zip(LEVELS[:-1], LEVELS[1:]):
            a, b = row[f"{coarse}_cl_name"], row[f"{fine}_cl_name"]
            if isinstance(b, str): assert a == b or a in ontology_ancestors(graph, b), f"{row['label']}: {a!r} is not an ancestor of {b!r}"
    assert "myeloid leukocyte" not in ontology_ancestors(graph, "dendritic cell")  # why DCs map to myeloid dendritic cell


def test_a_missing_file_names_the_fix(tmp_path, monkeypatch):
    def no_network(*args, **kwargs): raise ConnectionError("network disabled in this test")
    monkeypatch.setattr(datasets.pooch, "retrieve", no_network)
    empty = tmp_path / "empty"; empty.mkdir()
    for loader, path in [(zheng_sorted_pbmc, "pbmc/zheng_sorted/pbmc14k_expression.eset.rda"),
                         (kang_pbmc, "pbmc/kang/valid.h5ad"), (symphony_pbmc, "pbmc/symphony/pbmcs_exprs_small.rda")]:
        with pytest.raises(DatasetNotFoundError) as info: loader(data_dir=empty)
        message = str(info.value)
        assert "CELLMTL_DATA_DIR" in message and str(empty / path) in message and "raw.githubusercontent.com" in message


@pytest.fixture(scope="module")
def annotator(zheng):
    from cellmtl.mtl import HierarchicalAnnotator
    model = HierarchicalAnnotator(label_keys=LEVELS, unlabeled="drop")  # anno_lv4 is NaN for B, NK and monocytes
    return model.fit(zheng, epochs=2, seed=0, progress=False)


def test_annotator_trained_on_zheng_predicts_kang(annotator, kang):
    assert annotator.classes_["anno_lv4"] == ["CD4+/CD25 T Reg", "CD4+/CD45RA+/CD25- Naive T", "CD4+/CD45RO+ Memory",
                                              "CD8+/CD45RA+ Naive Cytotoxic"]  # only the T gates have a subtype
    predictions = annotator.predict(kang, decoding="independent")
    assert list(predictions.columns) == [c for level in LEVELS for c in (f"predicted_{level}", f"predicted_{level}_prob")]
    assert predictions.index.equals(kang.obs_names) and predictions.notna().all().all()
    monocytes = kang.obs["anno_lv3"].eq("CD14 monocyte").to_numpy()
    assert predictions.loc[monocytes, "predicted_anno_lv2"].eq("monocyte").mean() > 0.5  # learned something transferable


def test_joint_decoding_ends_paths_where_the_reference_has_no_finer_label(annotator, kang):
    predictions = annotator.predict(kang)  # the default, joint
    monocytes = kang.obs["anno_lv3"].eq("CD14 monocyte").to_numpy()
    assert predictions.loc[monocytes, "predicted_anno_lv2"].eq("monocyte").mean() > 0.5
    called_t = predictions["predicted_anno_lv2"].eq("T").to_numpy()
    assert predictions.loc[~called_t, "predicted_anno_lv4"].isna().all()  # no T subtype for a cell not called T
    assert predictions.loc[~called_t, "predicted_anno_lv4_prob"].isna().all()
    assert predictions.loc[called_t, "predicted_anno_lv4"].notna().all()
    from cellmtl.mtl import consistency_rate
    assert consistency_rate(predictions, annotator.hierarchy_) == 1.0
    scores = annotator.score(kang)  # Kang has no subtypes: level 4 is scored on no cell
    assert scores.loc["anno_lv4", "n_cells"] == 0 and np.isnan(scores.loc["anno_lv4", "accuracy"])
    assert scores.loc["anno_lv1", "n_cells"] == kang.n_obs and scores.loc["anno_lv1", "accuracy"] > 0.5
    with pytest.raises(ValueError, match="use decoding='joint'"):
        annotator.predict(kang, decoding="bottom_up")
