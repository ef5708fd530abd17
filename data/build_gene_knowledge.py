#!/usr/bin/env python3
"""Build cellmtl/resources/gene_knowledge.tsv.gz and go_terms.tsv.gz: per human Entrez gene, name, GO, KEGG, Pfam.

Sources: Bioconductor's org.Hs.eg.db and GO.db as packaged by Debian bookworm (`r-bioc-org.hs.eg.db` and
`r-bioc-go.db`, both 3.16.0-1: NCBI Gene 2022-09-12, GO 2022-07-01, KEGG 2011-03-15 snapshot). R is not
needed: the packages ship `org.Hs.eg.sqlite` and `GO.sqlite`, which Python's sqlite3 reads. These packages
carry no free-text gene summary: the text a model reads about a gene is its full name plus its GO term names.

Usage (from the repository root):
    python data/build_gene_knowledge.py          # apt-get download both packages + extract + write both tables
    python data/build_gene_knowledge.py --deb r-bioc-org.hs.eg.db_3.16.0-1_all.deb --go-deb r-bioc-go.db_3.16.0-1_all.deb
    python data/build_gene_knowledge.py --sqlite org.Hs.eg.sqlite --go-sqlite GO.sqlite

gene_knowledge.tsv.gz, one row per Entrez gene with a symbol (genes without GO terms are kept), sorted by
Entrez ID; multi-valued fields are `;`-joined, sorted, deduplicated, empty when none:
    entrez_id  symbol  ensembl_id  name  gene_type  go_bp  go_cc  go_mf  kegg  pfam  go_categories
- symbol: NCBI's, except mitochondrially encoded genes in HGNC `MT-` form (as gene_symbols.tsv.gz);
- ensembl_id: the `ensembl` table's links, plus the mitochondrial rRNA/tRNA IDs of MITO_RNA_ENSEMBL
  (which replace NCBI's link of ENSG00000210151 to MIR12136), as in gene_symbols.tsv.gz;
- go_bp / go_cc / go_mf: direct annotations (`go_bp` etc. tables), any evidence code;
- kegg: KEGG pathway IDs as stored (`04660`); pfam: Pfam IDs (`PF00047`);
- go_categories: names of the CATEGORIES below whose GO.db offspring (is_a, part_of and regulates links;
  `go_bp_offspring`) or the category term itself include at least one of the gene's direct BP terms.
go_terms.tsv.gz: `go_id ontology term n_genes` for every GO term used in the gene table, sorted by go_id;
n_genes = genes of the table annotated with it directly (fewest = most specific).
Both are deterministic gzips (mtime 0).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from orgdb import (GO_DB, MITO_RNA_ENSEMBL, MT_ALIAS_SQL, ORG_HS, RESOURCES, connect, hgnc_mito_symbol,  # noqa: E402
                   metadata, parse_args, sqlite_files, write_table)

DEFAULT_OUTPUT = RESOURCES / "gene_knowledge.tsv.gz"
GO_TERMS_NAME = "go_terms.tsv.gz"  # written next to --output

# Broad, well-known, fairly disjoint GO biological-process categories for the figure's 2-D map.
CATEGORIES = {
    "GO:0002376": "immune system process",
    "GO:0007049": "cell cycle",
    "GO:0006412": "translation",
    "GO:0045333": "cellular respiration",  # oxidative phosphorylation, TCA cycle, electron transport: mitochondrial
    "GO:0030198": "extracellular matrix organization",
    "GO:0006396": "RNA processing",
    "GO:0007165": "signal transduction",
    "GO:0006281": "DNA repair",
    "GO:0007155": "cell adhesion",
    "GO:0006629": "lipid metabolic process",
}

COLUMNS = {
    "entrez_id": "NCBI Entrez gene ID",
    "symbol": "NCBI symbol; mitochondrially encoded genes in HGNC MT- form (MT-CO1), as in gene_symbols.tsv.gz",
    "ensembl_id": "Ensembl gene IDs (ENSG), ;-joined",
    "name": "full gene name (gene_info.gene_name)",
    "gene_type": "NCBI gene type (genetype table), as in gene_symbols.tsv.gz",
    "go_bp": "direct GO biological-process IDs, any evidence code, ;-joined",
    "go_cc": "direct GO cellular-component IDs, ;-joined",
    "go_mf": "direct GO molecular-function IDs, ;-joined",
    "kegg": "KEGG pathway IDs as stored (04660 = hsa04660; 2011 snapshot), ;-joined",
    "pfam": "Pfam domain IDs (PF00047), ;-joined",
    "go_categories": "names of the broad BP categories listed above that contain one of the gene's go_bp terms, ;-joined",
}

GENES = f"""
SELECT g._id, g.gene_id AS entrez_id, i.symbol, i.gene_name AS name, t.gene_type,
       (SELECT 1 FROM chromosomes c WHERE c._id = g._id AND c.chromosome = 'MT') AS mito,
       {MT_ALIAS_SQL.format(x="g")} AS mt_alias
