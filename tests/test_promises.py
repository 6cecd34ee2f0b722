"""The promise table (docs/PROMISES.md) cannot rot: every row names at least one test, every test it names
exists (a module-level ``test_*`` function of that file), the README links the table and every reference page
of docs/, and each section of the table names one of those documents."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "PROMISES.md"
# the headings of the tables of promises: the READMEs and the reference pages of docs/ the README links
DOCS = tuple(sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md") if p.name != "PROMISES.md"))
SECTIONS = ("README.md", "slurm/README.md", *DOCS)
TEST_REF = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def promise_rows() -> dict[str, str]:
    """Row id -> the row's text, from the tables under the SECTIONS headings."""
    rows: dict[str, str] = {}
    for section in re.split(r"^## ", TABLE.read_text(), flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        if heading.strip() not in SECTIONS:
            continue
        for line in body.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not line.startswith("|") or cells[0] == "#" or set(cells[0]) <= set("-:"):
                continue  # not a row, the header or the separator
            # 12, 12a (inserted after 12), 12a1 (after 12a), S3, S3a: a row with another id would not be checked
            assert re.fullmatch(r"S?\d+(?:[a-z]\d*)?", cells[0]), f"row id {cells[0]!r}: not 12, 12a or 12a1"
            assert cells[0] not in rows, f"row {cells[0]} appears twice"
            rows[cells[0]] = line
    return rows


@functools.cache
def defined_tests(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def test_every_row_names_tests_that_exist():
    rows = promise_rows()
    assert len(rows) > 80 and {"1", "S1"} <= set(rows)
    missing = []
    for row, text in rows.items():
        refs = TEST_REF.findall(text)
        assert refs, f"row {row} names no test: {text[:120]}"
        for path, name in refs:
            if not (ROOT / path).is_file() or name not in defined_tests(path):
                missing.append(f"row {row}: {path}::{name}")
    assert not missing, "tests named in docs/PROMISES.md that do not exist:\n" + "\n".join(missing)


def test_the_readme_links_the_table():
    assert "(docs/PROMISES.md)" in (ROOT / "README.md").read_text()


def test_the_readme_links_every_reference_page_and_every_section_names_one():
    """A page moved or renamed takes its section of the table along: a section named after a file that is not
    there (or not linked) would hold rows no reader finds."""
    readme = (ROOT / "README.md").read_text()
    for page in DOCS:
        assert f"]({page})" in readme, f"README.md does not link {page}"
    headings = [h.strip() for h in re.findall(r"^## (.+)$", TABLE.read_text(), flags=re.M)]
    files = [h for h in headings if h.endswith(".md")]
    assert set(files) <= set(SECTIONS) and len(files) > 2, files
