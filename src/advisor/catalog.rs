//! What the advisor reads from the catalog about a table: its size, its indexes, and per-column statistics.

use std::collections::HashMap;

use crate::error::Result;
use crate::protocol::quote_literal;
use crate::server::ServerConn;

/// Planner statistics of one column (pg_stats).
#[derive(Clone, Debug, Default)]
pub struct ColumnStats {
    /// pg_stats.n_distinct: positive = count, negative = fraction of rows.
    pub n_distinct: f64,
    pub mcv: Vec<String>,
    pub mcf: Vec<f64>,
}

/// A table as the advisor sees it.
#[derive(Clone, Debug, Default)]
pub struct TableInfo {
    pub reltuples: f64,
    /// Column names of each existing index, in index order.
    pub indexes: Vec<Vec<String>>,
    pub columns: HashMap<String, ColumnStats>,
}

impl TableInfo {
    /// Estimated fraction of rows with `column = value` (the value's own frequency when it is a common value).
    pub fn selectivity(&self, column: &str, value: Option<&str>) -> f64 {
        let Some(s) = self.columns.get(column) else { return 0.01 };
        if let Some(v) = value {
            if let Some(i) = s.mcv.iter().position(|m| m == v) {
                return s.mcf.get(i).copied().unwrap_or(0.0);
            }
        }
        let distinct = if s.n_distinct > 0.0 { s.n_distinct } else { -s.n_distinct * self.reltuples.max(1.0) };
        let rest = (1.0 - s.mcf.iter().sum::<f64>()).max(0.0);
        let others = (distinct - s.mcv.len() as f64).max(1.0);
        match value {
            // A value outside the common ones shares what they leave.
            Some(_) if !s.mcv.is_empty() => rest / others,
            _ => 1.0 / distinct.max(1.0),
        }
    }
}

/// Loads size, indexes and statistics of `table` (unqualified names resolve through search_path).
pub async fn load(conn: &mut ServerConn, table: &str) -> Result<TableInfo> {
    let t = quote_literal(table);
    let mut info = TableInfo::default();
    let rows = conn.query_column(&format!("SELECT reltuples FROM pg_class WHERE oid = to_regclass({t})")).await?;
    info.reltuples =
        rows.first().and_then(|r| r.first()).cloned().flatten().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let rows = conn
        .query_column(&format!(
            "SELECT array_to_string(array(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum ORDER BY k.ord), ',') \
             FROM pg_index i WHERE i.indrelid = to_regclass({t})"
        ))
        .await?;
    info.indexes = rows
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .map(|s| s.split(',').filter(|c| !c.is_empty()).map(str::to_string).collect())
        .collect();
    let rows = conn
        .query_column(&format!(
            "SELECT attname, n_distinct, most_common_vals::text, most_common_freqs::text FROM pg_stats \
             WHERE tablename = {t} AND schemaname = ANY (current_schemas(false))"
        ))
        .await?;
    for r in rows {
        let mut it = r.into_iter();
        let (Some(Some(name)), Some(nd)) = (it.next(), it.next()) else { continue };
        let n_distinct = nd.and_then(|v| v.parse().ok()).unwrap_or(0.0);
        let mcv = it.next().flatten().map(|v| parse_array(&v)).unwrap_or_default();
        let mcf = it
            .next()
            .flatten()
            .map(|v| parse_array(&v).iter().filter_map(|x| x.parse().ok()).collect())
            .unwrap_or_default();
        info.columns.insert(name, ColumnStats { n_distinct, mcv, mcf });
    }
    Ok(info)
}

/// Parses a PostgreSQL array literal `{a,"b c",NULL}` into its elements.
pub fn parse_array(s: &str) -> Vec<String> {
    let inner = s.trim().strip_prefix('{').and_then(|x| x.strip_suffix('}')).unwrap_or("");
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => quoted = !quoted,
            '\\' if quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if !inner.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_and_selectivity() {
        assert_eq!(parse_array("{open,\"a, b\",x}"), vec!["open", "a, b", "x"]);
        assert!(parse_array("{}").is_empty());
        let mut t = TableInfo { reltuples: 100_000.0, ..Default::default() };
        t.columns.insert(
            "status".into(),
            ColumnStats {
                n_distinct: 3.0,
                mcv: vec!["filled".into(), "cancelled".into(), "open".into()],
                mcf: vec![0.9, 0.08, 0.02],
            },
        );
        t.columns.insert("customer_id".into(), ColumnStats { n_distinct: -0.2, mcv: vec![], mcf: vec![] });
        assert!((t.selectivity("status", Some("filled")) - 0.9).abs() < 1e-9);
        assert!((t.selectivity("status", Some("open")) - 0.02).abs() < 1e-9);
        assert!(t.selectivity("customer_id", Some("42")) < 0.001);
    }
}
