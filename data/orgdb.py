"""Shared helpers for the data/build_*.py scripts: get Bioconductor SQLite annotation files from Debian packages.

The Debian packages `r-bioc-org.hs.eg.db` (org.Hs.eg.sqlite) and `r-bioc-go.db` (GO.sqlite), version
3.16.0-1 in Debian bookworm, are downloaded with `apt-get download`, unpacked with `dpkg-deb -x` and read
with Python's sqlite3 (R is not needed). Each script accepts, per package, `--deb` (a saved .deb, offline)
or `--sqlite` (the SQLite file itself); the GO.db options carry a `go-` prefix (`--go-deb`, `--go-sqlite`).
Also here: the mitochondrial-symbol rule and the deterministic gzip writer that every shipped table uses.
"""
from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import sqlite3
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
RESOURCES = REPO_ROOT / "cellmtl" / "resources"


@dataclass(frozen=True)
class DebSource:
    """A Debian package that ships one Bioconductor SQLite file."""

    package: str  # Debian package name
    version: str  # the version the shipped tables were built from
    sqlite_name: str  # the SQLite file inside the package
    option_prefix: str = ""  # command-line options are --{prefix}deb and --{prefix}sqlite

    @property
    def dest(self) -> str:
        return self.option_prefix.replace("-", "_")


ORG_HS = DebSource("r-bioc-org.hs.eg.db", "3.16.0-1", "org.Hs.eg.sqlite")
GO_DB = DebSource("r-bioc-go.db", "3.16.0-1", "GO.sqlite", "go-")

# kept for the scripts written before DebSource existed
PACKAGE = ORG_HS.package
EXPECTED_VERSION = ORG_HS.version  # Debian bookworm; other versions work but give a different table

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


def download_deb(workdir: Path, package: str = PACKAGE) -> Path:
    """`apt-get download` the Debian package into `workdir` (needs `apt-get update` to have run once)."""
    subprocess.run(["apt-get", "download", package], cwd=workdir, check=True)
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        sys.exit(f"apt-get download did not produce {package}_*.deb in {workdir}; run `apt-get update` first.")
    return debs[-1]


def extract_sqlite(deb: Path, workdir: Path, sqlite_name: str = ORG_HS.sqlite_name) -> Path:
    """Unpack the .deb with `dpkg-deb -x` and return the path of the SQLite file `sqlite_name` inside it."""
    root = workdir / ("extracted_" + deb.stem)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    found = sorted(root.rglob(sqlite_name))
    if not found:
        sys.exit(f"no {sqlite_name} inside {deb}")
    return found[0]


def parse_args(description: str, default_output: Path, sources=(ORG_HS,), argv=None) -> argparse.Namespace:
    """The scripts' command line: --deb/--sqlite for each source (prefixed, e.g. --go-deb), and --output."""
    parser = argparse.ArgumentParser(description=description)
    for src in sources:
        parser.add_argument(f"--{src.option_prefix}deb", type=Path,
                            help=f"use this downloaded {src.package} .deb instead of running apt-get download")
        parser.add_argument(f"--{src.option_prefix}sqlite", type=Path, help=f"use this {src.sqlite_name} directly")
    parser.add_argument("--output", type=Path, default=default_output, help="where to write the .tsv.gz")
    return parser.parse_args(argv)


@contextlib.contextmanager
def sqlite_files(args: argparse.Namespace, sources=(ORG_HS,)):
    """Yield {package: (sqlite_path, deb_name)}, downloading and unpacking into a temporary folder as needed."""
    with tempfile.TemporaryDirectory(prefix="orghs_") as tmp:
        workdir = Path(tmp)
        found = {}
        for src in sources:
            sqlite_arg, deb_arg = getattr(args, f"{src.dest}sqlite"), getattr(args, f"{src.dest}deb")
            if sqlite_arg:
                found[src.package] = (sqlite_arg, "(sqlite given directly)")
                continue
            deb = deb_arg or download_deb(workdir, src.package)
            if src.version not in deb.name:
                print(f"warning: expected {src.package} {src.version}, got {deb.name}", file=sys.stderr)
            found[src.package] = (extract_sqlite(deb, workdir, src.sqlite_name), deb.name)
        yield found


def connect(sqlite_path: Path) -> sqlite3.Connection:
    """Open a SQLite file read-only."""
    return sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)


def metadata(con: sqlite3.Connection) -> dict:
    """The `metadata` table (source names and dates) as a dict."""
    return dict(con.execute("SELECT name, value FROM metadata").fetchall())


# SQL expression: the MTND1-style alias org.Hs.eg.db lists for a mitochondrial gene (use with a table alias `x`).
MT_ALIAS_SQL = """(SELECT a.alias_symbol FROM alias a WHERE a._id = {x}._id AND a.alias_symbol LIKE 'MT%'
          AND a.alias_symbol NOT LIKE 'MT-%' ORDER BY a.alias_symbol LIMIT 1)"""


def hgnc_mito_symbol(symbol: str, mt_alias: str | None) -> str:
    """HGNC-style symbol for a mitochondrially encoded gene: alias MTND1 -> MT-ND1, TRNF -> MT-TF, else MT- + symbol."""
    if symbol.startswith("MT-"):
        return symbol
    if mt_alias:
        return "MT-" + mt_alias[2:]
    if symbol.startswith("TRN"):
        return "MT-T" + symbol[3:]
    return "MT-" + symbol


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
