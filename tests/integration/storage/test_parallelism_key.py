"""The data-parallel job in the probe cache key (migration 0007), on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, MetaData, insert

from storage.db import downgrade_schema, make_engine, upgrade_schema
from storage.models import Base
from storage.repository import _probe_values, find_cached_probe, get_plan, save_plan, save_probe
from tests.integration.storage.conftest import Database
from tests.integration.storage.factories import H100, gpt2_workload, plan, plan_request, probe_result
from tuner.parallelism import ParallelismSpec, ParallelSetup
from tuner.probe_key import ProbeKey

FSDP_8 = ParallelSetup(parallelism=ParallelismSpec(strategy="fsdp"), world_size=8).probe_key
FSDP_64 = ParallelSetup(parallelism=ParallelismSpec(strategy="fsdp"), world_size=64).probe_key
DDP = ParallelSetup(parallelism=ParallelismSpec(strategy="ddp"), world_size=8).probe_key


def _key(parallelism: str = "") -> ProbeKey:
    return ProbeKey.of(
        gpt2_workload(),
        H100,
        backend="cuda",
        torch_minor="2.13",
        gradient_checkpointing=False,
        alloc_conf="expandable_segments:True",
        parallelism=parallelism,
    )


def test_each_parallelism_is_its_own_cached_answer(database: Database) -> None:
    workload = gpt2_workload()
    ids = {}
    with database.sessions() as session:
        for size, key in ((51, ""), (48, DDP), (90, FSDP_8), (120, FSDP_64)):
            result = probe_result(workload=workload, max_batch_size=size).model_copy(
                update={"parallelism": key}
            )
            ids[key] = save_probe(session, result=result)
    assert len(set(ids.values())) == 4
    with database.sessions() as session:
        for key, probe_id in ids.items():
            hit = find_cached_probe(session, _key(key))
            assert hit is not None and hit.id == probe_id and hit.parallelism == key
        assert find_cached_probe(session, _key()).id == ids[""]  # type: ignore[union-attr]
        other = ParallelSetup(parallelism=ParallelismSpec(strategy="fsdp"), world_size=2).probe_key
        assert find_cached_probe(session, _key(other)) is None


def test_a_plan_keeps_its_parallelism_and_memory_per_rank(database: Database) -> None:
    workload = gpt2_workload()
    request = plan_request(workload)
    request["world_size"] = 8
    request["parallelism"] = {"strategy": "fsdp", "reshard_after_forward": True, "param_dtype": "bf16"}
    memory = {
        "micro_batch_size": 12,
        "parameters": 10,
        "gradients": 20,
        "optimizer_state": 30,
        "activations": 40,
    }
    stored = plan(workload=workload).model_copy(
        update={
            "world_size": 8,
            "parallelism": ParallelismSpec.model_validate(request["parallelism"]),
            "memory_per_rank": memory,
        }
    )
    with database.sessions() as session:
        plan_id = save_plan(session, plan=stored, request=request)
    with database.sessions() as session:
        loaded = get_plan(session, plan_id=plan_id)
    assert loaded.parallelism == ParallelismSpec(strategy="fsdp", param_dtype="bf16")
    assert loaded.memory_per_rank == memory


def _schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))


def test_migration_0007_adds_the_parallelism_to_the_key_and_downgrades(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    workload = gpt2_workload()
    try:
        upgrade_schema(engine, "0006")
        tables = MetaData()
        tables.reflect(engine)
        values = _probe_values(probe_result(workload=workload))
        del values["parallelism"]  # not a 0006 column
        with engine.begin() as connection:
            table = tables.tables["probe_results"]
            single = int(connection.execute(insert(table).returning(table.c.id), values).scalar_one())

        upgrade_schema(engine, "0007")
        assert _schema_diff(engine) == []
        hit = find_cached_probe(engine, _key())
        assert hit is not None and hit.id == single and hit.parallelism == ""  # a single process
        fsdp = save_probe(
            engine, result=probe_result(workload=workload).model_copy(update={"parallelism": FSDP_8})
        )
        assert fsdp != single

        downgrade_schema(engine, "0006")
        with engine.connect() as connection:
            statuses = dict(connection.exec_driver_sql("SELECT id, status FROM probe_results").all())
        # One old key, two results: the single-process one stays the answer.
        assert statuses == {single: "complete", fsdp: "superseded"}
        upgrade_schema(engine)
        assert _schema_diff(engine) == []
    finally:
        engine.dispose()
