"""Several modalities of the same cells: the convention (modality_keys, modality_matrix, add_modality, stack_modalities) and the real multi-omic loaders (ECCITE-seq PBMCs, 10x Multiome PBMCs)."""
import shutil
import warnings
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import stats

from cellmtl import datasets
from cellmtl.data import MODALITY_KEYS, add_modality, modality_keys, modality_matrix, normalize_log1p, stack_modalities
from cellmtl.datasets import (ECCITE_FILE, MULTIOME_FILE, REGISTRY, SOURCES, DatasetChecksumError, demultiplex_hashtags,
                              eccite_pbmc, list_datasets, multiome_pbmc)

HASHTAGS = ["HTO28_5P", "HTO29_5P", "HTO30_5P", "HTO44_5P"]


@pytest.fixture(scope="module")
def eccite(data_dir): return eccite_pbmc(data_dir)

@pytest.fixture(scope="module")
def multiome(data_dir): return multiome_pbmc(data_dir)


def _toy():
    "Four cells of RNA (genes CD3E, CD4, LYZ) and their two proteins (CD3, CD4), the proteins in another cell order."
    rna = ad.AnnData(sp.csr_matrix(np.array([[1, 0, 2], [0, 3, 0], [4, 0, 0], [0, 0, 5]], np.int32)),
                     obs=pd.DataFrame({"batch": ["a", "a", "b", "b"]}, index=["AAAC", "AAAG", "AACT", "AAGT"]),
                     var=pd.DataFrame(index=["CD3E", "CD4", "LYZ"]))
    protein = ad.AnnData(np.array([[30, 1], [2, 40], [10, 10], [0, 7]], np.int32),
                         obs=pd.DataFrame(index=["AACT", "AAAC", "AAGT", "AAAG"]), var=pd.DataFrame(index=["CD3", "CD4"]))
    return rna, protein


def _column(adata, name):
    "One column of adata.X as a dense 1-D array."
    return adata[:, name].X.toarray().ravel()


# the real loaders

def test_eccite_shapes_counts_and_names(eccite):
    assert eccite.shape == (500, 19521)
    assert sp.isspmatrix_csr(eccite.X) and eccite.X.dtype == np.int32 and eccite.X.has_canonical_format and eccite.X.data.min() >= 1
    assert eccite.var_names.is_unique and eccite.obs_names.is_unique
    assert not eccite.var_names.str.startswith("hg19_").any() and {"CD3E", "CD4", "CD8A", "LYZ", "MT-CO1"} <= set(eccite.var_names)
    assert (eccite.var["gene_id_hg19"] == "hg19_" + eccite.var_names).all()  # the file's name, prefix and all
    proteins, hashtags = eccite.obsm["protein_expression"], eccite.obsm["hashtag_counts"]
    assert isinstance(proteins, np.ndarray) and proteins.shape == (500, 49) and proteins.dtype == np.int32 and proteins.min() >= 0
    assert isinstance(hashtags, np.ndarray) and hashtags.shape == (500, 4) and hashtags.dtype == np.int32
    assert len(eccite.uns["protein_names"]) == 49 and eccite.uns["protein_names"].dtype == object
    assert eccite.uns["hashtag_names"].tolist() == HASHTAGS
    assert {"CD3", "CD4", "CD8", "CD14", "IgG1", "IgG2a"} <= set(eccite.uns["protein_names"])
    assert eccite.obs_names[0] == "AAGCCGCGTTGTCTTT" and eccite.obs_names.str.fullmatch("[ACGT]{16}").all()
    assert (eccite.obs["n_counts"].to_numpy() == np.asarray(eccite.X.sum(axis=1)).ravel()).all()
    assert (eccite.obs["n_genes"].to_numpy() == np.diff(eccite.X.indptr)).all()
    assert (eccite.obs["protein_n_counts"].to_numpy() == proteins.sum(axis=1)).all()
    assert (eccite.obs["hashtag_n_counts"].to_numpy() == hashtags.sum(axis=1)).all() and eccite.obs["hashtag_n_counts"].min() == 61
    assert eccite.obs["pct_mito"].between(0, 100).all() and eccite.obs["pct_mito"].max() > 0
    for modality in ("Protein", "HTO"):
        assert eccite.uns["modality_join"][modality] == {"join": "exact", "n_cells": 500, "dropped_from_adata": 0, "dropped_from_features": 0}
    source = eccite.uns["cellmtl_source"]
    assert source["simulated"] is False and SOURCES["eccite_pbmc"].commit in source["source"] and "GPL-3" in source["licence"]


