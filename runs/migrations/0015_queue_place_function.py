"""The queue-depth fast path as a function of the database (runs/queue_depth.py): a start can
then take its place and insert its run in the same round trip, the function refusing on the
server when the fast path does not apply."""

from django.db import migrations

# Lock any free counter row of the tenant (SKIP LOCKED, from a random start), then read the sum
# in a statement of its own (a VOLATILE function takes a new snapshot per statement: after the
# row is locked). The place is the row, noted for the run's INSERT in runwarden.depth_shard.
# NULL (or, with p_raise, SQLSTATE RWQ01) when no row is free or the sum leaves no room for every
# start that may be in flight unseen (one per row: p_shards).
PLACE_SQL = """
CREATE OR REPLACE FUNCTION runs_queue_place_fast(
    p_tenant bigint, p_start integer, p_default_limit integer, p_shards integer, p_raise boolean
) RETURNS integer LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    taken integer;
    depth bigint;
    depth_limit integer;
BEGIN
    PERFORM set_config('runwarden.depth_shard', '', true);
    SELECT shard INTO taken FROM runs_queuedepth WHERE tenant_id = p_tenant
        ORDER BY mod(shard + p_start, p_shards) LIMIT 1 FOR UPDATE SKIP LOCKED;
    IF FOUND THEN
        SELECT coalesce(sum(unfinished), 0) INTO depth FROM runs_queuedepth WHERE tenant_id = p_tenant;
        SELECT max_queue_depth INTO depth_limit FROM core_tenantquota WHERE tenant_id = p_tenant;
        IF depth <= coalesce(depth_limit, p_default_limit) - p_shards THEN
            PERFORM set_config('runwarden.depth_shard', taken::text, true);
            RETURN taken;
        END IF;
    END IF;
    IF p_raise THEN
        RAISE EXCEPTION 'the fast path of the queue-depth check does not apply' USING ERRCODE = 'RWQ01';
    END IF;
    RETURN NULL;
END
$$;
"""

UNPLACE_SQL = "DROP FUNCTION IF EXISTS runs_queue_place_fast(bigint, integer, integer, integer, boolean);"


def _on_postgresql(sql: str):  # type: ignore[no-untyped-def]
    def run(apps, schema_editor):  # type: ignore[no-untyped-def]
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql)

    return run


class Migration(migrations.Migration):
    dependencies = [
        ("runs", "0014_queue_depth_counters"),
    ]

    operations = [migrations.RunPython(_on_postgresql(PLACE_SQL), _on_postgresql(UNPLACE_SQL))]