FROM genes g JOIN gene_info i ON i._id = g._id LEFT JOIN genetype t ON t._id = g._id
WHERE i.symbol IS NOT NULL AND i.symbol != ''
"""
LINKS = {  # column -> query giving (_id, value)
    "ensembl_id": "SELECT _id, ensembl_id AS value FROM ensembl",
    "go_bp": "SELECT _id, go_id AS value FROM go_bp",
    "go_cc": "SELECT _id, go_id AS value FROM go_cc",
    "go_mf": "SELECT _id, go_id AS value FROM go_mf",
    "kegg": "SELECT _id, path_id AS value FROM kegg",
    "pfam": "SELECT _id, pfam_id AS value FROM pfam",
}


def joined(links, ids):
    """`;`-join each gene's sorted distinct values; '' for genes in `ids` without any."""
    links = links[links["value"].notna() & links["value"].ne("")].drop_duplicates().sort_values(["_id", "value"])
    return links.groupby("_id")["value"].agg(";".join).reindex(ids).fillna("")


def category_members(go_con) -> dict:
    """Category name -> set of BP GO IDs: the category term and its GO.db offspring."""
    members = {}
    for go_id, name in CATEGORIES.items():
        rows = go_con.execute("""SELECT t.go_id FROM go_term t WHERE t.go_id = ?1 OR t._id IN
            (SELECT o._offspring_id FROM go_bp_offspring o JOIN go_term c ON c._id = o._id WHERE c.go_id = ?1)""",
                              (go_id,)).fetchall()
        if not rows:
            sys.exit(f"category {go_id} ({name}) not in GO.sqlite; update CATEGORIES for this GO.db version")
        members[name] = {r[0] for r in rows}
    return members


def build_tables(org_path: Path, go_path: Path):
    """The gene table, the GO term table and both databases' metadata."""
    import pandas as pd

    with connect(org_path) as con:
        meta = metadata(con)
        genes = pd.read_sql(GENES, con)
        links = {col: pd.read_sql(q, con) for col, q in LINKS.items()}
    with connect(go_path) as go_con:
        go_meta = metadata(go_con)
        members = category_members(go_con)
        go_term = pd.read_sql("SELECT go_id, ontology, term FROM go_term", go_con)
        obsolete = pd.read_sql("SELECT go_id, ontology, term FROM go_obsolete", go_con)
    mito = genes["mito"].eq(1)
    genes.loc[mito, "symbol"] = [hgnc_mito_symbol(s, a) for s, a in zip(genes.loc[mito, "symbol"], genes.loc[mito, "mt_alias"])]
    # mitochondrial rRNA/tRNA genes: Ensembl IDs from MITO_RNA_ENSEMBL, replacing any other gene's link to them
    ens = links["ensembl_id"]
    mito_ids = genes.loc[mito & genes["symbol"].isin(MITO_RNA_ENSEMBL), ["_id", "symbol"]]
    ens = ens[~ens["value"].isin(MITO_RNA_ENSEMBL.values())]
    links["ensembl_id"] = pd.concat([ens, mito_ids.assign(value=mito_ids["symbol"].map(MITO_RNA_ENSEMBL))[["_id", "value"]]])
    genes = genes.assign(entrez_num=genes["entrez_id"].astype(int)).sort_values("entrez_num")
    ids = genes["_id"].to_numpy()
    table = genes[["entrez_id", "symbol"]].reset_index(drop=True)
    table["ensembl_id"] = joined(links["ensembl_id"], ids).to_numpy()
    table["name"] = genes["name"].fillna("").to_numpy()
    table["gene_type"] = genes["gene_type"].fillna("").to_numpy()
    for col in ["go_bp", "go_cc", "go_mf", "kegg", "pfam"]:
        table[col] = joined(links[col], ids).to_numpy()
    table["go_categories"] = [";".join(sorted(name for name, m in members.items() if not m.isdisjoint(bp.split(";"))))
                              if bp else "" for bp in table["go_bp"]]
    # GO terms used by the table, with how many of its genes carry each directly
    used = pd.concat([links[c][links[c]["_id"].isin(ids)].drop_duplicates() for c in ["go_bp", "go_cc", "go_mf"]])
    counts = used.groupby("value")["_id"].nunique().rename("n_genes").rename_axis("go_id").reset_index()
    names = pd.concat([go_term, obsolete]).drop_duplicates("go_id")
    terms = counts.merge(names, on="go_id", how="left").fillna("")
    missing = terms["term"].eq("").sum()
    if missing:
        print(f"warning: {missing} GO IDs of org.Hs.eg.db are not in GO.sqlite; their term is empty", file=sys.stderr)
    terms = terms.sort_values("go_id")[["go_id", "ontology", "term", "n_genes"]].reset_index(drop=True)
    return table, terms, meta, go_meta, members