def test_eccite_matrices_are_the_file(eccite, data_dir):
    "Spot checks against the R matrices read directly: the same counts per (cell, feature), and the same barcodes for all three."
    raw = datasets._read_rda(data_dir / ECCITE_FILE)["CITEseq_example"]
    (rna, genes, cells), (adt, antibodies, adt_cells), (hto, hashtags, hto_cells) = (raw[k] for k in ("RNA", "ADT", "HTO"))
    assert cells.equals(eccite.obs_names) and adt_cells.equals(cells) and hto_cells.equals(cells)
    assert list(antibodies) == list(eccite.uns["protein_names"])
    assert (adt.toarray().T == eccite.obsm["protein_expression"]).all() and (hto.toarray().T == eccite.obsm["hashtag_counts"]).all()
    assert rna.sum() == eccite.X.sum() and rna.nnz == eccite.X.nnz
    j = list(genes).index("hg19_CD3E")
    assert (rna[j].toarray().ravel() == _column(eccite, "CD3E")).all()


def test_eccite_hashtag_calls(eccite):
    rule = eccite.uns["hashtag_demultiplexing"]
    assert rule["threshold"] == 1.0
    assert rule["cells_per_call"] == {"HTO28_5P": 114, "HTO29_5P": 120, "HTO30_5P": 92, "HTO44_5P": 128, "Doublet": 46, "Negative": 0}
    assert eccite.obs["hashtag"].cat.categories.tolist() == [*HASHTAGS, "Doublet", "Negative"]
    assert eccite.obs["hashtag"].value_counts(sort=False).to_dict() == rule["cells_per_call"]
    singlets = eccite.obs["hashtag"].isin(HASHTAGS).to_numpy()
    top = np.asarray(HASHTAGS)[eccite.obsm["hashtag_counts"].argmax(axis=1)]  # the raw top count agrees with the CLR call here
    assert (eccite.obs.loc[singlets, "hashtag"].astype(str).to_numpy() == top[singlets]).mean() > 0.95
    assert (eccite.obs.loc[singlets, "hashtag"].astype(str) == eccite.obs.loc[singlets, "hashtag_top"].astype(str)).all()
    doublet = eccite.obs["hashtag"] == "Doublet"
    assert eccite.obs.loc[doublet, "n_counts"].median() > 1.2 * eccite.obs.loc[~doublet, "n_counts"].median()  # two cells' worth
    assert eccite.obs.loc[doublet, "hashtag_margin"].median() < eccite.obs.loc[~doublet, "hashtag_margin"].median()


def test_eccite_hashtag_threshold_is_a_parameter(data_dir):
    lower = eccite_pbmc(data_dir, hashtag_threshold=0.75)
    assert lower.uns["hashtag_demultiplexing"]["threshold"] == 0.75 and (lower.obs["hashtag"] == "Doublet").sum() == 58
    with pytest.raises(ValueError, match="positive CLR value"): eccite_pbmc(data_dir, hashtag_threshold=-1)


def _log_per10k(adata, gene=None, protein=None):
    "log1p(per 10,000) of one gene (of the cell's RNA counts) or one protein (of the cell's antibody counts)."
    if gene is not None: return normalize_log1p(adata.X)[:, adata.var_names.get_loc(gene)].toarray().ravel()
    proteins = adata.obsm["protein_expression"]
    return normalize_log1p(proteins.astype(np.float32))[:, list(adata.uns["protein_names"]).index(protein)]


