"Gene alignment refuses too little overlap, finds renamed genes (aliases, Ensembl IDs), and binarised input must have zeros."
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellmtl.data import GeneAlignment, align_genes, check_binarizable, count_stats, entrez_genes


def _adata(X, genes, **var_columns):
    X = sp.csr_matrix(np.asarray(X, dtype=np.float32))
    return ad.AnnData(X, obs=pd.DataFrame(index=[f"c{i}" for i in range(X.shape[0])]),
                      var=pd.DataFrame(var_columns, index=pd.Index(genes)))


def _counts(n_cells, genes, seed=0):
    return _adata(np.random.default_rng(seed).poisson(1.0, (n_cells, len(genes))), genes)


REFERENCE = [f"GENE{i}" for i in range(765)]


def test_low_overlap_raises_with_the_numbers_and_the_override():
    query = _counts(5, REFERENCE[:38] + ["OTHER1", "OTHER2"])
    with pytest.raises(ValueError) as error:
        align_genes(query, REFERENCE)
    message = str(error.value)
    assert "the query has 38 of the 765 reference (training) genes (5.0%), below min_overlap=0.5" in message
    assert "symbols vs. Ensembl IDs" in message and "to align anyway pass min_overlap=0.04" in message


def test_the_override_aligns_and_warns_once():
    query = _counts(5, REFERENCE[:38])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aligned, report = align_genes(query, REFERENCE, min_overlap=0.04)
    assert [w.filename for w in caught] == [__file__]  # the warning points at this line, not into cellmtl
    assert "low gene overlap" in str(caught[0].message)
    assert aligned.shape == (5, 765) and (report.n_found, report.n_missing) == (38, 727)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        align_genes(query, REFERENCE, min_overlap=0.04, warn_below=0)  # warn_below=0: the caller warns itself
    aligned, _ = align_genes(query, REFERENCE, min_overlap=0)  # 0 accepts any overlap (but not none at all)
    with pytest.raises(ValueError, match="none of the 2 reference genes"):
        align_genes(query, ["X", "Y"], min_overlap=0)


def test_overlap_at_the_threshold_passes_and_bad_thresholds_are_refused():
    query = _counts(3, REFERENCE[:383])  # 383 / 765 = 50.07%
    assert align_genes(query, REFERENCE)[1].n_found == 383
    with pytest.raises(ValueError, match="1 of the 3 reference"):
        align_genes(_counts(2, ["a", "b"]), ["a", "x", "y"])
    with pytest.raises(ValueError, match="min_overlap is a fraction"):
        align_genes(query, REFERENCE, min_overlap=50)


def test_previous_symbols_are_rescued_and_reported():
    query = _adata(np.arange(1, 11).reshape(2, 5), ["JCHAIN", "FYB1", "VSIR", "CD3E", "C1ORF162"])
    reference = ["CD3E", "IGJ", "FYB", "C10orf54", "C1orf162", "MS4A1"]
    aligned, report = align_genes(query, reference)
    assert isinstance(report, GeneAlignment)
    assert report.rescued == [("IGJ", "JCHAIN", "Entrez gene"), ("FYB", "FYB1", "Entrez gene"),
                              ("C10orf54", "VSIR", "Entrez gene"), ("C1orf162", "C1ORF162", "orf case")]
    assert (report.n_found, report.n_rescued, report.n_missing, report.missing, report.extra) == (5, 4, 1, ["MS4A1"], [])
    np.testing.assert_array_equal(aligned[:, "IGJ"].X.toarray().ravel(), [1, 6])  # the JCHAIN column
    assert list(aligned.var["query_gene"]) == ["CD3E", "JCHAIN", "FYB1", "VSIR", "C1ORF162", ""]
    assert "4 of them under another symbol or ID" in report.summary() and "'IGJ' as 'JCHAIN'" in report.summary()
    assert "4 under another symbol" in repr(report)
    exact = align_genes(query, reference, rescue_symbols=False, min_overlap=0, warn_below=0)[1]
    assert (exact.n_found, exact.n_rescued, exact.rescued) == (1, 0, [])


def test_ambiguous_aliases_are_not_used():
    # ND1 is an old name of two genes (MT-ND1 and IVNS1ABP): it stands in for neither
    assert entrez_genes(["ND1", "MT-ND1", "IVNS1ABP"]).tolist() == ["", "4535", "10625"]
    _, report = align_genes(_counts(2, ["ND1", "CD3E"]), ["CD3E", "MT-ND1"])
    assert report.n_rescued == 0 and report.missing == ["MT-ND1"]
    # two query names of the same gene (IGCJ and JCH are both JCHAIN): no guess
    _, report = align_genes(_counts(2, ["IGCJ", "JCH", "CD3E"]), ["CD3E", "JCHAIN"])
    assert report.n_rescued == 0 and report.missing == ["JCHAIN"]
    # the gene is already a reference column under its current name: the old name is not used for a second column
    _, report = align_genes(_counts(2, ["JCHAIN", "CD3E", "IGJ"]), ["CD3E", "JCHAIN", "IGCJ"])
    assert report.n_rescued == 0 and report.missing == ["IGCJ"] and report.extra == ["IGJ"]


