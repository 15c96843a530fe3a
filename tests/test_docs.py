"""The docs name real things: every file, module, function, constant, test and environment
variable that docs/ARCHITECTURE.md ("where to change what"), README.md's Layout table and the
other docs name in backticks exists where they say it is.

Pure text checks (no imports of the package, no subprocesses): fast, and independent of the
terminal width and of the order the tests run in.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "bitnet_cli"
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md")) + [README]
# where a relative path in a doc may start: `pack/format.py` is the package's, `dispatch.c` the kernels'
ROOTS = (REPO, PACKAGE, REPO / "kernels")
SOURCE_SUFFIXES = (".py", ".c", ".h")

# backticked names that are not the repository's, with the reason
NOT_OURS = {
    "autotune/": "a folder of the cache directory, not of the repository",
    "torch.": "torch's own API",
    "config.json": "a checkpoint's file",
}

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PATH = re.compile(r"[\w./-]+\.(?:py|c|h|md|json|jsonl|yaml|txt)")


@functools.cache
def source_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


@functools.cache
def all_sources() -> tuple[Path, ...]:
    files = [p for root in (PACKAGE, REPO / "kernels", REPO / "benchmarks") for p in sorted(root.rglob("*"))
             if p.suffix in SOURCE_SUFFIXES and "build" not in p.relative_to(REPO).parts]
    return tuple(p for p in files if not p.name.startswith("_kernels"))  # cffi's generated module


def backticked(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", text)


def segments(text: str) -> list[str]:
    """Table rows and paragraphs: a bare name is looked up in the files its own row or paragraph names."""
    parts, paragraph = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|") or not line.strip():
            if paragraph:
                parts.append("\n".join(paragraph))
                paragraph = []
            if line.startswith("|"):
                parts.append(line)
        else:
            paragraph.append(line)
    return parts


def resolve(name: str, extra_roots: tuple[Path, ...] = ()) -> Path | None:
    """A doc's relative path (file or folder/) as it exists in the repository, or None."""
    for root in ROOTS + extra_roots:
        candidate = root / name.rstrip("/")
        if candidate.is_file() if not name.endswith("/") else candidate.is_dir():
            return candidate
    return None


def files_of(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in SOURCE_SUFFIXES)
    return [path]


def defines(path: Path, name: str) -> bool:
    """Whether a Python file defines `name` (function, class, assignment, field, import), or a C
    file has it as a word (a function, macro, struct, field or enum constant)."""
    text = source_text(path)
    if path.suffix != ".py":
        return re.search(rf"\b{re.escape(name)}\b", text) is not None
    word = re.escape(name)
    return re.search(rf"^\s*(?:async\s+def|def|class)\s+{word}\b|^\s*(?:self\.)?{word}\s*(?::[^\n]*)?=|"
                     rf"^\s*{word}\s*:|^\s*(?:from\s+\S+\s+)?import\s[^\n]*\b{word}\b|^\s+{word},?\s*(?:#.*)?$",
                     text, re.M) is not None