def test_eccite_protein_agrees_with_its_rna(eccite):
    "Biology: CD8 and CD3 protein rise with CD8A and CD3E RNA; CD14 protein is high in the cells that express the monocyte gene LYZ."
    cd8 = stats.spearmanr(_log_per10k(eccite, gene="CD8A"), _log_per10k(eccite, protein="CD8"))[0]
    cd3 = stats.spearmanr(_log_per10k(eccite, gene="CD3E"), _log_per10k(eccite, protein="CD3"))[0]
    assert cd8 > 0.7 and cd3 > 0.2, (cd8, cd3)
    assert stats.spearmanr(_log_per10k(eccite, gene="CD8A"), _log_per10k(eccite, protein="CD14"))[0] < 0.1  # a T-cell gene, a monocyte protein
    lyz = _column(eccite, "LYZ") > 0
    cd14 = eccite.obsm["protein_expression"][:, list(eccite.uns["protein_names"]).index("CD14")]
    assert 10 <= lyz.sum() <= 100 and cd14[lyz].mean() > 5 * cd14[~lyz].mean()


def test_multiome_shapes_counts_and_names(multiome):
    assert multiome.shape == (1000, 45)
    assert sp.isspmatrix_csr(multiome.X) and multiome.X.dtype == np.int32 and multiome.X.has_canonical_format and multiome.X.data.min() >= 1
    atac = multiome.obsm["atac_counts"]
    assert sp.isspmatrix_csr(atac) and atac.shape == (1000, 174) and atac.dtype == np.int32 and atac.data.min() >= 1
    peaks = pd.Index(multiome.uns["atac_names"])
    assert len(peaks) == 174 and peaks.is_unique and peaks.str.fullmatch(r"chr[0-9XY]+:\d+-\d+").all()
    assert multiome.var.columns.tolist() == ["gene_ids", "feature_types", "genome", "interval"]
    assert {"CD14", "LYZ", "MS4A1", "CD8A", "IL7R"} <= set(multiome.var_names) and (multiome.var["genome"] == "GRCh38").all()
    assert multiome.var["gene_ids"].str.startswith("ENSG").all()
    assert multiome.obs_names[0] == "AAACAGCCAGCATGTC-1" and multiome.obs_names.is_unique and multiome.obs_names.str.endswith("-1").all()
    assert (multiome.obs["n_counts"].to_numpy() == np.asarray(multiome.X.sum(axis=1)).ravel()).all()
    assert (multiome.obs["n_genes"].to_numpy() == np.diff(multiome.X.indptr)).all()
    assert (multiome.obs["atac_n_counts"].to_numpy() == np.asarray(atac.sum(axis=1)).ravel()).all()
    assert (multiome.obs["n_counts"].min(), multiome.obs["n_counts"].max()) == (4, 252)
    assert multiome.uns["modality_join"]["ATAC"]["n_cells"] == 1000
    source = multiome.uns["cellmtl_source"]
    assert source["simulated"] is False and SOURCES["multiome_pbmc"].commit in source["source"] and "45 hand-picked marker genes" in source["subset"]
    assert "174 peaks" in source["subset"] and "BSD-3-Clause" in source["licence"]


def test_multiome_matrices_are_the_file(multiome, data_dir):
    import h5py
    from anndata.io import read_elem
    with h5py.File(data_dir / MULTIOME_FILE, "r") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rna, atac = read_elem(f["mod/rna/X"]), read_elem(f["mod/atac/X"])
        atac_barcodes = read_elem(f["mod/atac/obs"]).index
    assert (rna != multiome.X).nnz == 0 and (atac != multiome.obsm["atac_counts"]).nnz == 0
    assert atac_barcodes.equals(multiome.obs_names)


