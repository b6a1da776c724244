//! Query advisor: EXPLAINs captured slow queries with their real parameters on its own connection, names plan red
//! flags, derives index candidates from the plan's predicates and ordering, and keeps only those HypoPG proves
//! worthwhile. Reached from `pgrelay advise` and `GET /api/advice`, never from the relay path.

pub mod catalog;
pub mod plan;
pub mod run;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::observe::slow::SlowQuery;
use crate::protocol::quote_literal;
use crate::server::ServerConn;
use catalog::TableInfo;
use plan::{PredKind, RedFlag};

/// A recommendation must cut the planner's estimated cost at least this much (after/before).
pub const MAX_COST_RATIO: f64 = 0.5;
/// Tables smaller than this are left alone: a sequential scan of them is cheap.
pub const MIN_TABLE_ROWS: f64 = 10_000.0;
/// Equality columns matching more than this fraction of rows are not worth indexing for that value.
pub const MAX_SELECTIVITY: f64 = 0.2;

/// Slow queries of one fingerprint.
#[derive(Clone, Debug)]
pub struct Group {
    pub fingerprint: u64,
    pub database: String,
    pub normalized: String,
    pub calls: u64,
    pub total_ms: f64,
    pub samples: Vec<SlowQuery>,
}

/// Groups captured slow queries by fingerprint; `stats` (fingerprint → calls, total ms) overrides the counts the
/// slow records alone give, when the proxy's per-fingerprint table is available.
pub fn group(samples: Vec<SlowQuery>, stats: &HashMap<u64, (u64, f64)>) -> Vec<Group> {
    let mut groups: BTreeMap<u64, Group> = BTreeMap::new();
    for s in samples {
        let g = groups.entry(s.fingerprint).or_insert_with(|| Group {
            fingerprint: s.fingerprint,
            database: s.database.clone(),
            normalized: s.normalized.clone(),
            calls: 0,
            total_ms: 0.0,
            samples: Vec::new(),
        });
        g.calls += 1;
        g.total_ms += s.duration_ms;
        g.samples.push(s);
    }
    let mut v: Vec<Group> = groups.into_values().collect();
    for g in &mut v {
        if let Some((calls, total)) = stats.get(&g.fingerprint) {
            g.calls = (*calls).max(g.calls);
            g.total_ms = total.max(g.total_ms);
        }
    }
    v
}

/// One index worth creating.
#[derive(Clone, Debug, Serialize)]
pub struct Recommendation {
    pub table: String,
    pub columns: Vec<String>,
    pub create: String,
    pub cost_before: f64,
    pub cost_after: Option<f64>,
    pub size_bytes: Option<u64>,
    /// Checked with a hypothetical index (HypoPG); false when HypoPG was not available.
    pub verified: bool,
    #[serde(serialize_with = "hex_list")]
    pub fingerprints: Vec<u64>,
    /// calls × mean time × fraction of cost saved: the ranking key.
    pub benefit: f64,
}

/// What the advisor found about one fingerprint.
#[derive(Clone, Debug, Serialize)]
pub struct QueryAdvice {
    #[serde(serialize_with = "hex")]
    pub fingerprint: u64,
    pub database: String,
    pub query: String,
    pub calls: u64,
    pub mean_ms: f64,
    pub red_flags: Vec<RedFlag>,
    pub cost: Option<f64>,
    pub indexes: Vec<String>,
    pub note: Option<String>,
}

/// The whole advice.
#[derive(Clone, Debug, Serialize, Default)]
pub struct Report {
    pub hypopg: bool,
    pub recommendations: Vec<Recommendation>,
    pub queries: Vec<QueryAdvice>,
}

fn hex<S: serde::Serializer>(v: &u64, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:016x}"))
}

fn hex_list<S: serde::Serializer>(v: &[u64], s: S) -> std::result::Result<S::Ok, S::Error> {
    use serde::ser::SerializeSeq;
    let mut seq = s.serialize_seq(Some(v.len()))?;
    for x in v {
        seq.serialize_element(&format!("{x:016x}"))?;
    }
    seq.end()
}

/// A database connection for the advisor (simple-protocol queries returning text).
pub struct Db {
    pub conn: ServerConn,
    tables: HashMap<String, TableInfo>,
    hypopg: Option<bool>,
}

