"""The README stays true to the code."""

from tnd import params_doc

from tests.conftest import ROOT


def test_readme_params_table_matches_the_schema():
    readme = (ROOT / "README.md").read_text()
    assert params_doc.replace_in(readme) == readme, "run `python -m tnd.params_doc --write`"


def test_params_table_lists_every_leaf_key():
    keys = {row[0] for row in params_doc.rows()}
    assert {"ppo.learning_rate", "teacher.arch.hidden_size", "distill.loss", "tracking.uri"} <= keys
