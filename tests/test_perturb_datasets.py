"""The real CRISPR-screen loaders (Papalexi knock-out, Schraivogel TAP-seq CRISPRi), their guide assignment and GEARS conditions."""
import dataclasses
import shutil
from unittest import mock

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellmtl import datasets
from cellmtl.datasets import (PAPALEXI_FILE, REGISTRY, SCHRAIVOGEL_FILES, DatasetChecksumError, assign_guides,
                              condition_name, file_sha256, list_datasets, papalexi_crispr, schraivogel_tapseq)

PAPALEXI_MEASURED = ["CMTM6", "IFNGR2", "JAK2", "NFKBIA", "STAT1", "STAT2", "STAT3", "TNFRSF14", "UBE2L6"]
TAPSEQ_TARGETS = ["CCNE2", "CPQ", "DSCC1", "FAM83A", "GATA1", "HS2", "LRRCC1", "MYC", "OXR1", "PHF20L1", "RIPK2", "STK3", "UBR5", "ZFPM2"]


@pytest.fixture(scope="module")
def papalexi_all(data_dir): return papalexi_crispr(data_dir, keep_unassigned=True)

@pytest.fixture(scope="module")
def papalexi(data_dir): return papalexi_crispr(data_dir)

@pytest.fixture(scope="module")
def tapseq_all(data_dir): return schraivogel_tapseq(data_dir, keep_unassigned=True)

@pytest.fixture(scope="module")
def tapseq(data_dir): return schraivogel_tapseq(data_dir)


def _check_screen(adata, all_cells):
    "What every screen loader promises: raw CSR int32 counts, GEARS conditions, an assignment consistent with uns."
    assert sp.isspmatrix_csr(adata.X) and adata.X.dtype == np.int32 and adata.X.has_canonical_format
    assert adata.X.data.min() >= 1  # stored entries are positive whole counts
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    assert (adata.obs["n_counts"].to_numpy() == np.asarray(adata.X.sum(axis=1)).ravel()).all()
    assert (adata.obs["n_genes"].to_numpy() == np.diff(adata.X.indptr)).all()
    grna_counts = adata.obsm["grna_counts"]
    assert sp.issparse(grna_counts) and grna_counts.dtype == np.int32 and grna_counts.shape == (adata.n_obs, len(adata.uns["grna_names"]))
    assert (adata.obs["grna_umis"].to_numpy() == np.asarray(grna_counts.sum(axis=1)).ravel()).all()
    for column in ("grna", "target", "condition", "replicate"): assert isinstance(adata.obs[column].dtype, pd.CategoricalDtype), column
    conditions = adata.obs["condition"].cat.categories
    assert conditions[0] == "ctrl" and all(c.endswith("+ctrl") and c.count("+") == 1 for c in conditions[1:])
    assert list(conditions[1:]) == [f"{t}+ctrl" for t in adata.uns["targets"]]
    assigned = adata.obs["condition"].notna().to_numpy()
    assert (assigned == adata.obs["grna"].notna().to_numpy()).all() and (assigned == adata.obs["target"].notna().to_numpy()).all()
    controls = adata.obs["target"] == "non-targeting"
    assert controls.sum() > 100 and adata.obs.loc[controls, "condition"].eq("ctrl").all()
    targeted = adata.obs[assigned & ~controls.to_numpy()]
    assert (targeted["condition"].astype(str) == targeted["target"].astype(str) + "+ctrl").all()
    target_of = dict(zip(adata.uns["grna_names"], adata.uns["grna_targets"]))
    assert (adata.obs.loc[assigned, "grna"].astype(str).map(target_of) == adata.obs.loc[assigned, "target"].astype(str)).all()
    # the rule: the top gRNA holds >= min_fraction of the cell's gRNA UMIs and >= min_umis UMIs
    rule = adata.uns["guide_assignment"]
    top_umis = adata.obs["grna_fraction"] * adata.obs["grna_umis"]
    assert (adata.obs.loc[assigned, "grna_fraction"] >= rule["min_fraction"]).all() and (top_umis[assigned] >= rule["min_umis"] - 1e-9).all()
    top = np.asarray(grna_counts.argmax(axis=1)).ravel()
    names = np.asarray(adata.uns["grna_names"])
    assert (names[top[assigned]] == adata.obs.loc[assigned, "grna"].astype(str).to_numpy()).all()
    assert rule["n_assigned"] + rule["n_unassigned"] == rule["n_cells"]
    assert sum(rule["cells_per_condition"].values()) == rule["n_assigned"]
    assert list(rule["cells_per_condition"]) == list(conditions)
    observed = adata.obs["condition"].value_counts().to_dict()
    assert observed == rule["cells_per_condition"]
    assert adata.n_obs == (rule["n_cells"] if all_cells else rule["n_assigned"])
    assert set(adata.var.loc[adata.var["is_target"], "gene_symbol"]) == set(adata.uns["targets"]) - set(adata.uns["targets_not_measured"])
    assert adata.uns["cellmtl_source"]["simulated"] is False and "cellmtl_levels" not in adata.uns


