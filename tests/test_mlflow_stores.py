"""MLflow on PostgreSQL, the gpu overlay's store, through a real server: what `cxr promote` needs of the registry."""

from __future__ import annotations

import contextlib

import numpy as np
from conftest import register_seeded_model
from mlflow.tracking import MlflowClient

from cxr.models import loading
from cxr.tracking import registry

NAME, SIZE = "cxr-pg", 32


def _seeded(seed: int):
    import keras

    from cxr.models import build_model

    keras.utils.set_random_seed(seed)
    return build_model("small_cnn", SIZE)


def _same_weights(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights(), strict=True))


def test_postgres_backed_server_keeps_versions_aliases_tags_and_artifacts(mlflow_pg_server, postgres, tmp_path):
    _, first, run1 = register_seeded_model(tmp_path, NAME, SIZE, 1, tracking_uri=mlflow_pg_server)
    _, second, run2 = register_seeded_model(tmp_path, NAME, SIZE, 2, tracking_uri=mlflow_pg_server)
    assert (first, second) == (f"models:/{NAME}/1", f"models:/{NAME}/2")
    client = MlflowClient(mlflow_pg_server)
    assert registry.get(client, NAME, run2).version == "2"
    assert registry.alias(client, NAME) is None

    registry.crown(client, NAME, "1", None)
    registry.crown(client, NAME, "2", registry.alias(client, NAME))
    registry.tag(client, NAME, "2", {"cxr.decision": "promote", "cxr.decision.ci_low": None})
    champion, previous = registry.alias(client, NAME), registry.alias(client, NAME, registry.PREVIOUS)
    assert (champion.version, champion.run_id, previous.version, previous.run_id) == ("2", run2, "1", run1)
    assert {k: v for k, v in champion.tags.items() if k.startswith("cxr.")} == {"cxr.decision": "promote"}

    # The artifacts went through the server and come back: the champion's weights are seed 2's, not seed 1's.
    loaded = loading.load(f"models:/{NAME}@champion", mlflow_pg_server)
    assert loaded.registered == (NAME, "2") and loaded.run_id == run2
    assert _same_weights(loaded.model, _seeded(2)) and not _same_weights(loaded.model, _seeded(1))

    # And it is PostgreSQL that holds them: MLflow's own tables, read with the driver.
    with contextlib.closing(postgres.connect()) as conn, conn.cursor() as cur:
        cur.execute("SELECT version, run_id FROM model_versions WHERE name = %s ORDER BY version", (NAME,))
        assert cur.fetchall() == [(1, run1), (2, run2)]
        cur.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s ORDER BY alias", (NAME,))
        assert cur.fetchall() == [("champion", 2), ("previous", 1)]
        cur.execute("SELECT value FROM model_version_tags WHERE name = %s AND version = 2 AND key = %s",
                    (NAME, "cxr.decision"))
        assert cur.fetchall() == [("promote",)]