def test_multiome_promoter_accessibility_agrees_with_rna(multiome):
    "Biology: a gene's promoter peak is more open where the gene is transcribed (every one of the 46 pairs, Spearman > 0)."
    annotation = multiome.uns["atac_peak_annotation"]
    promoters = annotation[(annotation["peak_type"] == "promoter") & annotation["gene"].isin(multiome.var_names)]
    atac, peaks = modality_matrix(multiome, "ATAC")
    rho = [stats.spearmanr(_column(multiome, g), atac[:, peaks.get_loc(p)].toarray().ravel())[0] for g, p in zip(promoters["gene"], promoters["peak"])]
    assert len(rho) == 46 and min(rho) > 0 and np.median(rho) > 0.1


def test_loaders_fetch_through_the_registry(data_dir, monkeypatch):
    seen = []
    fetch = datasets.fetch
    monkeypatch.setattr(datasets, "fetch", lambda rel, data_dir=None, *a, **k: seen.append(rel) or fetch(rel, data_dir, *a, **k))
    eccite_pbmc(data_dir); multiome_pbmc(data_dir)
    assert seen == [ECCITE_FILE, MULTIOME_FILE]
    assert REGISTRY[ECCITE_FILE].url == "https://raw.githubusercontent.com/SydneyBioX/CiteFuse/b6075864d8930967946022fdfbbf57a6a120061f/data/CITEseq_example.rda"
    assert REGISTRY[MULTIOME_FILE].url == "https://raw.githubusercontent.com/scverse/muon/03c762e5ebe44b5aa23392b1f31d27c41f2e0b44/tests/data/atac/test_rna_atac.h5mu"
    sums = {path: sha for sha, _, path in (line.split(maxsplit=2) for line in (data_dir / "SHA256SUMS").read_text().strip().splitlines())}
    assert REGISTRY[ECCITE_FILE].sha256 == sums[ECCITE_FILE] and REGISTRY[MULTIOME_FILE].sha256 == sums[MULTIOME_FILE]
    table = list_datasets().set_index("name")
    assert table.loc[["eccite_pbmc", "multiome_pbmc"], "files"].tolist() == [1, 1]
    assert table.loc[["eccite_pbmc", "multiome_pbmc"], "loader"].tolist() == ["eccite_pbmc()", "multiome_pbmc()"]


@pytest.mark.parametrize("loader, corrupt", [(eccite_pbmc, ECCITE_FILE), (multiome_pbmc, MULTIOME_FILE)])
def test_a_corrupt_copy_is_refused(loader, corrupt, data_dir, tmp_path):
    (tmp_path / corrupt).parent.mkdir(parents=True)
    shutil.copy(data_dir / corrupt, tmp_path / corrupt)
    with open(tmp_path / corrupt, "ab") as f: f.write(b"\0")  # one extra byte
    with pytest.raises(DatasetChecksumError, match="Checksum mismatch") as info: loader(data_dir=tmp_path)
    assert str(tmp_path / corrupt) in str(info.value) and REGISTRY[corrupt].url in str(info.value)


def test_real_loaders_round_trip_through_h5ad(eccite, multiome, tmp_path):
    for name, adata in {"eccite": eccite, "multiome": multiome}.items():
        adata.write_h5ad(tmp_path / f"{name}.h5ad")
        back = ad.read_h5ad(tmp_path / f"{name}.h5ad")
        assert (back.X != adata.X).nnz == 0 and back.obs.columns.tolist() == adata.obs.columns.tolist()
        for modality in back.uns["modality_join"]:
            matrix, names = modality_matrix(back, modality)
            original, original_names = modality_matrix(adata, modality)
            assert (matrix != original).nnz == 0 and names.equals(original_names)


# the convention on tiny inputs