def test_papalexi_shapes_targets_and_replicates(papalexi_all):
    assert papalexi_all.shape == (20729, 299)
    assert papalexi_all.obs_names[0] == "cell_00000" and papalexi_all.obs_names[-1] == "cell_20728"
    targets = pd.Series(papalexi_all.uns["grna_targets"], index=papalexi_all.uns["grna_names"])
    assert len(targets) == 110 and (targets == "non-targeting").sum() == 9
    assert len(papalexi_all.uns["targets"]) == 26 and targets.loc[["PDL1g1", "PDL1g2", "PDL1g3"]].eq("CD274").all()
    assert sorted(set(papalexi_all.uns["targets"]) - set(papalexi_all.uns["targets_not_measured"])) == PAPALEXI_MEASURED
    assert len(papalexi_all.uns["targets_not_measured"]) == 17
    assert papalexi_all.obs["replicate"].cat.categories.tolist() == ["rep_1", "rep_2", "rep_3"]
    assert papalexi_all.obs["replicate"].value_counts().to_dict() == {"rep_1": 9428, "rep_2": 6001, "rep_3": 5300}
    _check_screen(papalexi_all, all_cells=True)


def test_papalexi_assignment_counts(papalexi, papalexi_all):
    rule = papalexi.uns["guide_assignment"]
    assert (rule["min_fraction"], rule["min_umis"]) == (0.8, 5)
    assert (rule["n_cells"], rule["n_assigned"], rule["n_unassigned"]) == (20729, 16192, 4537)
    assert papalexi.n_obs == 16192 and papalexi.obs["condition"].notna().all()
    assert rule["cells_per_condition"]["ctrl"] == 1923 and rule["cells_per_condition"]["CD274+ctrl"] == 0
    assert rule["cells_per_condition"]["IFNGR1+ctrl"] == 1064 and rule["cells_per_condition"]["SPI1+ctrl"] == 33
    assert papalexi_all.obs["condition"].isna().sum() == 4537
    assert papalexi_all[papalexi.obs_names].obs["condition"].astype(str).equals(papalexi.obs["condition"].astype(str))
    assert (papalexi.X != papalexi_all[papalexi.obs_names].X).nnz == 0  # subsetting keeps each cell's counts
    _check_screen(papalexi, all_cells=False)


def test_schraivogel_shapes_targets_and_lanes(tapseq_all):
    assert tapseq_all.shape == (21977, 72)
    assert tapseq_all.obs_names[0] == "TAP1-AAACCTGAGCCTATGT"
    targets = pd.Series(tapseq_all.uns["grna_targets"], index=tapseq_all.uns["grna_names"])
    assert len(targets) == 86 and targets.value_counts().to_dict() == {"non-targeting": 30, **{t: 4 for t in TAPSEQ_TARGETS}}
    assert tapseq_all.uns["targets"] == TAPSEQ_TARGETS and tapseq_all.uns["targets_not_measured"] == ["HS2"]
    assert tapseq_all.var["is_target"].sum() == 13
    assert tapseq_all.obs["replicate"].cat.categories.tolist() == ["TAP1", "TAP2"]
    assert tapseq_all.obs["replicate"].value_counts().to_dict() == {"TAP2": 10992, "TAP1": 10985}
    assert (tapseq_all.obs_names.str.split("-").str[0] == tapseq_all.obs["replicate"].astype(str)).all()
    assert (tapseq_all.obs["grna_umis"] == 0).sum() == 96 and tapseq_all.obs.loc[tapseq_all.obs["grna_umis"] == 0, "grna_fraction"].isna().all()
    _check_screen(tapseq_all, all_cells=True)