def test_ensembl_ids_match_when_both_sides_have_them():
    reference = ad.AnnData(var=pd.DataFrame({"gene_ids": ["ENSG00000198851", "ENSG00000156738", "ENSG00000000003"]},
                                            index=["CD3E", "MS4A1", "TSPAN6"]))
    query = _adata(np.eye(3), ["gene_a", "gene_b", "TSPAN6"], gene_ids=["ENSG00000156738.2", "ENSG00000198851", "ENSG00000000003"])
    aligned, report = align_genes(query, reference)
    assert report.rescued == [("CD3E", "gene_b", "Ensembl ID"), ("MS4A1", "gene_a", "Ensembl ID")]
    np.testing.assert_array_equal(aligned.X.toarray(), [[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    # Ensembl IDs as var_names against a symbol reference: through the shipped Ensembl -> Entrez table
    ids_query = _adata(np.eye(2), ["ENSG00000132465.11", "ENSG00000198851"])
    assert align_genes(ids_query, ["CD3E", "IGJ"])[1].rescued == [("CD3E", "ENSG00000198851", "Entrez gene"),
                                                                  ("IGJ", "ENSG00000132465.11", "Entrez gene")]


def test_pbmc68k_genes_are_found_in_the_citeseq_query_under_current_symbols(data_dir):
    from cellmtl.datasets import citeseq_pbmc, pbmc68k_hierarchy
    citeseq = citeseq_pbmc(data_dir)
    genes = pbmc68k_hierarchy().var_names
    by_name = align_genes(citeseq, genes, rescue_symbols=False)[1]
    by_gene = align_genes(citeseq, genes)[1]
    pairs = {reference: query for reference, query, _ in by_gene.rescued}
    assert by_name.n_missing == 68
    assert by_gene.n_rescued >= 18 and by_gene.n_missing == by_name.n_missing - by_gene.n_rescued
    assert pairs["IGJ"] == "JCHAIN" and pairs["C10orf54"] == "VSIR" and pairs["AMICA1"] == "JAML"
    assert all(query not in genes for query in pairs.values())  # never a column the reference already has


@pytest.mark.parametrize("container", ["dense", "csr", "csc"])
def test_a_matrix_without_zeros_is_refused_where_a_model_binarises(container):
    values = np.random.default_rng(0).random((300, 40)).astype(np.float32) + 0.5  # shifted: no zeros
    minmax = values - values.min()  # min-max style: a single zero
    convert = {"dense": np.asarray, "csr": sp.csr_matrix, "csc": sp.csc_matrix}[container]
    with pytest.raises(ValueError, match=r"query.X has no zero entries among its 12,000 values .* every gene would read as 'detected'"):
        check_binarizable(convert(values), "query.X")
    with pytest.raises(ValueError, match=r"only 1 zero entries \(0.01%\).*shifted \(a constant added\) or min-max scaled; pass counts"):
        check_binarizable(convert(minmax), "query.X")


def test_sparse_counts_with_implicit_zeros_pass_and_are_counted():
    counts = sp.random(500, 60, density=0.1, format="csr", random_state=0, dtype=np.float32)
    counts.data = np.ceil(counts.data * 5)
    stats = check_binarizable(counts)
    assert (stats["n_entries"], stats["n_zero"]) == (500 * 60, 500 * 60 - counts.nnz)
    counts.data[:3] = 0  # explicit stored zeros count too
    assert count_stats(counts)["n_zero"] == 500 * 60 - counts.nnz + 3
    with pytest.raises(ValueError, match="negative values"):  # scaled data: check_not_scaled's error comes first
        check_binarizable(np.array([[-1.0, 2.0], [0.0, 1.0]]))
    assert check_binarizable(np.array([[0.0, 2.0], [3.0, 1.0]]), min_zero_fraction=0.2)["n_zero"] == 1


def test_backed_matrices_are_scanned_by_blocks(tmp_path):
    values = np.random.default_rng(1).random((50, 20)).astype(np.float32) + 1
    ad.AnnData(sp.csr_matrix(values)).write_h5ad(tmp_path / "shifted.h5ad")
    backed = ad.read_h5ad(tmp_path / "shifted.h5ad", backed="r")
    try:
        with pytest.raises(ValueError, match="backed.X has no zero entries among its 1,000 values"):
            check_binarizable(backed.X, "backed.X")
    finally:
        backed.file.close()


def test_an_antisense_rna_is_not_taken_for_its_host_gene():
    "org.Hs.eg.db lists HNRNPU-AS1 as an alias of HNRNPU; older 10x annotations count it as its own RNA, so it must not stand in for HNRNPU."
    query = _counts(3, ["HNRNPU-AS1", "C6orf3", "APTR", "ACTB"])
    aligned, report = align_genes(query, ["HNRNPU", "TRAF3IP2-AS1", "RSBN1L-AS1", "ACTB"], min_overlap=0)
    pairs = sorted((reference, query) for reference, query, _ in report.rescued)
    assert pairs == [("RSBN1L-AS1", "APTR"), ("TRAF3IP2-AS1", "C6orf3")]  # real renames (to or from an -AS1 name) still count
    assert aligned[:, "HNRNPU"].X.nnz == 0