def test_modality_keys():
    assert MODALITY_KEYS == {"Protein": ("protein_expression", "protein_names"), "ATAC": ("atac_counts", "atac_names"),
                             "HTO": ("hashtag_counts", "hashtag_names")}
    assert modality_keys("Protein") == modality_keys("protein") == ("protein_expression", "protein_names")
    assert modality_keys("atac") == ("atac_counts", "atac_names") and modality_keys("Spliced") == ("spliced_counts", "spliced_names")
    for bad, message in [("RNA", "RNA is not an extra modality"), ("rna", "RNA is not an extra modality"), ("", "non-empty name"),
                         ("  ", "non-empty name"), (None, "non-empty name"), ("Protein:ADT", "contains ':'")]:
        with pytest.raises(ValueError, match=message): modality_keys(bad)


def test_add_modality_reorders_to_adata_and_leaves_the_input_alone():
    rna, protein = _toy()
    rna_before, protein_before = rna.copy(), protein.copy()
    both = add_modality(rna, protein, "Protein")
    assert both is not rna and both.obs_names.tolist() == ["AAAC", "AAAG", "AACT", "AAGT"]
    assert isinstance(both.obsm["protein_expression"], np.ndarray) and both.obsm["protein_expression"].dtype == np.int32
    assert both.obsm["protein_expression"].tolist() == [[2, 40], [0, 7], [30, 1], [10, 10]]  # each row is its cell's
    assert both.uns["protein_names"].tolist() == ["CD3", "CD4"] and both.uns["protein_names"].dtype == object
    assert both.uns["modality_join"]["Protein"] == {"join": "exact", "n_cells": 4, "dropped_from_adata": 0, "dropped_from_features": 0}
    assert (both.X != rna.X).nnz == 0 and both.obs.equals(rna.obs)
    assert list(rna.obsm) == [] and dict(rna.uns) == {} and (rna.X != rna_before.X).nnz == 0  # nothing changed in place
    assert protein.obs_names.equals(protein_before.obs_names) and (protein.X == protein_before.X).all()
    both.obsm["protein_expression"][0, 0] = 999  # the result owns its arrays
    assert (protein.X == protein_before.X).all()


def test_add_modality_keeps_a_sparse_matrix_sparse():
    rna, protein = _toy()
    peaks = ad.AnnData(sp.csr_matrix(protein.X), obs=protein.obs, var=pd.DataFrame(index=["chr1:1-100", "chr1:200-300"]))
    both = add_modality(rna, peaks, "ATAC")
    assert sp.isspmatrix_csr(both.obsm["atac_counts"]) and both.obsm["atac_counts"].dtype == np.int32
    assert both.obsm["atac_counts"].toarray().tolist() == [[2, 40], [0, 7], [30, 1], [10, 10]]
    assert both.uns["atac_names"].tolist() == ["chr1:1-100", "chr1:200-300"]


def test_exact_join_names_the_barcodes_and_the_fix():
    rna, protein = _toy()
    partial = protein[["AAAC", "AACT", "AAGT"]].copy()
    with pytest.raises(ValueError) as info: add_modality(rna, partial, "Protein")
    message = str(info.value)
    assert "1 of adata's 4 barcodes missing from the Protein features (e.g. 'AAAG')" in message
    assert "join='inner'" in message and "keep the 3 cells in both" in message and "'-1'" in message
    extra = ad.AnnData(np.vstack([protein.X, [[1, 1]]]), obs=pd.DataFrame(index=[*protein.obs_names, "TTTT"]), var=protein.var)
    with pytest.raises(ValueError, match=r"1 of the 5 Protein barcodes missing from adata \(e.g. 'TTTT'\)"): add_modality(rna, extra, "Protein")
    suffixed = protein.copy(); suffixed.obs_names = suffixed.obs_names + "-1"
    with pytest.raises(ValueError, match=r"4 of them differ only by a suffix \(adata 'AAAC', features 'AAAC-1'\)"):
        add_modality(rna, suffixed, "Protein")
    one_suffixed = protein.copy(); one_suffixed.obs_names = ["AACT", "AAAC-1", "AAGT", "AAAG"]
    with pytest.raises(ValueError, match=r"1 of them differ only by a suffix .* join='inner' to keep the 3 cells"):
        add_modality(rna, one_suffixed, "Protein")