def test_schraivogel_assignment_counts(tapseq):
    rule = tapseq.uns["guide_assignment"]
    assert (rule["n_cells"], rule["n_assigned"], rule["n_unassigned"]) == (21977, 19098, 2879)
    assert rule["cells_per_condition"]["ctrl"] == 7793
    assert min(rule["cells_per_condition"].values()) == rule["cells_per_condition"]["ZFPM2+ctrl"] == 302
    _check_screen(tapseq, all_cells=False)


def test_crispri_lowers_each_measured_target(tapseq):
    "The CRISPRi target's own counts (per 10,000 panel counts) are lower than in the control cells, for all 13 panel genes."
    cp10k = sp.diags(1e4 / tapseq.obs["n_counts"].to_numpy(float)) @ tapseq.X.astype(np.float64)
    control = (tapseq.obs["condition"] == "ctrl").to_numpy()
    for target in set(TAPSEQ_TARGETS) - {"HS2"}:
        cells, j = (tapseq.obs["condition"] == f"{target}+ctrl").to_numpy(), tapseq.var_names.get_loc(target)
        assert cp10k[cells][:, j].mean() < 0.9 * cp10k[control][:, j].mean(), target  # from 0.07 (CPQ, LRRCC1) to 0.84 (MYC)


def test_stricter_thresholds_assign_fewer_cells(data_dir, papalexi):
    strict = papalexi_crispr(data_dir, min_fraction=0.95, min_umis=20)
    assert strict.uns["guide_assignment"]["n_assigned"] < papalexi.uns["guide_assignment"]["n_assigned"]
    assert set(strict.obs_names) <= set(papalexi.obs_names)
    assert (strict.obs["grna_fraction"] >= 0.95).all()


def test_assign_guides_on_a_tiny_matrix():
    counts = sp.csr_matrix(np.array([[0, 9, 1], [0, 3, 0], [6, 4, 0], [5, 5, 0], [0, 0, 0], [1, 0, 4]]))
    grna, share, total = assign_guides(counts, ["a", "b", "c"])
    assert grna.tolist() == [1, -1, -1, -1, -1, -1]
    assert total.tolist() == [10, 3, 10, 10, 0, 5]
    assert np.allclose(share[[0, 1, 2, 3, 5]], [0.9, 1.0, 0.6, 0.5, 0.8]) and np.isnan(share[4])
    assert assign_guides(counts, ["a", "b", "c"], min_umis=4)[0].tolist() == [1, -1, -1, -1, -1, 2]  # exactly at both thresholds
    assert assign_guides(counts, ["a", "b", "c"], min_fraction=0.5, min_umis=1)[0].tolist() == [1, 1, 0, -1, -1, 2]  # a tie never
    duplicates = sp.coo_matrix(([2, 3, 1], ([0, 0, 0], [1, 1, 0])), shape=(1, 3))  # repeated entries add up: b = 5
    grna, share, total = assign_guides(duplicates, ["a", "b", "c"], min_fraction=0.8, min_umis=5)
    assert (grna.tolist(), total.tolist()) == ([1], [6]) and np.isclose(share[0], 5 / 6)  # 5 of 6 UMIs: b
    assert assign_guides(duplicates, ["a", "b", "c"], min_umis=6)[0].tolist() == [-1]


def test_condition_names_are_gears_style():
    assert condition_name("STAT1") == "STAT1+ctrl" and condition_name(["STAT1"]) == "STAT1+ctrl"
    assert condition_name("non-targeting") == "ctrl" and condition_name([]) == "ctrl" and condition_name("ctrl") == "ctrl"
    assert condition_name(["STAT1", "JAK2"]) == "STAT1+JAK2" and condition_name(["STAT1", "non-targeting"]) == "STAT1+ctrl"
    with pytest.raises(ValueError, match="without '\\+'"): condition_name("A+B")


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_fraction=0), r"min_fraction must be in \(0, 1\]"), (dict(min_fraction=1.5), r"min_fraction must be in \(0, 1\]"),
    (dict(min_fraction=float("nan")), r"min_fraction must be in \(0, 1\]"), (dict(min_umis=0), "min_umis must be a whole number >= 1"),
    (dict(min_umis=2.5), "min_umis must be a whole number >= 1")])