impl Db {
    /// Wraps a fresh connection and puts a statement timeout on it.
    pub async fn new(mut conn: ServerConn) -> Result<Db> {
        conn.execute("SET statement_timeout = '10s'; SET plan_cache_mode = force_custom_plan; SET application_name = 'pgrelay-advisor'")
            .await?;
        Ok(Db { conn, tables: HashMap::new(), hypopg: None })
    }

    async fn one(&mut self, sql: &str) -> Result<Option<String>> {
        Ok(self.conn.query_column(sql).await?.into_iter().next().and_then(|r| r.into_iter().next()).flatten())
    }

    async fn explain(&mut self, stmt: &str, analyze: bool) -> Result<Value> {
        let opts = if analyze { "ANALYZE, BUFFERS, FORMAT JSON" } else { "FORMAT JSON" };
        let text = if analyze {
            // Executed for real, so only SELECTs, in a read-only transaction that is rolled back.
            self.conn.execute("BEGIN READ ONLY").await?;
            let r = self.one(&format!("EXPLAIN ({opts}) {stmt}")).await;
            let _ = self.conn.execute("ROLLBACK").await;
            r?
        } else {
            self.one(&format!("EXPLAIN ({opts}) {stmt}")).await?
        };
        let text = text.ok_or_else(|| Error::Internal("EXPLAIN returned nothing".into()))?;
        serde_json::from_str(&text).map_err(|e| Error::Internal(format!("EXPLAIN output: {e}")))
    }

    async fn has_hypopg(&mut self) -> bool {
        if let Some(h) = self.hypopg {
            return h;
        }
        let ok = self.conn.execute("CREATE EXTENSION IF NOT EXISTS hypopg").await.is_ok()
            && self.one("SELECT count(*) FROM pg_extension WHERE extname = 'hypopg'").await.ok().flatten().as_deref()
                == Some("1");
        self.hypopg = Some(ok);
        ok
    }

    async fn table(&mut self, name: &str) -> Result<TableInfo> {
        if let Some(t) = self.tables.get(name) {
            return Ok(t.clone());
        }
        let t = catalog::load(&mut self.conn, name).await?;
        self.tables.insert(name.to_string(), t.clone());
        Ok(t)
    }
}

/// One candidate index before verification.
#[derive(Clone, Debug, PartialEq)]
struct Candidate {
    table: String,
    columns: Vec<(String, bool)>,
}

impl Candidate {
    fn ddl(&self, concurrently: bool) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .map(|(c, desc)| format!("{}{}", crate::protocol::quote_ident(c), if *desc { " DESC" } else { "" }))
            .collect();
        let name: String =
            format!("idx_{}_{}", self.table, self.columns.iter().map(|c| c.0.as_str()).collect::<Vec<_>>().join("_"))
                .chars()
                .take(63)
                .collect();
        format!(
            "CREATE INDEX {}{} ON {} ({})",
            if concurrently { "CONCURRENTLY " } else { "" },
            crate::protocol::quote_ident(&name),
            crate::protocol::quote_ident(&self.table),
            cols.join(", ")
        )
    }
}

/// The statement the advisor explains for a sample: the query with its captured parameters bound by PREPARE/EXECUTE.
fn prepared_statement(sample: &SlowQuery) -> Option<(Option<String>, String)> {
    let q = sample.query.trim().trim_end_matches(';');
    if q.is_empty() {
        return None;
    }
    if sample.params.is_empty() {
        return Some((None, q.to_string()));
    }
    let mut args = Vec::new();
    for p in &sample.params {
        match p {
            None => args.push("NULL".to_string()),
            // A binary value the proxy could not decode cannot be replayed as text.
            Some(v) if v.starts_with("\\x") => return None,
            Some(v) => args.push(quote_literal(v)),
        }
    }
    Some((Some(format!("PREPARE pgrelay_advise AS {q}")), format!("EXECUTE pgrelay_advise({})", args.join(", "))))
}