def test_inner_join_reports_what_it_dropped():
    rna, protein = _toy()
    extra = ad.AnnData(np.vstack([protein.X[1:], [[1, 1]]]), obs=pd.DataFrame(index=[*protein.obs_names[1:], "TTTT"]), var=protein.var)
    with pytest.warns(UserWarning, match=r"kept the 3 cells in both; dropped 1 of adata's 4 cells .* and 1 of the 4 Protein barcodes"):
        inner = add_modality(rna, extra, "Protein", join="inner")
    assert inner.obs_names.tolist() == ["AAAC", "AAAG", "AAGT"]  # adata's order, AACT (no protein row) dropped
    assert inner.obs["batch"].tolist() == ["a", "a", "b"] and inner.X.toarray().tolist() == [[1, 0, 2], [0, 3, 0], [0, 0, 5]]
    assert inner.obsm["protein_expression"].tolist() == [[2, 40], [0, 7], [10, 10]]
    assert inner.uns["modality_join"]["Protein"] == {"join": "inner", "n_cells": 3, "dropped_from_adata": 1, "dropped_from_features": 1}
    assert rna.n_obs == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing dropped: no warning
        same = add_modality(rna, protein, "Protein", join="inner")
    assert same.uns["modality_join"]["Protein"]["n_cells"] == 4
    nothing = protein.copy(); nothing.obs_names = ["x1", "x2", "x3", "x4"]
    with pytest.raises(ValueError, match="no barcode is in both adata and the Protein features"): add_modality(rna, nothing, "Protein", join="inner")
    with pytest.raises(ValueError, match="join must be 'exact' or 'inner'"): add_modality(rna, protein, "Protein", join="outer")


def test_add_modality_refuses_duplicates_and_existing_keys():
    rna, protein = _toy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about the repeated names made here on purpose
        twice = protein.copy(); twice.obs_names = ["AAAC", "AAAC", "AACT", "AAGT"]
        twice_rna = rna.copy(); twice_rna.obs_names = ["AAAC", "AAAG", "AAAG", "AAGT"]
        same_feature = protein.copy(); same_feature.var_names = ["CD4", "CD4"]
    with pytest.raises(ValueError, match=r"the Protein barcodes \(features.obs_names\) repeat 1 names \('AAAC' \(x2\)\)"): add_modality(rna, twice, "Protein")
    with pytest.raises(ValueError, match=r"adata.obs_names repeat 1 names \('AAAG' \(x2\)\)"): add_modality(twice_rna, protein, "Protein")
    with pytest.raises(ValueError, match=r"feature names \(features.var_names\) repeat 1 names \('CD4' \(x2\)\)"): add_modality(rna, same_feature, "Protein")
    both = add_modality(rna, protein, "Protein")
    with pytest.raises(ValueError, match="already holds a Protein modality .* pass overwrite=True"): add_modality(both, protein, "protein")
    swapped = add_modality(both, protein[:, ["CD4", "CD3"]].copy(), "Protein", overwrite=True)
    assert swapped.uns["protein_names"].tolist() == ["CD4", "CD3"] and swapped.obsm["protein_expression"][:, 0].tolist() == [40, 7, 1, 10]
    assert both.uns["protein_names"].tolist() == ["CD3", "CD4"]  # the input of the overwrite is unchanged
    with pytest.raises(ValueError, match="RNA is not an extra modality"): add_modality(rna, protein, "RNA")
    with pytest.raises(ValueError, match="non-empty name"): add_modality(rna, protein, "")
    with pytest.raises(TypeError, match="features must be an AnnData"): add_modality(rna, protein.X, "Protein")
    with pytest.raises(ValueError, match="holds no Protein counts"): add_modality(rna, protein[:, []].copy(), "Protein")


