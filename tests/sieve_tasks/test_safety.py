"""Static guarantees: no unpickling of untrusted files, no user value spliced into SQL text."""

import pathlib
import re

SOURCE = pathlib.Path(__file__).resolve().parents[2] / "sieve_tasks"


def _sources():
    return {p: p.read_text() for p in SOURCE.rglob("*.py")}


def test_no_pickle_and_torch_load_only_with_weights_only():
    for path, text in _sources().items():
        assert not re.search(r"^\s*import pickle|pickle\.loads?\(", text, re.M), path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_open_clip_checkpoints_load_with_weights_only():
    text = (SOURCE / "encoders.py").read_text()
    assert "weights_only=True" in text


def test_sql_takes_user_values_only_as_parameters():
    """f-strings that build SQL may only splice the fixed score-column expressions, never paths or params."""
    for path in (SOURCE / "stages" / "aggregate.py", SOURCE / "stages" / "publish.py", *(SOURCE / "report").glob("*.py")):
        for fragment in re.findall(r'f"""(.*?)"""|f"(SELECT[^"]*)"', path.read_text(), re.S):
            spliced = re.findall(r"\{([^}]*)\}", "".join(fragment))
            allowed = {"expression", "columns", "bin_of", "', '.join(KEPT_COLUMNS)", "candidate_filter(selection)",
                       "order", "candidate_filter(self.selection)", "side"}  # side, order: from samples.GRIDS
            assert set(spliced) <= allowed, (path, spliced)


def test_joined_tables_splice_only_validated_names():
    """tables.py splices view names (fixed prefixes + names matching EXTERNAL_NAME) and its own renamed columns;
    a table's own column names reach DuckDB as ColumnExpression, paths as parameters or read_parquet arguments."""
    text = (SOURCE / "tables.py").read_text()
    statements = re.findall(r'execute\((f?"[^)]*)\)', text)
    assert len(statements) >= 3
    spliced = {name for statement in statements for name in re.findall(r"\{([^}]*)\}", statement)}
    assert spliced <= {"', '.join([star] + added)", "joins"}, spliced
    assert "dataset.to_batches(columns=sources" in text