/// Advises on every group, using `db` for each group's database.
pub async fn advise(groups: Vec<Group>, dbs: &mut HashMap<String, Db>) -> Report {
    let mut report = Report::default();
    let mut recs: Vec<Recommendation> = Vec::new();
    for g in groups {
        let mean_ms = if g.calls > 0 { g.total_ms / g.calls as f64 } else { 0.0 };
        let mut qa = QueryAdvice {
            fingerprint: g.fingerprint,
            database: g.database.clone(),
            query: g.normalized.clone(),
            calls: g.calls,
            mean_ms,
            red_flags: Vec::new(),
            cost: None,
            indexes: Vec::new(),
            note: None,
        };
        let Some(db) = dbs.get_mut(&g.database) else {
            qa.note = Some(format!("no connection to database {}", g.database));
            report.queries.push(qa);
            continue;
        };
        match advise_one(db, &g, mean_ms, &mut qa).await {
            Ok(found) => {
                for r in found {
                    qa.indexes.push(r.create.clone());
                    match recs.iter_mut().find(|x| x.table == r.table && x.columns == r.columns) {
                        Some(x) => {
                            x.fingerprints.extend(r.fingerprints);
                            x.benefit += r.benefit;
                        }
                        None => recs.push(r),
                    }
                }
            }
            Err(e) => qa.note = Some(format!("could not explain: {e}")),
        }
        report.hypopg |= db.hypopg == Some(true);
        report.queries.push(qa);
    }
    // Consolidate: an index whose columns lead another recommendation on the same table is served by that one.
    let all = recs.clone();
    recs.retain(|r| {
        !all.iter()
            .any(|o| o.table == r.table && o.columns.len() > r.columns.len() && o.columns.starts_with(&r.columns))
    });
    recs.sort_by(|a, b| b.benefit.total_cmp(&a.benefit));
    report.recommendations = recs;
    report
}

async fn advise_one(db: &mut Db, g: &Group, mean_ms: f64, qa: &mut QueryAdvice) -> Result<Vec<Recommendation>> {
    // The slowest sample whose parameters can be replayed.
    let mut samples: Vec<&SlowQuery> = g.samples.iter().collect();
    samples.sort_by(|a, b| b.duration_ms.total_cmp(&a.duration_ms));
    let Some((sample, (prepare, stmt))) = samples.iter().find_map(|s| prepared_statement(s).map(|p| (*s, p))) else {
        qa.note = Some("no sample with replayable text and parameters (redacted or binary)".into());
        return Ok(Vec::new());
    };
    let is_select = crate::observe::fingerprint::query_type(&sample.query) == crate::observe::QueryType::Select;
    if let Some(p) = &prepare {
        let _ = db.conn.execute("DEALLOCATE ALL").await;
        db.conn.execute(p).await?;
    }
    let result = async {
        let base = db.explain(&stmt, false).await?;
        let cost_before = plan::total_cost(&base).unwrap_or(0.0);
        qa.cost = Some(cost_before);
        let analyzed = if is_select { db.explain(&stmt, true).await.ok() } else { None };
        let flag_plan = analyzed.as_ref().unwrap_or(&base);
        let mut sizes = HashMap::new();
        for site in plan::scan_sites(flag_plan) {
            if let Ok(t) = db.table(&site.relation).await {
                sizes.insert(site.relation.clone(), t.reltuples);
            }
        }
        qa.red_flags = plan::red_flags(flag_plan, &|rel| sizes.get(rel).copied().unwrap_or(0.0));
        let mut candidates = Vec::new();
        for site in plan::scan_sites(&base) {
            let t = db.table(&site.relation).await?;
            if let Some(c) = candidate(&site, &t) {
                if !candidates.contains(&c) {
                    candidates.push(c);
                }
            }
        }
        let mut found = Vec::new();
        let hypopg = db.has_hypopg().await;
        for c in candidates {
            let mut rec = Recommendation {
                table: c.table.clone(),
                columns: c.columns.iter().map(|x| x.0.clone()).collect(),
                create: c.ddl(true),
                cost_before,
                cost_after: None,
                size_bytes: None,
                verified: false,
                fingerprints: vec![g.fingerprint],
                benefit: g.calls as f64 * mean_ms,
            };
            if hypopg {
                let row = db
                    .conn
                    .query_column(&format!(
                        "SELECT indexrelid, indexname FROM hypopg_create_index({})",
                        quote_literal(&c.ddl(false))
                    ))
                    .await?;
                let (oid, name) = match row.first() {
                    Some(r) => (
                        r.first().cloned().flatten().unwrap_or_default(),
                        r.get(1).cloned().flatten().unwrap_or_default(),
                    ),
                    None => continue,
                };
                let after = db.explain(&stmt, false).await;
                let size = db.one(&format!("SELECT hypopg_relation_size({oid})")).await.ok().flatten();
                let _ = db.conn.execute("SELECT hypopg_reset()").await;
                let after = after?;
                let uses = after.to_string().contains(&name);
                let cost_after = plan::total_cost(&after).unwrap_or(cost_before);
                if !uses || cost_before <= 0.0 || cost_after > cost_before * MAX_COST_RATIO {
                    continue;
                }
                rec.cost_after = Some(cost_after);
                rec.size_bytes = size.and_then(|s| s.parse().ok());
                rec.verified = true;
                rec.benefit *= 1.0 - cost_after / cost_before;
            }
            found.push(rec);
        }
        Ok(found)
    }
    .await;
    if prepare.is_some() {
        let _ = db.conn.execute("DEALLOCATE pgrelay_advise").await;
    }
    result
}

