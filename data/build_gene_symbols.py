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

import argparse
import gzip
import io
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGE = "r-bioc-org.hs.eg.db"
EXPECTED_VERSION = "3.16.0-1"  # Debian bookworm; other versions work but give a different table
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "cellmtl" / "resources" / "gene_symbols.tsv.gz"

# Ensembl gene IDs of the mitochondrially encoded RNA genes (chrM order), which org.Hs.eg.db does not link.
MITO_RNA_ENSEMBL = {
    "MT-TF": "ENSG00000210049", "MT-RNR1": "ENSG00000211459", "MT-TV": "ENSG00000210077",
    "MT-RNR2": "ENSG00000210082", "MT-TL1": "ENSG00000209082", "MT-TI": "ENSG00000210100",
    "MT-TQ": "ENSG00000210107", "MT-TM": "ENSG00000210112", "MT-TW": "ENSG00000210117",
    "MT-TA": "ENSG00000210127", "MT-TN": "ENSG00000210135", "MT-TC": "ENSG00000210140",
    "MT-TY": "ENSG00000210144", "MT-TS1": "ENSG00000210151", "MT-TD": "ENSG00000210154",
    "MT-TK": "ENSG00000210156", "MT-TG": "ENSG00000210164", "MT-TR": "ENSG00000210174",
    "MT-TH": "ENSG00000210176", "MT-TS2": "ENSG00000210184", "MT-TL2": "ENSG00000210191",
    "MT-TE": "ENSG00000210194", "MT-TT": "ENSG00000210195", "MT-TP": "ENSG00000210196",
}

MITO_QUERY = """
SELECT g.gene_id AS entrez_id, i.symbol, t.gene_type, 'MT' AS chromosome, 1 AS n_ensembl_links,
       (SELECT a.alias_symbol FROM alias a WHERE a._id = g._id AND a.alias_symbol LIKE 'MT%'
          AND a.alias_symbol NOT LIKE 'MT-%' ORDER BY a.alias_symbol LIMIT 1) AS mt_alias
FROM genes g
JOIN gene_info i ON i._id = g._id
LEFT JOIN genetype t ON t._id = g._id
WHERE g._id IN (SELECT _id FROM chromosomes WHERE chromosome = 'MT')
  AND g._id NOT IN (SELECT _id FROM ensembl)
"""

QUERY = """
SELECT e.ensembl_id, g.gene_id AS entrez_id, i.symbol, t.gene_type,
       (SELECT group_concat(c.chromosome, ';') FROM chromosomes c WHERE c._id = e._id) AS chromosome,
       (SELECT count(*) FROM ensembl e2 WHERE e2._id = e._id) AS n_ensembl_links,
       (SELECT a.alias_symbol FROM alias a WHERE a._id = e._id AND a.alias_symbol LIKE 'MT%'
          AND a.alias_symbol NOT LIKE 'MT-%' ORDER BY a.alias_symbol LIMIT 1) AS mt_alias
FROM ensembl e
JOIN genes g ON g._id = e._id
JOIN gene_info i ON i._id = e._id
LEFT JOIN genetype t ON t._id = e._id
"""


def download_deb(workdir: Path) -> Path:
    """`apt-get download` the Debian package into `workdir` (needs `apt-get update` to have run once)."""
    subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, check=True)
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        sys.exit(f"apt-get download did not produce {PACKAGE}_*.deb in {workdir}; run `apt-get update` first.")
    return debs[-1]


def extract_sqlite(deb: Path, workdir: Path) -> Path:
    """Unpack the .deb with `dpkg-deb -x` and return the path of org.Hs.eg.sqlite."""
    root = workdir / "extracted"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    found = sorted(root.rglob("org.Hs.eg.sqlite"))
    if not found:
        sys.exit(f"no org.Hs.eg.sqlite inside {deb}")
    return found[0]


def hgnc_mito_symbol(symbol: str, mt_alias: str | None) -> str:
    """HGNC-style symbol for a mitochondrially encoded gene: alias MTND1 -> MT-ND1, TRNF -> MT-TF, else MT- + symbol."""
    if symbol.startswith("MT-"):
        return symbol
    if mt_alias:
        return "MT-" + mt_alias[2:]
    if symbol.startswith("TRN"):
        return "MT-T" + symbol[3:]
    return "MT-" + symbol


def build_table(sqlite_path: Path):
    """Read org.Hs.eg.sqlite and return the gene table as a pandas DataFrame (one row per Ensembl ID)."""
    import pandas as pd

    with sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True) as con:
        meta = dict(con.execute("SELECT name, value FROM metadata").fetchall())
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


def write_table(df, output: Path, header_lines: list[str]) -> None:
    """Write a deterministic gzip TSV (mtime 0) with `#` comment lines on top."""
    text = io.StringIO()
    for line in header_lines:
        text.write(f"# {line}\n")
    df.to_csv(text, sep="\t", index=False, lineterminator="\n")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        gz.write(text.getvalue().encode())
    tmp.replace(output)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb", type=Path, help="use this downloaded .deb instead of running apt-get download")
    parser.add_argument("--sqlite", type=Path, help="use this org.Hs.eg.sqlite directly")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="where to write the .tsv.gz")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="orghs_") as tmp:
        workdir = Path(tmp)
        if args.sqlite:
            sqlite_path, deb_name = args.sqlite, "(sqlite given directly)"
        else:
            deb = args.deb or download_deb(workdir)
            deb_name = deb.name
            if EXPECTED_VERSION not in deb_name:
                print(f"warning: expected {PACKAGE} {EXPECTED_VERSION}, got {deb_name}", file=sys.stderr)
            sqlite_path = extract_sqlite(deb, workdir)
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