def mentions(path: Path, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", source_text(path)) is not None


def module_files(dotted: str) -> list[Path]:
    """The files of `arch`, `pack.format`, `bitnet_cli.serve.server`, `int8_linear` (a module
    named by its last part when that is unique in the package); [] when it names none."""
    parts = dotted.removeprefix("bitnet_cli.").split(".") if dotted != "bitnet_cli" else []
    if not parts:
        return [PACKAGE / "__init__.py"]
    as_path = PACKAGE.joinpath(*parts)
    if as_path.with_suffix(".py").is_file():
        return [as_path.with_suffix(".py")]
    if as_path.is_dir():
        return files_of(as_path)
    if len(parts) == 1:
        found = sorted(PACKAGE.rglob(f"{parts[0]}.py"))
        if len(found) == 1:
            return found
    return []


def recipe_field(name: str) -> bool:
    return defines(PACKAGE / "train" / "recipe.py", name)


def check_dotted(token: str, segment_files: list[Path]) -> str | None:
    """`module.symbol`, `package.module.symbol`, `Class.member`, `recipe_section.field`: an error or None."""
    parts = token.split(".")
    for split in range(len(parts) - 1, 0, -1):  # the longest prefix that is a module
        files = module_files(".".join(parts[:split]))
        if files:
            symbol, *members = parts[split:]
            owners = [f for f in files if defines(f, symbol)]
            if not owners and split == 1 and not members and recipe_field(symbol):
                return None  # a recipe key such as `model.preset`, `train.int8_matmul`
            if not owners:
                return f"`{token}`: {symbol} is not defined in {', '.join(str(f.relative_to(REPO)) for f in files)}"
            if members and not any(mentions(f, m) for f in owners for m in members):
                return f"`{token}`: {'.'.join(members)} is not in {owners[0].relative_to(REPO)}"
            return None
    owner, member = parts[0], parts[-1]  # a class or C struct and its member
    candidates = segment_files or list(all_sources())
    if any(defines(f, owner) and mentions(f, member) for f in candidates):
        return None
    return f"`{token}`: no file {'of its row/paragraph ' if segment_files else ''}defines {owner} with {member}"


def check_segment(segment: str, extra_roots: tuple[Path, ...] = ()) -> list[str]:
    """Every backticked path, module.symbol and code name of one table row or paragraph."""
    errors, names = [], []
    segment_files: list[Path] = []
    for token in backticked(segment):
        token = token.strip()
        if any(token.startswith(prefix) for prefix in NOT_OURS):
            continue
        path_part, _, symbol = token.partition(": ")  # `pack/format.py: tensor_specs`
        if PATH.fullmatch(path_part) or re.fullmatch(r"[\w./-]+/", token):
            found = resolve(path_part, extra_roots)
            if found is None:
                errors.append(f"`{token}`: no such {'folder' if token.endswith('/') else 'file'}")
                continue
            segment_files += files_of(found)
            if symbol and not defines(found, symbol):
                errors.append(f"`{token}`: {symbol} is not defined in {found.relative_to(REPO)}")
            continue
        if not token.startswith("test_"):  # tests are looked up in tests/ (test_every_test_the_docs_name_exists)
            names.append(token)
    for token in names:
        bare = re.sub(r"(\(\)|=|\*)$", "", token)  # `best_isa()`, `isa=`, `BN_KV_*`
        if re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", bare):
            error = check_dotted(bare, segment_files)
            if error:
                errors.append(error)
        elif IDENTIFIER.fullmatch(bare) and ("_" in bare or bare != bare.lower()):
            # a code name (`run_matmul`, `TernaryLayout`, `OWN`), not a plain word such as `auto`
            candidates = segment_files or list(all_sources())
            end = "" if token.endswith("*") else r"\b"  # `BN_KV_*` names a family of constants
            if not any(re.search(rf"\b{re.escape(bare)}{end}", source_text(f)) for f in candidates):
                where = "the files of its row/paragraph" if segment_files else "the sources"
                errors.append(f"`{token}`: not found in {where}")
    return errors


def test_architecture_names_only_files_and_symbols_that_exist():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    errors = [e for segment in segments(text) for e in check_segment(segment)]
    assert errors == []


def test_every_exception_is_used():
    tokens = backticked(ARCHITECTURE.read_text(encoding="utf-8"))
    assert [prefix for prefix in NOT_OURS if not any(t.startswith(prefix) for t in tokens)] == []


def readme_layout_rows() -> list[str]:
    text = README.read_text(encoding="utf-8")
    layout = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in layout.splitlines() if line.startswith("| `")]


def test_readme_layout_names_only_files_that_exist():
    rows = readme_layout_rows()
    assert len(rows) > 10  # the table was found
    errors = []
    for row in rows:
        where, owns = row.split("|")[1:3]
        folders = []
        for token in backticked(where):
            found = resolve(token)
            if found is None:
                errors.append(f"`{token}`: no such file or folder")
            elif found.is_dir():
                folders.append(found)
        # the second column's `recipe.py` lies in the first column's folder (or beside it: `pack/gguf.py`)
        errors += check_segment(owns, tuple(folders) + tuple(f.parent for f in folders))
    assert errors == []


def packages() -> list[Path]:
    return sorted(p.parent for p in PACKAGE.glob("*/__init__.py"))


def test_architecture_module_table_lists_every_module_and_package():
    """COMMON rule: add a module, add it to "Modules, bottom up"."""
    table = ARCHITECTURE.read_text(encoding="utf-8").split("## Modules, bottom up", 1)[1]
    listed = {token for line in table.splitlines() if line.startswith("| `")
              for token in backticked(line.split("|")[1])}
    modules = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"} | {f"{p.name}/" for p in packages()}
    assert sorted(modules - listed) == []


def test_readme_layout_names_every_module_of_each_package():
    """A package's row (`bitnet_cli/pack/`) names each of its modules (`ternary.py`, ...)."""
    rows = {row.split("|")[1].strip(): row.split("|")[2] for row in readme_layout_rows()}
    unnamed = []
    for package in packages():
        row = next((owns for where, owns in rows.items() if f"`bitnet_cli/{package.name}/`" in where), None)
        if row is None:
            unnamed.append(f"bitnet_cli/{package.name}/ (no row)")
            continue
        named = set(backticked(row))
        unnamed += [f"bitnet_cli/{package.name}/{p.name}" for p in sorted(package.glob("*.py"))
                    if p.name not in ("__init__.py", "__main__.py") and p.name not in named]
    assert unnamed == []


