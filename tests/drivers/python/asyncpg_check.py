#!/usr/bin/python3
"""asyncpg through pgrelay in transaction mode with asyncpg's defaults (every query is a named prepared statement,
statement cache on). A pool of 10 connections, 50 concurrent tasks. Connection parameters come from
PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE. Exits non-zero with a message on any mismatch or error."""
import asyncio
import os
import sys
import time

try:
    import asyncpg
except ImportError:
    sys.exit("asyncpg is missing: apt-get install -y python3-asyncpg (and run this with /usr/bin/python3)")

TASKS = 50
ITERS = int(os.environ.get("CHECK_ITERS", "40"))
failures = []


def fail(msg):
    failures.append(msg)
    print("FAIL:", msg, file=sys.stderr, flush=True)


async def setup():
    c = await asyncpg.connect()
    try:
        await c.execute("drop table if exists apg_counters, apg_items")
        await c.execute("create table apg_counters(id int primary key, n int not null)")
        await c.execute("insert into apg_counters select g, 0 from generate_series(0, $1::int) g", TASKS - 1)
        await c.execute("create table apg_items(task int, k int, v text, primary key (task, k))")
    finally:
        await c.close()


async def task(pool, tid):
    try:
        for i in range(1, ITERS + 1):
            async with pool.acquire() as con:
                async with con.transaction():
                    await con.execute("update apg_counters set n = n + $1 where id = $2", 1, tid)
                    n = await con.fetchval("select n from apg_counters where id = $1", tid)
                    if n != i:
                        fail(f"task {tid} iteration {i}: counter {n}, expected {i}")
                        return
                rows = await con.fetch("select g, g * $1::int as x from generate_series(1, $2::int) g", tid, i % 5 + 1)
                got = [(r["g"], r["x"]) for r in rows]
                want = [(g, g * tid) for g in range(1, i % 5 + 2)]
                if got != want:
                    fail(f"task {tid} iteration {i}: fetch {got}, expected {want}")
                    return
                row = await con.fetchrow("select $1::text || '-' || $2::int as s, $2::int + 1 as n", f"t{tid}", i)
                if (row["s"], row["n"]) != (f"t{tid}-{i}", i + 1):
                    fail(f"task {tid} iteration {i}: fetchrow {tuple(row)}")
                    return
        async with pool.acquire() as con:
            async with con.transaction():
                await con.executemany(
                    "insert into apg_items(task, k, v) values ($1, $2, $3)",
                    [(tid, k, f"v{tid}-{k}") for k in range(20)],
                )
            row = await con.fetchrow(
                "select count(*) as c, sum(k) as s, string_agg(v, ',' order by k) as a from apg_items where task = $1",
                tid,
            )
            want = (20, sum(range(20)), ",".join(f"v{tid}-{k}" for k in range(20)))
            if (row["c"], row["s"], row["a"]) != want:
                fail(f"task {tid}: executemany result {tuple(row)}, expected {want}")
        # A transaction that fails and rolls back leaves nothing behind and the connection usable.
        async with pool.acquire() as con:
            try:
                async with con.transaction():
                    await con.execute("update apg_counters set n = n + 1000 where id = $1", tid)
                    await con.fetchval("select 1 / $1::int", 0)
                fail(f"task {tid}: division by zero did not raise")
            except asyncpg.exceptions.DivisionByZeroError:
                pass
            n = await con.fetchval("select n from apg_counters where id = $1", tid)
            if n != ITERS:
                fail(f"task {tid}: counter {n} after a rolled-back transaction, expected {ITERS}")
    except Exception as e:  # noqa: BLE001 - every error is a failure to report
        fail(f"task {tid}: {type(e).__name__}: {e}")


async def main():
    t0 = time.time()
    await setup()
    pool = await asyncpg.create_pool(min_size=10, max_size=10)
    try:
        await asyncio.gather(*(task(pool, t) for t in range(TASKS)))
        async with pool.acquire() as con:
            got = await con.fetchrow("select count(*) as c, sum(n) as s, min(n) as lo, max(n) as hi from apg_counters")
            want = (TASKS, TASKS * ITERS, ITERS, ITERS)
            if tuple(got) != want:
                fail(f"final counters {tuple(got)}, expected {want}")
    finally:
        await pool.close()
    if failures:
        print(f"asyncpg_check: {len(failures)} failure(s)", file=sys.stderr)
        sys.exit(1)
    print(f"asyncpg_check: ok ({TASKS} tasks x {ITERS} iterations over a pool of 10, {time.time() - t0:.1f}s)")


if __name__ == "__main__":
    asyncio.run(main())
