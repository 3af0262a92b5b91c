"""The package's shape: few top-level modules, folders named after their parts, no import cycle."""

import ast
import importlib
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "llmrom"


def module_name(path):
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path):
    """Every llmrom module a file imports, at top level or inside a function (lazy imports count too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) \
                if node.level else (node.module or "")
            if not base.startswith("llmrom"):
                continue
            for alias in node.names:  # `from . import api` names a module; `from .x import f` names x
                sub = f"{base}.{alias.name}"
                found.add(sub if (SRC.parent / (sub.replace(".", "/") + ".py")).exists() else base)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("llmrom")}
    return found - {"llmrom"} - {name}  # `from .. import __version__` reads the package root, not a module


def graph():
    return {module_name(p): imports_of(p) for p in SRC.rglob("*.py")}


def test_no_import_cycle():
    g, state, path = graph(), {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == "open":
                pytest.fail("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_checker_finds_a_cycle(tmp_path, monkeypatch):
    """The cycle test can fail: two modules that import each other are caught."""
    pkg = tmp_path / "llmrom"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("def f():\n    from .a import y\n")
    monkeypatch.setattr(__import__(__name__), "SRC", pkg)
    with pytest.raises(pytest.fail.Exception, match="import cycle: llmrom.a -> llmrom.b -> llmrom.a"):
        test_no_import_cycle()


def test_top_level_is_small_and_folders_say_what_they_are():
    top = sorted(p.name for p in SRC.glob("*.py"))
    assert len(top) <= 8, top
    for folder in ("factor", "plan", "loop", "modeling", "data", "eval", "heal"):
        doc = ast.get_docstring(ast.parse((SRC / folder / "__init__.py").read_text()))
        assert doc and "May import" in doc, folder


def test_every_module_imports():
    for m in sorted(graph()):
        if m != "llmrom.__main__":
            importlib.import_module(m)


def test_public_names_keep_working():
    import llmrom
    for name in ("compress", "load", "save", "load_model", "CompressConfig", "LlmromError"):
        assert callable(getattr(llmrom, name)), name


def test_option_reference_in_docs_is_current():
    """docs/options.md's reference is what scripts/make_options_doc.py writes from config.py today."""
    import importlib.util as u
    spec = u.spec_from_file_location("make_options_doc", SRC.parents[1] / "scripts" / "make_options_doc.py")
    mod = u.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.DOC.read_text()
    assert mod.render(text) == text, "run: python scripts/make_options_doc.py"
    assert "| `--budget` |" in text and "| `--centered / --no-centered` | True |" in text


def test_readme_is_the_users_page():
    readme = (SRC.parents[1] / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    head = "\n".join(readme.splitlines()[:30])
    assert "bash scripts/demo.sh" in head and "bash scripts/test.sh" in head
    docs = SRC.parents[1] / "docs"
    for link in __import__("re").findall(r"\]\((docs/[^)#]+)", readme):
        assert (SRC.parents[1] / link).is_file(), link
    for page in docs.glob("*.md"):  # each page starts with what it answers
        assert page.read_text().split("\n\n")[1].startswith("Answers:"), page.name


def test_compress_help_puts_everyday_options_first(capsys):
    from llmrom import cli
    with pytest.raises(SystemExit):
        cli.main(["compress", "--help"])
    out = capsys.readouterr().out
    sections = [line for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert sections[1] == "everyday options:" and "planning: how the budget becomes ranks:" in sections
    assert out.index("--budget") < out.index("--nsamples") < out.index("--method METHOD") < out.index("--stream")
    assert max(len(line) for line in out.splitlines()) <= 100