def test_modality_matrix_errors():
    rna, protein = _toy()
    with pytest.raises(KeyError) as info: modality_matrix(rna, "Protein")
    message = info.value.args[0]
    assert "no Protein modality" in message and "adata.obsm['protein_expression'] (counts)" in message
    assert "adata.uns['protein_names'] (feature names)" in message and "adata.obsm holds []" in message
    both = add_modality(rna, protein, "Protein")
    with pytest.raises(KeyError, match=r"adata.obsm\['atac_counts'\] .* adata.obsm holds \['protein_expression'\]"): modality_matrix(both, "ATAC")
    names_only = both.copy(); del names_only.uns["protein_names"]
    with pytest.raises(KeyError, match=r"adata.uns\['protein_names'\] \(feature names\) not found"): modality_matrix(names_only, "Protein")
    short = both.copy(); short.uns["protein_names"] = np.array(["CD3"], dtype=object)
    with pytest.raises(ValueError, match="1 names for the 2 columns"): modality_matrix(short, "Protein")
    wrong_rows = SimpleNamespace(obsm={"protein_expression": np.ones((3, 2), np.int32)}, uns=dict(both.uns), n_obs=4)  # AnnData itself refuses this
    with pytest.raises(ValueError, match="has 3 rows for 4 cells"): modality_matrix(wrong_rows, "Protein")
    matrix, names = modality_matrix(both, "protein")
    assert sp.isspmatrix_csr(matrix) and matrix.dtype == np.int32 and names.tolist() == ["CD3", "CD4"]
    frame = rna.copy(); frame.obsm["protein_expression"] = pd.DataFrame(both.obsm["protein_expression"], index=rna.obs_names, columns=["CD3", "CD4"])
    assert modality_matrix(frame, "Protein")[1].tolist() == ["CD3", "CD4"]  # a DataFrame names its own columns


def test_stack_modalities_keeps_gene_and_protein_apart():
    rna, protein = _toy()
    both = add_modality(rna, protein, "Protein")
    stacked = stack_modalities(both)
    assert stacked.var_names.tolist() == ["CD3E", "CD4", "LYZ", "Protein:CD3", "Protein:CD4"]  # genes first, then the proteins
    assert stacked.var["feature_name"].tolist() == ["CD3E", "CD4", "LYZ", "CD3", "CD4"]
    assert isinstance(stacked.var["modality"].dtype, pd.CategoricalDtype) and stacked.var["modality"].cat.categories.tolist() == ["RNA", "Protein"]
    assert stacked.var["modality"].tolist() == ["RNA"] * 3 + ["Protein"] * 2
    assert sp.isspmatrix_csr(stacked.X) and stacked.X.dtype == np.float32
    assert _column(stacked, "CD4").tolist() == [0, 3, 0, 0] and _column(stacked, "Protein:CD4").tolist() == [40, 7, 1, 10]
    assert (stacked.X[:, :3] != both.X).nnz == 0 and (stacked.X[:, 3:].toarray() == both.obsm["protein_expression"]).all()
    assert stacked.obs.equals(both.obs) and stacked.uns["modalities"] == ["RNA", "Protein"]