# ARCHITECTURE.md: "`kernels.py` and `model.py` reach `pack/ternary.py` inside functions, the two exceptions"
UPWARD_INSIDE_FUNCTIONS = {("kernels", "pack"), ("model", "pack")}


def module_rows() -> dict[str, int]:
    """`arch`, `pack`, ... -> its row in "Modules, bottom up" (0: the bottom)."""
    table = ARCHITECTURE.read_text(encoding="utf-8").split("## Modules, bottom up", 1)[1]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return {token.rstrip("/").removesuffix(".py"): row for row, line in enumerate(rows)
            for token in backticked(line.split("|")[1])}


def imported_units(path: Path) -> list[tuple[str, bool, int]]:
    """(top-level module or package of bitnet_cli it imports, inside a function?, line) per import."""
    relative = path.relative_to(PACKAGE).with_suffix("")
    package = ["bitnet_cli", *relative.parts[:-1]]
    tree = ast.parse(source_text(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).rstrip(".") \
                if node.level else node.module or ""
            names = [f"{module}.{a.name}" for a in node.names] if module == "bitnet_cli" else [module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(name.split(".")[1], id(node) not in top_level, node.lineno)
                  for name in names if name.startswith("bitnet_cli.")]
    return found


def test_imports_run_one_way_up_the_module_table():
    rows = module_rows()
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = path.relative_to(PACKAGE).with_suffix("").parts[0]
        for unit, in_function, line in imported_units(path):
            if me in rows and unit in rows and rows[unit] > rows[me] and \
                    not (in_function and (me, unit) in UPWARD_INSIDE_FUNCTIONS):
                upward.append(f"{path.relative_to(REPO)}:{line} imports {unit}")
    assert upward == []


def test_every_test_the_docs_name_exists():
    """`test_head` (C), `test_serve.py::test_bad_options_fail_cleanly`, `tests/test_kernels.py`."""
    defined = {m for p in (REPO / "tests").glob("test_*.py") for m in re.findall(r"^\s*def (test_\w+)", source_text(p), re.M)}
    defined |= set(re.findall(r"\b(test_\w+)\s*\(", source_text(REPO / "kernels" / "test_kernels.c")))
    missing = set()
    for doc in DOCS:
        for token in backticked(doc.read_text(encoding="utf-8")):
            for file in re.findall(r"\btest_\w+\.py\b", token):
                if not (REPO / "tests" / file).is_file():
                    missing.add(f"{doc.name}: {file}")
            for test in re.findall(r"\b(test_\w+)\b(?!\.\w)", token):
                if test not in defined:
                    missing.add(f"{doc.name}: {test}")
    assert sorted(missing) == []


def test_reliability_tests_named_without_a_file_are_in_test_reliability():
    """RELIABILITY.md: "All tests named below are in `tests/test_reliability.py` unless another file is given"."""
    text = (REPO / "docs" / "RELIABILITY.md").read_text(encoding="utf-8")
    assert "unless another file is given" in text
    defined = set(re.findall(r"^\s*def (test_\w+)", source_text(REPO / "tests" / "test_reliability.py"), re.M))
    elsewhere = {test for token in backticked(text) if "::" not in token and ".py" not in token
                 for test in re.findall(r"\b(test_\w+)\b(?!\.\w)", token) if test not in defined}
    assert sorted(elsewhere) == []


def test_every_environment_variable_the_docs_name_is_read_by_the_code():
    """`BITNET_HUGEPAGES`, and `BITNET_INT8_*` as a family (some variable with that prefix)."""
    code = "\n".join(source_text(p) for p in all_sources())
    missing = set()
    for doc in DOCS:
        for name, family in re.findall(r"\b(BITNET_[A-Z0-9_]*[A-Z0-9])(_?\*)?", doc.read_text(encoding="utf-8")):
            pattern = re.escape(name + family.rstrip("*")) + (r"\w" if family else r"\b")
            if not re.search(r"\b" + pattern, code):
                missing.add(f"{doc.name}: {name}{family}")
    assert sorted(missing) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_bitnet_cli_dotted_name_in_the_docs_exists(doc):
    """`bitnet_cli.arch.FAMILIES`, `bitnet_cli.pack.PackedModel.open`, `python -m bitnet_cli.fuzz`."""
    errors = []
    for token in backticked(doc.read_text(encoding="utf-8")):
        for dotted in re.findall(r"\bbitnet_cli(?:\.[A-Za-z_]\w*)+", token):
            if not module_files(dotted):  # a module, else a symbol of one
                error = check_dotted(dotted, [])
                if error:
                    errors.append(error)
    assert errors == []
