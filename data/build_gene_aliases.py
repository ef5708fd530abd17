#!/usr/bin/env python3
"""Build cellmtl/resources/gene_aliases.tsv.gz: human gene symbols and aliases -> Entrez gene, current symbol flagged.

Source: the same Debian package as `gene_symbols.tsv.gz` (`r-bioc-org.hs.eg.db` 3.16.0-1, Bioconductor
org.Hs.eg.db; NCBI Gene snapshot 2022-09-12); its `gene_info` table gives each Entrez gene's current
(HGNC) symbol, its `alias` table the previous symbols and aliases (IGJ -> JCHAIN, FYB -> FYB1, ...).
`cellmtl.data.align_genes` uses it to find a reference gene that a query names by another symbol; the
table is shipped, so nothing here (R, Debian, apt) is needed at run time.

Usage (from the repository root):
    python data/build_gene_aliases.py                      # apt-get download + extract + write
    python data/build_gene_aliases.py --deb path/to/r-bioc-org.hs.eg.db_3.16.0-1_all.deb
    python data/build_gene_aliases.py --sqlite path/to/org.Hs.eg.sqlite

Rules:
- one row per (name, Entrez gene) pair: every `gene_info` symbol with current=1, every other `alias`
  name with current=0 (an alias may name several genes: the reader treats such names as ambiguous);
- mitochondrially encoded genes take their HGNC symbols (MT-ND1, MT-TF, ...) as current, as in
  gene_symbols.tsv.gz; NCBI's ND1/TRNF spellings stay as aliases;
- sorted and written as a deterministic gzip (mtime 0), so rebuilding gives the same bytes.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from orgdb import MT_ALIAS_SQL, PACKAGE, REPO_ROOT, connect, hgnc_mito_symbol, metadata, parse_args, sqlite_files, write_table  # noqa: E402

DEFAULT_OUTPUT = REPO_ROOT / "cellmtl" / "resources" / "gene_aliases.tsv.gz"

CURRENT = f"""
SELECT g.gene_id AS entrez_id, i.symbol AS name,
       (SELECT 1 FROM chromosomes c WHERE c._id = g._id AND c.chromosome = 'MT') AS mito,
       {MT_ALIAS_SQL.format(x="g")} AS mt_alias
FROM genes g JOIN gene_info i ON i._id = g._id
"""
ALIASES = "SELECT g.gene_id AS entrez_id, a.alias_symbol AS name FROM alias a JOIN genes g ON g._id = a._id"


def build_table(sqlite_path: Path):
    """(name, entrez_id, current) rows from org.Hs.eg.sqlite, and the database's metadata."""
    import pandas as pd

    with connect(sqlite_path) as con:
        meta = metadata(con)
        current = pd.read_sql(CURRENT, con)
        aliases = pd.read_sql(ALIASES, con)
    mito = current["mito"].eq(1)
    ncbi_mito = current[mito].assign(current=0)[["name", "entrez_id", "current"]]  # ND1, COX1, TRNF: kept as aliases
    current.loc[mito, "name"] = [hgnc_mito_symbol(s, a) for s, a in zip(current.loc[mito, "name"], current.loc[mito, "mt_alias"])]
    current = current.assign(current=1)[["name", "entrez_id", "current"]]
    aliases = aliases.assign(current=0)
    table = pd.concat([current, ncbi_mito, aliases], ignore_index=True)
    table = table[table["name"].str.len() > 0]
    table = table.sort_values("current", ascending=False).drop_duplicates(["name", "entrez_id"])  # a current symbol wins
    table["entrez_num"] = table["entrez_id"].astype(int)
    table = table.sort_values(["name", "entrez_num"])[["name", "entrez_id", "current"]].reset_index(drop=True)
    return table, meta


def main(argv=None) -> None:
    args = parse_args(__doc__.splitlines()[0], DEFAULT_OUTPUT, argv=argv)
    with sqlite_files(args) as found:
        sqlite_path, deb_name = found[PACKAGE]
        table, meta = build_table(sqlite_path)
    n_current = int(table["current"].sum())
    header = [
        "cellmtl human gene aliases: name -> Entrez gene; current=1 for the gene's current (HGNC) symbol, 0 for previous symbols/aliases",
        "mitochondrial genes use HGNC MT- symbols as current (NCBI's ND1, COX1, TRNF kept as aliases)",
        f"built by data/build_gene_aliases.py from Debian {deb_name} (Bioconductor org.Hs.eg.db)",
        f"EGSOURCEDATE={meta.get('EGSOURCEDATE')} TAXID={meta.get('TAXID')}",
        f"rows={len(table)}; current symbols={n_current}; names naming several genes={int(table['name'].duplicated().sum())} extra rows",
    ]
    write_table(table, args.output, header)
    print(f"wrote {args.output} ({len(table)} rows, {args.output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
