#!/usr/bin/env python3
"""Build cellmtl/resources/gene_symbols.tsv.gz: human Ensembl gene ID -> symbol, Entrez ID, gene type, chromosome.

Source: Bioconductor's org.Hs.eg.db annotation package as packaged by Debian
(`r-bioc-org.hs.eg.db`, version 3.16.0-1 in Debian bookworm; its SQLite file says
EGSOURCEDATE 2022-Sep12 (NCBI Entrez Gene) and ENSOURCEDATE 2022-Jun28 (Ensembl)).
R is not needed: the package ships `org.Hs.eg.sqlite`, which Python's sqlite3 reads.

Usage (from the repository root):
    python data/build_gene_symbols.py                      # apt-get download + extract + write
    python data/build_gene_symbols.py --deb path/to/r-bioc-org.hs.eg.db_3.16.0-1_all.deb
    python data/build_gene_symbols.py --sqlite path/to/org.Hs.eg.sqlite

Rules (documented in data/README.md):
- one row per Ensembl gene ID in the `ensembl` table (Entrez -> Ensembl links from NCBI/Ensembl);
- an Ensembl ID linked to several Entrez genes (a few hundred) keeps one: protein-coding first, then
  the Entrez gene with the fewest Ensembl links, then the smallest Entrez ID;
- symbols are NCBI's, except mitochondrially encoded genes: NCBI writes `ND1`, `COX1`, ... while HGNC
  (and 10x/Ensembl references) write `MT-ND1`, `MT-CO1`, ...; we use the HGNC form, recovered from the
  `MTND1`-style alias that org.Hs.eg.db lists for each of them (else `MT-` + the NCBI symbol);
- org.Hs.eg.db links only the 13 protein-coding mitochondrial genes to Ensembl; the 2 rRNA and 22 tRNA genes
  (MT-RNR2 alone carries ~5% of CellBench's counts) get their Ensembl IDs from MITO_RNA_ENSEMBL below
  (Ensembl/GENCODE gene IDs, unchanged since GRCh37), joined to the database's Entrez genes by HGNC symbol
  (this replaces NCBI's link of ENSG00000210151, the MT-TS1 gene, to the microRNA MIR12136 inside it);
- the output is a deterministic gzip (mtime 0), so rebuilding gives the same bytes.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from orgdb import (EXPECTED_VERSION, MITO_RNA_ENSEMBL, MT_ALIAS_SQL, PACKAGE, REPO_ROOT, connect,  # noqa: E402,F401
                   download_deb, extract_sqlite, hgnc_mito_symbol, metadata, parse_args, sqlite_files, write_table)

DEFAULT_OUTPUT = REPO_ROOT / "cellmtl" / "resources" / "gene_symbols.tsv.gz"

MITO_QUERY = f"""
SELECT g.gene_id AS entrez_id, i.symbol, t.gene_type, 'MT' AS chromosome, 1 AS n_ensembl_links,
       {MT_ALIAS_SQL.format(x="g")} AS mt_alias
FROM genes g
JOIN gene_info i ON i._id = g._id
LEFT JOIN genetype t ON t._id = g._id
WHERE g._id IN (SELECT _id FROM chromosomes WHERE chromosome = 'MT')
  AND g._id NOT IN (SELECT _id FROM ensembl)
"""

QUERY = f"""
SELECT e.ensembl_id, g.gene_id AS entrez_id, i.symbol, t.gene_type,
       (SELECT group_concat(c.chromosome, ';') FROM chromosomes c WHERE c._id = e._id) AS chromosome,
       (SELECT count(*) FROM ensembl e2 WHERE e2._id = e._id) AS n_ensembl_links,
       {MT_ALIAS_SQL.format(x="e")} AS mt_alias
FROM ensembl e
JOIN genes g ON g._id = e._id
JOIN gene_info i ON i._id = e._id
LEFT JOIN genetype t ON t._id = e._id
"""


def build_table(sqlite_path: Path):
    """Read org.Hs.eg.sqlite and return the gene table as a pandas DataFrame (one row per Ensembl ID)."""
    import pandas as pd

    with connect(sqlite_path) as con:
        meta = metadata(con)
        df = pd.read_sql(QUERY, con)
        mito_rna = pd.read_sql(MITO_QUERY, con)
    mito = df["chromosome"].eq("MT")
    df.loc[mito, "symbol"] = [hgnc_mito_symbol(s, a) for s, a in zip(df.loc[mito, "symbol"], df.loc[mito, "mt_alias"])]
    mito_rna["symbol"] = [hgnc_mito_symbol(s, a) for s, a in zip(mito_rna["symbol"], mito_rna["mt_alias"])]
    mito_rna["ensembl_id"] = mito_rna["symbol"].map(MITO_RNA_ENSEMBL)
    missing = sorted(set(MITO_RNA_ENSEMBL) - set(mito_rna["symbol"]))
    if missing:
        sys.exit(f"mitochondrial RNA genes {missing} not found in org.Hs.eg.db; update MITO_RNA_ENSEMBL")
    mito_rna = mito_rna.dropna(subset=["ensembl_id"])
    # Ensembl names these IDs after the mitochondrial genes; where NCBI links one to another gene (ENSG00000210151
    # -> MIR12136, a microRNA annotated inside MT-TS1) the mitochondrial gene wins.
    clash = df["ensembl_id"].isin(mito_rna["ensembl_id"])
    for row in df[clash].itertuples():
        print(f"note: {row.ensembl_id} is linked to {row.symbol} (Entrez {row.entrez_id}) in org.Hs.eg.db; "
              f"using the mitochondrial gene instead", file=sys.stderr)
    df = pd.concat([df[~clash], mito_rna[df.columns]], ignore_index=True)
    df["entrez_num"] = df["entrez_id"].astype(int)
    df["not_coding"] = df["gene_type"].ne("protein-coding")
    df = df.sort_values(["ensembl_id", "not_coding", "n_ensembl_links", "entrez_num"])
    n_multi = int(df["ensembl_id"].duplicated().sum())
    df = df.drop_duplicates("ensembl_id", keep="first").sort_values("ensembl_id")
    df = df[["ensembl_id", "symbol", "entrez_id", "gene_type", "chromosome"]].fillna("")
    return df.reset_index(drop=True), meta, n_multi


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], DEFAULT_OUTPUT, argv=argv)
    with sqlite_files(args) as found:
        sqlite_path, deb_name = found[PACKAGE]
        df, meta, n_multi = build_table(sqlite_path)

    header = [
        "cellmtl human gene table: Ensembl gene ID -> symbol (HGNC-style MT- for mitochondrial genes), Entrez ID, type, chromosome",
        f"+ {len(MITO_RNA_ENSEMBL)} mitochondrial rRNA/tRNA Ensembl IDs (MITO_RNA_ENSEMBL in the script), which org.Hs.eg.db does not link",
        f"built by data/build_gene_symbols.py from Debian {deb_name} (Bioconductor org.Hs.eg.db)",
        f"EGSOURCEDATE={meta.get('EGSOURCEDATE')} ENSOURCEDATE={meta.get('ENSOURCEDATE')} TAXID={meta.get('TAXID')}",
        f"rows={len(df)}; Ensembl IDs linked to several Entrez genes resolved: {n_multi} extra links dropped",
    ]
    write_table(df, args.output, header)
    size = args.output.stat().st_size
    print(f"wrote {args.output} ({len(df)} genes, {size / 1e6:.2f} MB); {n_multi} multi-Entrez links resolved")


if __name__ == "__main__":
    main()
