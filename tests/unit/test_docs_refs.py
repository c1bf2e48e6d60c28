"""Every pointer from the code to documentation stays inside the repository and leads somewhere.

- No file under r1_megatron/, tests/, bench/, launch/, tools/, configs/, nor README.md, names the
  design documents that live outside the repository (the old spec, design and platform notes).
- Every `docs/<name>.md` such a file names exists, and every `docs/<name>.md#anchor` names a heading
  of that file (GitHub's anchor rule: lower case, punctuation dropped, spaces to hyphens).
- Every fix in compat_cpu.py's FIXES table names a test that exists and is listed in its docstring.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ["r1_megatron", "tests", "bench", "launch", "tools", "configs", "README.md"]
SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".sbatch", ".json", ""}
# Spelled in pieces so that this file does not match itself.
OUTSIDE = [re.escape(x) for x in ("SPEC" + " §", "SPEC" + ".md", "DESIGN" + ".md", "notes/" + "platform.md")]
DOC_REF = re.compile(r"docs/([\w-]+)\.md(?:#([\w-]+))?")


def _files() -> list[Path]:
    out = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        out += [p for p in candidates if p.suffix in SUFFIXES and "__pycache__" not in p.parts]
    return out


def _anchors(doc: Path) -> set[str]:
    heads = re.findall(r"^#+\s+(.+?)\s*$", doc.read_text(), flags=re.M)
    return {re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", h.lower())) for h in heads}


def test_no_reference_points_outside_the_repository():
    pattern = re.compile("|".join(OUTSIDE))
    found = []
    for path in _files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "references to documents outside the repository:\n" + "\n".join(found)


def test_every_named_doc_exists_with_its_section():
    missing, refs = [], 0
    for path in _files():
        for name, anchor in DOC_REF.findall(path.read_text(errors="replace")):
            refs += 1
            doc = ROOT / "docs" / f"{name}.md"
            if not doc.is_file():
                missing.append(f"{path.relative_to(ROOT)}: docs/{name}.md does not exist")
            elif anchor and anchor not in _anchors(doc):
                missing.append(f"{path.relative_to(ROOT)}: docs/{name}.md has no section #{anchor}")
    assert refs > 0, "no source file points into docs/ (the scan is broken)"
    assert not missing, "\n".join(missing)


def test_links_between_docs_resolve():
    missing = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        for target, anchor in re.findall(r"\]\(([\w-]+\.md)?(?:#([\w-]+))?\)", doc.read_text()):
            path = ROOT / "docs" / target if target else doc
            if not path.is_file():
                missing.append(f"{doc.name}: {target} does not exist")
            elif anchor and anchor not in _anchors(path):
                missing.append(f"{doc.name}: {path.name} has no section #{anchor}")
    assert not missing, "\n".join(missing)


def test_every_cpu_fix_names_a_test_that_exists():
    from r1_megatron.parallel import compat_cpu

    doc = compat_cpu.__doc__
    for fix in compat_cpu.FIXES:
        path, name = fix.test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), f"compat_cpu fix {fix.name}: no test {fix.test}"
        assert f" {fix.name}: " in doc, f"compat_cpu's docstring does not list the fix {fix.name}"
