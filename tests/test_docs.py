"""The README stays true to the code."""

from tnd import params_doc

from tests.conftest import ROOT, repo_params


def test_readme_params_table_matches_the_schema():
    readme = (ROOT / "README.md").read_text()
    assert params_doc.replace_in(readme) == readme, "run `python -m tnd.params_doc --write`"


def leaf_keys(tree: dict, prefix: str = ""):
    """Dotted keys of params.yaml's leaves (an empty mapping, like ppo.optimizer_kwargs, is a leaf)."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_params_table_lists_every_leaf_key():
    # Every parameter params.yaml sets has its row, in the generated table and in the README.
    leaves = set(leaf_keys(repo_params()))
    assert len(leaves) > 100  # the walk really reached the nested sections
    assert sorted(leaves - {row[0] for row in params_doc.rows()}) == []
    readme = (ROOT / "README.md").read_text()
    assert [key for key in sorted(leaves) if f"| `{key}` |" not in readme] == []