/// The index a scan would want: selective equality columns first, then one range column, then the ORDER BY columns;
/// at most three; none for small tables or when an existing index already leads with those columns.
fn candidate(site: &plan::ScanSite, t: &TableInfo) -> Option<Candidate> {
    if t.reltuples < MIN_TABLE_ROWS {
        return None;
    }
    let mut eq: Vec<(String, f64)> = Vec::new();
    for p in site.predicates.iter().filter(|p| p.kind == PredKind::Equality) {
        let sel = t.selectivity(&p.column, p.value.as_deref());
        if sel <= MAX_SELECTIVITY && !eq.iter().any(|(c, _)| c == &p.column) {
            eq.push((p.column.clone(), sel));
        }
    }
    eq.sort_by(|a, b| a.1.total_cmp(&b.1));
    let mut cols: Vec<(String, bool)> = eq.into_iter().map(|(c, _)| (c, false)).collect();
    if let Some(r) = site.predicates.iter().find(|p| p.kind == PredKind::Range && !cols.iter().any(|c| c.0 == p.column))
    {
        cols.push((r.column.clone(), false));
    }
    for (c, desc) in &site.order_by {
        if !cols.iter().any(|x| &x.0 == c) {
            cols.push((c.clone(), *desc));
        }
    }
    cols.truncate(3);
    if cols.is_empty() {
        return None;
    }
    let names: Vec<&str> = cols.iter().map(|c| c.0.as_str()).collect();
    if t.indexes.iter().any(|ix| ix.len() >= names.len() && ix.iter().zip(&names).all(|(a, b)| a == b)) {
        return None;
    }
    Some(Candidate { table: site.relation.clone(), columns: cols })
}

/// The human-readable report.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pgrelay advise: {} index recommendation(s){}",
        report.recommendations.len(),
        if report.hypopg {
            ", each checked with a hypothetical index (HypoPG)"
        } else {
            "; HypoPG is not available, so these are UNVERIFIED (apt-get install postgresql-15-hypopg)"
        }
    );
    for (i, r) in report.recommendations.iter().enumerate() {
        let _ = writeln!(out, "\n{}. {};", i + 1, r.create);
        match (r.cost_after, r.size_bytes) {
            (Some(after), size) => {
                let _ = writeln!(
                    out,
                    "   estimated cost {:.1} -> {:.1} ({:.1}% less){}",
                    r.cost_before,
                    after,
                    100.0 * (1.0 - after / r.cost_before.max(f64::MIN_POSITIVE)),
                    size.map(|s| format!(", estimated size {:.1} MB", s as f64 / 1e6)).unwrap_or_default()
                );
            }
            (None, _) => {
                let _ = writeln!(out, "   unverified (cost before {:.1})", r.cost_before);
            }
        }
        for fp in &r.fingerprints {
            if let Some(q) = report.queries.iter().find(|q| q.fingerprint == *fp) {
                let _ = writeln!(out, "   for {fp:016x} ({} calls, mean {:.2} ms): {}", q.calls, q.mean_ms, q.query);
            }
        }
    }
    let flagged: Vec<&QueryAdvice> =
        report.queries.iter().filter(|q| !q.red_flags.is_empty() || q.note.is_some()).collect();
    if !flagged.is_empty() {
        let _ = writeln!(out, "\nPlan findings:");
        for q in flagged {
            let _ = writeln!(out, "  {:016x} {}", q.fingerprint, q.query);
            for f in &q.red_flags {
                let _ = writeln!(out, "    - {} at {}: {}", f.kind, f.node, f.detail);
            }
            if let Some(n) = &q.note {
                let _ = writeln!(out, "    - note: {n}");
            }
        }
    }
    out
}