def test_bad_thresholds_name_the_fix(kwargs, message, tmp_path):
    counts = sp.csr_matrix(np.array([[0, 9, 1]]))
    with pytest.raises(ValueError, match=message): assign_guides(counts, ["a", "b", "c"], **kwargs)
    for loader in (papalexi_crispr, schraivogel_tapseq):  # checked before any file is read
        with pytest.raises(ValueError, match=message): loader(data_dir=tmp_path / "nothing_here", **kwargs)


def test_assign_guides_rejects_bad_counts_and_names():
    with pytest.raises(ValueError, match="one distinct name per column"): assign_guides(sp.csr_matrix(np.ones((2, 3))), ["a", "b"])
    with pytest.raises(ValueError, match="one distinct name per column"): assign_guides(sp.csr_matrix(np.ones((2, 2))), ["a", "a"])
    with pytest.raises(ValueError, match="non-integer"): assign_guides(sp.csr_matrix(np.array([[0.5, 2.0]])), ["a", "b"])


def _copy(data_dir, tmp_path, paths):
    "A mirror in tmp_path holding copies of `paths` (registry paths)."
    for rel in paths:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(data_dir / rel, tmp_path / rel)
    return tmp_path


def test_loaders_fetch_through_the_registry(data_dir, tmp_path, monkeypatch):
    seen = []
    fetch = datasets.fetch
    monkeypatch.setattr(datasets, "fetch", lambda rel, data_dir=None, *a, **k: seen.append(rel) or fetch(rel, data_dir, *a, **k))
    papalexi_crispr(data_dir); schraivogel_tapseq(data_dir)
    assert seen == [PAPALEXI_FILE, *SCHRAIVOGEL_FILES]
    for rel in seen: assert REGISTRY[rel].url.startswith("https://raw.githubusercontent.com/") and len(REGISTRY[rel].sha256) == 64
    assert {"papalexi_crispr", "schraivogel_tapseq"} <= set(list_datasets()["name"])
    assert list_datasets().set_index("name").loc[["papalexi_crispr", "schraivogel_tapseq"], "files"].tolist() == [1, 2]


@pytest.mark.parametrize("loader, corrupt", [(papalexi_crispr, PAPALEXI_FILE), (schraivogel_tapseq, SCHRAIVOGEL_FILES[1])])
def test_a_corrupt_copy_is_refused(loader, corrupt, data_dir, tmp_path):
    mirror = _copy(data_dir, tmp_path, [PAPALEXI_FILE, *SCHRAIVOGEL_FILES])
    with open(mirror / corrupt, "ab") as f: f.write(b"\0")  # one extra byte
    with pytest.raises(DatasetChecksumError, match="Checksum mismatch") as info: loader(data_dir=mirror)
    assert str(mirror / corrupt) in str(info.value) and REGISTRY[corrupt].url in str(info.value)


def test_mismatched_barcodes_name_the_fix(data_dir, tmp_path):
    "Two Schraivogel files that list the cells in a different order (registered as such, so the checksum passes) are an error."
    mirror = _copy(data_dir, tmp_path, SCHRAIVOGEL_FILES)
    counts_rel = SCHRAIVOGEL_FILES[0]
    table = pd.read_csv(mirror / counts_rel, index_col=0)
    table.iloc[[0, 1]] = table.iloc[[1, 0]].to_numpy(); table.index = table.index[[1, 0, *range(2, len(table))]]  # swap two cells
    table.to_csv(mirror / counts_rel)
    patched = dataclasses.replace(REGISTRY[counts_rel], sha256=file_sha256(mirror / counts_rel), size=(mirror / counts_rel).stat().st_size)
    with mock.patch.dict(REGISTRY, {counts_rel: patched}):
        with pytest.raises(ValueError, match="do not list the same cells in the same order") as info: schraivogel_tapseq(data_dir=mirror)
    assert "row 0" in str(info.value) and "cellmtl datasets verify" in str(info.value)


def test_round_trip_through_h5ad(papalexi, tmp_path):
    papalexi.write_h5ad(tmp_path / "papalexi.h5ad")
    back = ad.read_h5ad(tmp_path / "papalexi.h5ad")
    assert (back.X != papalexi.X).nnz == 0 and (back.obsm["grna_counts"] != papalexi.obsm["grna_counts"]).nnz == 0
    assert back.obs["condition"].cat.categories.tolist() == papalexi.obs["condition"].cat.categories.tolist()
    assert back.uns["guide_assignment"]["n_assigned"] == 16192 and list(back.uns["targets_not_measured"]) == papalexi.uns["targets_not_measured"]