def test_stack_modalities_order_and_errors():
    rna, protein = _toy()
    hashtags = ad.AnnData(sp.csr_matrix(np.array([[5, 0], [0, 6], [7, 0], [0, 8]], np.int32)), obs=pd.DataFrame(index=rna.obs_names),
                          var=pd.DataFrame(index=["HTO1", "HTO2"]))
    both = add_modality(add_modality(rna, protein, "Protein"), hashtags, "HTO")
    stacked = stack_modalities(both, ["HTO", "Protein"])  # the order given
    assert stacked.var_names.tolist() == ["CD3E", "CD4", "LYZ", "HTO:HTO1", "HTO:HTO2", "Protein:CD3", "Protein:CD4"]
    assert stacked.var["modality"].cat.categories.tolist() == ["RNA", "HTO", "Protein"]
    assert _column(stacked, "HTO:HTO2").tolist() == [0, 6, 0, 8]
    assert stack_modalities(both, "protein").var_names.tolist()[-1] == "Protein:CD4"  # one name, in any case
    assert stack_modalities(both, []).var_names.tolist() == ["CD3E", "CD4", "LYZ"]
    repeated = both.copy(); repeated.uns["protein_names"] = np.array(["CD3", "CD3"], dtype=object)
    with pytest.raises(ValueError, match=r"the Protein feature names \(adata.uns\['protein_names'\]\) repeat 1 names \('CD3' \(x2\)\)"):
        stack_modalities(repeated)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        genes_twice = both.copy(); genes_twice.var_names = ["CD3E", "CD3E", "LYZ"]
    with pytest.raises(ValueError, match=r"adata.var_names \(the RNA genes\) repeat 1 names"): stack_modalities(genes_twice)
    clash = both.copy(); clash.var_names = ["CD3E", "Protein:CD4", "LYZ"]
    with pytest.raises(ValueError, match="stacked feature names repeat"): stack_modalities(clash)
    with pytest.raises(ValueError, match="names a modality twice"): stack_modalities(both, ["Protein", "protein"])
    with pytest.raises(ValueError, match="RNA is not an extra modality"): stack_modalities(both, ["RNA"])
    with pytest.raises(KeyError, match="no ATAC modality"): stack_modalities(both, ["ATAC"])


def test_stack_modalities_on_the_real_sets(eccite, multiome):
    stacked = stack_modalities(eccite, ["Protein", "HTO"])
    assert stacked.shape == (500, 19521 + 49 + 4)
    assert stacked.var["modality"].value_counts(sort=False).to_dict() == {"RNA": 19521, "Protein": 49, "HTO": 4}
    assert stacked.var.loc["CD4", "modality"] == "RNA" and stacked.var.loc["Protein:CD4", "modality"] == "Protein"
    assert (_column(stacked, "CD4") == _column(eccite, "CD4")).all()
    assert (_column(stacked, "Protein:CD4") == eccite.obsm["protein_expression"][:, list(eccite.uns["protein_names"]).index("CD4")]).all()
    assert (stacked.X[:, -4:].toarray() == eccite.obsm["hashtag_counts"]).all()
    assert stacked.uns["cellmtl_source"]["dataset"] == "eccite_pbmc"
    joint = stack_modalities(multiome, ["ATAC"])
    assert joint.shape == (1000, 45 + 174) and joint.var_names[45] == "ATAC:" + multiome.uns["atac_names"][0]
    assert (joint.X[:, 45:] != multiome.obsm["atac_counts"]).nnz == 0


def test_demultiplex_hashtags_rule():
    counts = np.array([[200, 1, 0], [150, 120, 2], [1, 0, 2], [0, 90, 1], [3, 2, 300], [180, 0, 1]])
    calls = demultiplex_hashtags(counts, ["A", "B", "C"])
    assert calls["hashtag"].tolist() == ["A", "Doublet", "Negative", "B", "C", "A"]
    assert calls["hashtag_top"].tolist() == ["A", "B", "C", "B", "C", "A"]
    clr = np.log1p(counts / np.exp(np.log1p(counts).mean(axis=0)))  # Seurat's CLR across cells, by hand
    ordered = np.sort(clr, axis=1)
    assert np.allclose(calls["hashtag_margin"], ordered[:, -1] - ordered[:, -2])
    assert demultiplex_hashtags(counts, ["A", "B", "C"], threshold=0.01)["hashtag"].eq("Doublet").sum() > 1  # everything is present
    with pytest.raises(ValueError, match="one distinct name per column"): demultiplex_hashtags(counts, ["A", "A", "C"])
    with pytest.raises(ValueError, match="non-integer"): demultiplex_hashtags(counts + 0.5, ["A", "B", "C"])
    with pytest.raises(ValueError, match="positive CLR value"): demultiplex_hashtags(counts, ["A", "B", "C"], threshold=float("nan"))
