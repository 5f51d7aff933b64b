"""The docs stay true to the code, and inside the repository."""

import os
import re
import subprocess
import sys

from tnd import params_doc

from tests.conftest import ROOT, repo_params


def test_params_page_table_matches_the_schema():
    page = params_doc.PAGE.read_text()
    assert params_doc.replace_in(page) == page, "run `python -m tnd.params_doc --write`"


def leaf_keys(tree: dict, prefix: str = ""):
    """Dotted keys of params.yaml's leaves (an empty mapping, like ppo.optimizer_kwargs, is a leaf)."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_params_table_lists_every_leaf_key():
    # Every parameter params.yaml sets has its row, in the generated table and on the params page.
    leaves = set(leaf_keys(repo_params()))
    assert len(leaves) > 100  # the walk really reached the nested sections
    assert sorted(leaves - {row[0] for row in params_doc.rows()}) == []
    page = params_doc.PAGE.read_text()
    assert [key for key in sorted(leaves) if f"| `{key}` |" not in page] == []


def test_the_docs_build_strictly(tmp_path):
    """mkdocs refuses (strict) a page outside the nav, a broken link or a missing anchor."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "design" / "index.html").is_file()


def test_no_file_links_outside_the_repository():
    """A user's clone has nothing beside it: no tracked text points into a parent directory of the repository."""
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    outside = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".md", ".py", ".yaml", ".yml", ".toml", ".sh", ".cfg"} or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for target in re.findall(r"\]\(([^)#\s]+)", text) + re.findall(r"(?<![\w.])\.\./shared\b[^\s`'\")]*", text):
            if "://" in target:
                continue
            resolved = (path.parent / target).resolve()
            if ROOT.resolve() not in (resolved, *resolved.parents):
                outside.append(f"{name}: {target}")
    assert outside == []