def main(argv=None) -> None:
    sources = (ORG_HS, GO_DB)
    args = parse_args(__doc__.splitlines()[0], DEFAULT_OUTPUT, sources, argv)
    with sqlite_files(args, sources) as found:
        (org_path, org_deb), (go_path, go_deb) = found[ORG_HS.package], found[GO_DB.package]
        table, terms, meta, go_meta, members = build_tables(org_path, go_path)
    source_lines = [
        f"sources: Debian {org_deb} (Bioconductor org.Hs.eg.db) and {go_deb} (Bioconductor GO.db)",
        f"org.Hs.eg.db: EGSOURCEDATE={meta.get('EGSOURCEDATE')} GOSOURCEDATE={meta.get('GOSOURCEDATE')} "
        f"GOEGSOURCEDATE={meta.get('GOEGSOURCEDATE')} KEGGSOURCEDATE={meta.get('KEGGSOURCEDATE')} "
        f"ENSOURCEDATE={meta.get('ENSOURCEDATE')} UPSOURCEDATE={meta.get('UPSOURCEDATE')} TAXID={meta.get('TAXID')}",
        f"GO.db: GOSOURCEDATE={go_meta.get('GOSOURCEDATE')} GOSOURCEURL={go_meta.get('GOSOURCEURL')}",
        "built by data/build_gene_knowledge.py (see data/README.md)",
    ]
    n_go = int((table[["go_bp", "go_cc", "go_mf"]] != "").any(axis=1).sum())
    header = [
        "cellmtl human gene knowledge: one row per Entrez gene with a symbol; ;-joined sorted lists, empty when none",
        *source_lines,
        "go_categories = broad GO BP categories (GO.db go_bp_offspring, incl. the term itself): "
        + "; ".join(f"{go_id} {name} ({sum(name in c.split(';') for c in table['go_categories'])} genes)"
                    for go_id, name in CATEGORIES.items()),
        *(f"column {col}: {meaning}" for col, meaning in COLUMNS.items()),
        f"rows={len(table)}; with any GO={n_go}; with KEGG={int(table['kegg'].ne('').sum())}; "
        f"with Pfam={int(table['pfam'].ne('').sum())}; with Ensembl={int(table['ensembl_id'].ne('').sum())}",
    ]
    write_table(table, args.output, header)
    terms_path = args.output.parent / GO_TERMS_NAME
    write_table(terms, terms_path, [
        "cellmtl GO terms used by gene_knowledge.tsv.gz (go_bp, go_cc, go_mf columns)",
        *source_lines,
        "column go_id: GO ID; column ontology: BP, CC or MF; column term: GO.db term name",
        "column n_genes: how many genes of gene_knowledge.tsv.gz carry the term directly (fewest = most specific)",
        f"rows={len(terms)}",
    ])
    print(f"wrote {args.output} ({len(table)} genes, {n_go} with GO, {args.output.stat().st_size / 1e6:.2f} MB) and "
          f"{terms_path} ({len(terms)} terms, {terms_path.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
