#!/usr/bin/python3
"""psycopg 3 through pgrelay in transaction mode with prepare_threshold=0 (every statement is a named prepared
statement). Connection parameters come from PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE. Exits non-zero with a
message on any mismatch or error."""
import os
import sys
import threading
import time

try:
    import psycopg
except ImportError:
    sys.exit("psycopg 3 is missing: apt-get install -y python3-psycopg (and run this with /usr/bin/python3)")

THREADS = 10
ITERS = int(os.environ.get("CHECK_ITERS", "100"))
failures = []
lock = threading.Lock()


def fail(msg):
    with lock:
        failures.append(msg)
    print("FAIL:", msg, file=sys.stderr, flush=True)


def connect(**kw):
    # Empty conninfo: libpq takes everything from the PG* environment variables.
    return psycopg.connect("", prepare_threshold=0, **kw)


def setup():
    with connect(autocommit=True) as c:
        c.execute("drop table if exists py3_counters, py3_items, py3_ddl")
        c.execute("create table py3_counters(id int primary key, n int not null)")
        c.execute("insert into py3_counters select g, 0 from generate_series(0, %s) g", (THREADS - 1,))
        c.execute("create table py3_items(client int, k int, v text, primary key (client, k))")
        c.execute("create table py3_ddl(a int, b int)")
        c.execute("insert into py3_ddl values (1, 2)")


def worker(tid):
    try:
        with connect() as c:
            for i in range(1, ITERS + 1):
                with c.transaction():
                    c.execute("update py3_counters set n = n + %s where id = %s", (1, tid))
                    (n,) = c.execute("select n from py3_counters where id = %s", (tid,)).fetchone()
                    if n != i:
                        fail(f"thread {tid} iteration {i}: counter {n}, expected {i}")
                        return
                    (x,) = c.execute("select %s::int * 1000 + %s::int", (tid, i)).fetchone()
                    if x != tid * 1000 + i:
                        fail(f"thread {tid}: select arithmetic {x}, expected {tid * 1000 + i}")
                        return
                if i % 10 == 0:
                    # A rolled-back transaction. psycopg then forgets its prepared statements and sends
                    # DEALLOCATE ALL (extended protocol) before preparing them again.
                    c.execute("update py3_counters set n = n + 1000 where id = %s", (tid,))
                    c.rollback()
                    (n,) = c.execute("select n from py3_counters where id = %s", (tid,)).fetchone()
                    c.commit()
                    if n != i:
                        fail(f"thread {tid} iteration {i}: counter {n} after rollback, expected {i}")
                        return
                # The same statements outside an explicit transaction block (autocommit off: psycopg opens one).
                rows = c.execute("select g from generate_series(1, %s) g", (i % 7 + 1,)).fetchall()
                c.commit()
                if [r[0] for r in rows] != list(range(1, i % 7 + 2)):
                    fail(f"thread {tid}: generate_series rows {rows}")
                    return
            # executemany: a prepared insert with many parameter sets.
            with c.transaction():
                with c.cursor() as cur:
                    cur.executemany(
                        "insert into py3_items(client, k, v) values (%s, %s, %s)",
                        [(tid, k, f"v{tid}-{k}") for k in range(50)],
                    )
            got = c.execute(
                "select count(*), sum(k), string_agg(v, ',' order by k) from py3_items where client = %s", (tid,)
            ).fetchone()
            c.commit()
            want = (50, sum(range(50)), ",".join(f"v{tid}-{k}" for k in range(50)))
            if tuple(got) != want:
                fail(f"thread {tid}: executemany result {got}, expected {want}")
            # Warm the statement later invalidated by DDL on every server connection: the threads hold their
            # transactions long enough that all servers are in use at once.
            with c.transaction():
                row = c.execute("select * from py3_ddl").fetchone()
                if tuple(row) != (1, 2):
                    fail(f"thread {tid}: py3_ddl {row}")
                time.sleep(0.2)
    except Exception as e:  # noqa: BLE001 - every error is a failure to report
        fail(f"thread {tid}: {type(e).__name__}: {e}")


def many_distinct_statements():
    """More distinct statements than psycopg's prepared_max (100): psycopg evicts and DEALLOCATEs its own."""
    with connect(autocommit=True) as c:
        for rnd in range(2):
            for i in range(150):
                (v,) = c.execute(f"select {i}::int + %s::int as v", (rnd,)).fetchone()
                if v != i + rnd:
                    fail(f"distinct statement {i} round {rnd}: {v}, expected {i + rnd}")
                    return


def ddl_change():
    """ALTER TABLE changes the result type of a prepared `select *`: the error may come once, the retry must work."""
    with connect(autocommit=True) as c:
        row = c.execute("select * from py3_ddl").fetchone()
        if tuple(row) != (1, 2):
            fail(f"ddl: before alter {row}")
        c.execute("alter table py3_ddl add column c int default 3")
        last = None
        for attempt in (1, 2):
            try:
                row = c.execute("select * from py3_ddl").fetchone()
                if tuple(row) != (1, 2, 3):
                    fail(f"ddl: after alter {row}, expected (1, 2, 3)")
                return attempt
            except psycopg.errors.FeatureNotSupported as e:
                last = e
                print(f"ddl: attempt {attempt} failed: {e}", file=sys.stderr)
        fail(f"ddl: 'cached plan must not change result type' stuck after a retry: {last}")
    # A brand-new connection preparing the same text for the first time must never see the stale plan.
    with connect(autocommit=True) as c:
        for i in range(8):
            try:
                row = c.execute("select * from py3_ddl").fetchone()
                if tuple(row) != (1, 2, 3):
                    fail(f"ddl: fresh connection got {row}")
            except psycopg.Error as e:
                fail(f"ddl: fresh connection execution {i}: {type(e).__name__}: {e}")
                return


def main():
    t0 = time.time()
    setup()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with connect(autocommit=True) as c:
        got = c.execute("select count(*), sum(n), min(n), max(n) from py3_counters").fetchone()
        if tuple(got) != (THREADS, THREADS * ITERS, ITERS, ITERS):
            fail(f"final counters {got}, expected {(THREADS, THREADS * ITERS, ITERS, ITERS)}")
    for phase in (many_distinct_statements, ddl_change):
        try:
            phase()
        except Exception as e:  # noqa: BLE001 - report and go on with the next phase
            fail(f"{phase.__name__}: {type(e).__name__}: {e}")
    if failures:
        print(f"psycopg3_check: {len(failures)} failure(s)", file=sys.stderr)
        sys.exit(1)
    print(f"psycopg3_check: ok ({THREADS} threads x {ITERS} transactions, {time.time() - t0:.1f}s)")


if __name__ == "__main__":
    main()
