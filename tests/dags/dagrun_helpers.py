"""Run DAGs with ``dag.test()`` and read back what they left in the metadata DB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.dags.airflow_env import DAGS


def load_dag(dag_id: str):
    """A freshly parsed DAG (so tests can change it) with retries off: a failure shows at once."""
    from airflow.dag_processing.dagbag import BundleDagBag

    bag = BundleDagBag(dag_folder=str(DAGS), bundle_path=DAGS, bundle_name="dags-folder")
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags[dag_id]
    for task in dag.tasks:
        task.retries = 0
    return dag


def run_dag(dag_id: str, conf: dict[str, Any], **kwargs: Any):
    dag = load_dag(dag_id)
    return dag.test(run_conf=conf, **kwargs)


def states(dagrun) -> dict[tuple[str, int], str]:
    return {(ti.task_id, ti.map_index): ti.state for ti in dagrun.get_task_instances()}


def labels(dagrun, task_id: str) -> list[str]:
    return [ti.rendered_map_index for ti in sorted(dagrun.get_task_instances(), key=lambda t: t.map_index)
            if ti.task_id == task_id]


def xcoms(dagrun, task_id: str, key: str = "return_value") -> list[Any]:
    """Values of one task's XCom, in map-index order."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(XComModel.get_many(run_id=dagrun.run_id, dag_ids=dagrun.dag_id, task_ids=task_id,
                                                  key=key)).all()
        return [XComModel.deserialize_value(r) for r in sorted(rows, key=lambda r: r.map_index)]


def stage_rows(run: str | Path) -> dict[str, int]:
    """Rows per stage output file: what a rerun must neither duplicate nor lose."""
    import pyarrow.parquet as pq

    counts = {}
    for stage in ("captions", "embeddings", "scores"):
        for path in sorted((Path(run) / stage).glob("*.parquet")):
            counts[f"{stage}/{path.name}"] = pq.read_metadata(path).num_rows
    counts["manifest/kept.parquet"] = pq.read_metadata(Path(run) / "manifest" / "kept.parquet").num_rows
    return counts


def uids(run: str | Path, stage: str) -> list[str]:
    import pyarrow.parquet as pq

    return sorted(u for p in sorted((Path(run) / stage).glob("*.parquet"))
                  for u in pq.read_table(p, columns=["uid"]).column("uid").to_pylist() if u is not None)
