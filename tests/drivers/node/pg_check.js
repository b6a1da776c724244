// node-postgres named queries ({name, text, values}) through pgrelay in transaction mode from 10 concurrent
// clients. Connection parameters come from PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE (pg reads them itself).
// Exits non-zero with a message on any mismatch or error.
'use strict';

let pg;
try {
  pg = require('pg');
} catch (e) {
  console.error('node module pg is missing: run `npm ci` in tests/drivers/node (' + e.message + ')');
  process.exit(2);
}

const CLIENTS = 10;
const ITERS = parseInt(process.env.CHECK_ITERS || '100', 10);
const failures = [];

function fail(msg) {
  failures.push(msg);
  console.error('FAIL: ' + msg);
}

async function setup() {
  const c = new pg.Client();
  await c.connect();
  try {
    await c.query('drop table if exists node_counters, node_items');
    await c.query('create table node_counters(id int primary key, n int not null)');
    await c.query({ text: 'insert into node_counters select g, 0 from generate_series(0, $1::int) g', values: [CLIENTS - 1] });
    await c.query('create table node_items(client int, k int, v text, primary key (client, k))');
  } finally {
    await c.end();
  }
}

async function worker(id) {
  const c = new pg.Client();
  await c.connect();
  try {
    for (let i = 1; i <= ITERS; i++) {
      await c.query('BEGIN');
      const inc = await c.query({
        name: 'inc',
        text: 'update node_counters set n = n + $1 where id = $2 returning n',
        values: [1, id],
      });
      if (inc.rows.length !== 1 || inc.rows[0].n !== i) {
        fail(`client ${id} iteration ${i}: counter ${JSON.stringify(inc.rows)}, expected ${i}`);
        await c.query('ROLLBACK');
        return;
      }
      const ins = await c.query({
        name: 'ins',
        text: 'insert into node_items(client, k, v) values ($1, $2, $3) returning k',
        values: [id, i, `v${id}-${i}`],
      });
      if (ins.rowCount !== 1 || ins.rows[0].k !== i) {
        fail(`client ${id} iteration ${i}: insert returned ${JSON.stringify(ins.rows)}`);
      }
      await c.query('COMMIT');
      // The same named statements outside a transaction block (autocommit), possibly on another server.
      const sel = await c.query({ name: 'sel', text: 'select $1::int * 2 as x, $2::text as t', values: [i, `c${id}`] });
      if (sel.rows[0].x !== i * 2 || sel.rows[0].t !== `c${id}`) {
        fail(`client ${id} iteration ${i}: sel ${JSON.stringify(sel.rows)}`);
        return;
      }
      const series = await c.query({
        name: 'series',
        text: 'select g from generate_series(1, $1::int) g',
        values: [(i % 6) + 1],
      });
      const got = series.rows.map((r) => r.g).join(',');
      const want = Array.from({ length: (i % 6) + 1 }, (_, k) => k + 1).join(',');
      if (got !== want) {
        fail(`client ${id} iteration ${i}: series ${got}, expected ${want}`);
        return;
      }
    }
    const sum = await c.query({
      name: 'sum',
      text: 'select count(*)::int as c, sum(k)::int as s from node_items where client = $1',
      values: [id],
    });
    const wantSum = (ITERS * (ITERS + 1)) / 2;
    if (sum.rows[0].c !== ITERS || sum.rows[0].s !== wantSum) {
      fail(`client ${id}: items ${JSON.stringify(sum.rows[0])}, expected c=${ITERS} s=${wantSum}`);
    }
    // A failing named query inside a transaction, then the same names keep working after ROLLBACK.
    await c.query('BEGIN');
    try {
      await c.query({ name: 'div', text: 'select 1 / $1::int as x', values: [0] });
      fail(`client ${id}: division by zero did not raise`);
    } catch (e) {
      if (e.code !== '22012') fail(`client ${id}: expected 22012, got ${e.code} ${e.message}`);
    }
    await c.query('ROLLBACK');
    const div = await c.query({ name: 'div', text: 'select 1 / $1::int as x', values: [1] });
    if (div.rows[0].x !== 1) fail(`client ${id}: div after rollback ${JSON.stringify(div.rows)}`);
  } catch (e) {
    fail(`client ${id}: ${e.code || ''} ${e.message}`);
  } finally {
    await c.end().catch(() => {});
  }
}

async function main() {
  const t0 = Date.now();
  await setup();
  await Promise.all(Array.from({ length: CLIENTS }, (_, id) => worker(id)));
  const c = new pg.Client();
  await c.connect();
  const r = await c.query('select count(*)::int as c, sum(n)::int as s, min(n) as lo, max(n) as hi from node_counters');
  await c.end();
  const row = r.rows[0];
  if (row.c !== CLIENTS || row.s !== CLIENTS * ITERS || row.lo !== ITERS || row.hi !== ITERS) {
    fail(`final counters ${JSON.stringify(row)}, expected c=${CLIENTS} s=${CLIENTS * ITERS} lo=hi=${ITERS}`);
  }
  if (failures.length) {
    console.error(`pg_check: ${failures.length} failure(s)`);
    process.exit(1);
  }
  console.log(`pg_check: ok (${CLIENTS} clients x ${ITERS} iterations, ${((Date.now() - t0) / 1000).toFixed(1)}s)`);
}

main().catch((e) => {
  console.error('pg_check: ' + (e.stack || e));
  process.exit(1);
});
