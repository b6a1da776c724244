//! Reading EXPLAIN (FORMAT JSON) plans: red flags named by the node that shows them, and the predicates each scan
//! filters on (the raw material of index candidates).

use serde::Serialize;
use serde_json::Value;

/// A problem a plan shows.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RedFlag {
    pub kind: &'static str,
    /// The plan node, e.g. `Seq Scan on orders`.
    pub node: String,
    pub detail: String,
}

/// A comparison a scan filters on.
#[derive(Clone, Debug, PartialEq)]
pub struct Predicate {
    pub column: String,
    pub kind: PredKind,
    /// The constant compared against, as PostgreSQL printed it (without its cast), if any.
    pub value: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredKind {
    Equality,
    Range,
}

/// One scan of a table and what could drive an index on it.
#[derive(Clone, Debug, Default)]
pub struct ScanSite {
    pub relation: String,
    pub node: String,
    pub predicates: Vec<Predicate>,
    /// Columns of a Sort directly above this scan (through Limit/Gather), in order, with DESC noted.
    pub order_by: Vec<(String, bool)>,
    /// The scan reads the whole table (Seq Scan) rather than an index.
    pub sequential: bool,
}

/// Top node of an EXPLAIN (FORMAT JSON) result.
pub fn root(explain: &Value) -> Option<&Value> {
    explain.get(0)?.get("Plan")
}

/// Total cost of a plan.
pub fn total_cost(explain: &Value) -> Option<f64> {
    root(explain)?.get("Total Cost")?.as_f64()
}

fn node_name(n: &Value) -> String {
    let t = n.get("Node Type").and_then(Value::as_str).unwrap_or("?");
    match n.get("Relation Name").and_then(Value::as_str) {
        Some(r) => format!("{t} on {r}"),
        None => t.to_string(),
    }
}

fn num(n: &Value, k: &str) -> Option<f64> {
    n.get(k).and_then(Value::as_f64)
}

fn children(n: &Value) -> impl Iterator<Item = &Value> {
    n.get("Plans").and_then(Value::as_array).into_iter().flatten()
}

/// Walks every node, depth first.
pub fn walk<'a>(n: &'a Value, out: &mut Vec<&'a Value>) {
    out.push(n);
    for c in children(n) {
        walk(c, out);
    }
}

/// Red flags of a plan. `large_rows` is the table size from which a sequential scan is worth flagging.
pub fn red_flags(explain: &Value, reltuples: &dyn Fn(&str) -> f64) -> Vec<RedFlag> {
    let Some(top) = root(explain) else { return Vec::new() };
    let mut nodes = Vec::new();
    walk(top, &mut nodes);
    let mut flags = Vec::new();
    for n in nodes {
        let name = node_name(n);
        let t = n.get("Node Type").and_then(Value::as_str).unwrap_or("");
        let loops = num(n, "Actual Loops").unwrap_or(1.0).max(1.0);
        if t == "Seq Scan" {
            let rel = n.get("Relation Name").and_then(Value::as_str).unwrap_or("");
            let size = reltuples(rel);
            let removed = num(n, "Rows Removed by Filter");
            let kept = num(n, "Actual Rows").or(num(n, "Plan Rows")).unwrap_or(0.0);
            if n.get("Filter").is_some() && size >= 10_000.0 {
                let fraction_removed = match removed {
                    Some(r) if r + kept > 0.0 => r / (r + kept),
                    _ => 1.0 - (num(n, "Plan Rows").unwrap_or(size) / size.max(1.0)),
                };
                if fraction_removed >= 0.9 {
                    flags.push(RedFlag {
                        kind: "seq_scan_filter",
                        node: name.clone(),
                        detail: format!(
                            "reads all of {rel} (~{size:.0} rows) and discards {:.1}% of them",
                            fraction_removed * 100.0
                        ),
                    });
                }
            }
            if loops > 1.0 && size >= 1_000.0 {
                flags.push(RedFlag {
                    kind: "per_row_scan",
                    node: name.clone(),
                    detail: format!(
                        "a full scan of {rel} repeated {loops:.0} times: an index on the join column avoids it"
                    ),
                });
            }
        }
        if let (Some(actual), Some(plan)) = (num(n, "Actual Rows"), num(n, "Plan Rows")) {
            let (a, p) = (actual.max(1.0), plan.max(1.0));
            if a / p >= 10.0 || p / a >= 10.0 {
                flags.push(RedFlag {
                    kind: "misestimate",
                    node: name.clone(),
                    detail: format!("estimated {plan:.0} rows, got {actual:.0} (off by {:.0}x)", (a / p).max(p / a)),
                });
            }
        }
        if t == "Nested Loop" {
            if let Some(inner) = children(n).nth(1) {
                let l = num(inner, "Actual Loops").unwrap_or(0.0);
                if l >= 1000.0 {
                    flags.push(RedFlag {
                        kind: "nested_loop",
                        node: name.clone(),
                        detail: format!("inner side ({}) runs {l:.0} times", node_name(inner)),
                    });
                }
            }
        }
        if n.get("Sort Space Type").and_then(Value::as_str) == Some("Disk")
            || n.get("Sort Method").and_then(Value::as_str).is_some_and(|m| m.contains("external"))
        {
            flags.push(RedFlag {
                kind: "sort_spill",
                node: name.clone(),
                detail: "sort spilled to disk (work_mem too small)".into(),
            });
        }
        if num(n, "Hash Batches").unwrap_or(1.0) > 1.0 {
            flags.push(RedFlag {
                kind: "hash_spill",
                node: name.clone(),
                detail: format!("hash used {} batches (spilled to disk)", num(n, "Hash Batches").unwrap_or(0.0)),
            });
        }
        if num(n, "Lossy Heap Blocks").unwrap_or(0.0) > 0.0 {
            flags.push(RedFlag {
                kind: "lossy_bitmap",
                node: name.clone(),
                detail: format!("{} lossy heap blocks rechecked", num(n, "Lossy Heap Blocks").unwrap_or(0.0)),
            });
        }
        if t == "Sort" {
            if let Some(c) = children(n).next() {
                if c.get("Node Type").and_then(Value::as_str) == Some("Seq Scan") {
                    flags.push(RedFlag {
                        kind: "sort_after_scan",
                        node: name.clone(),
                        detail: format!(
                            "sorts the output of {}: an index in that order can return rows pre-sorted",
                            node_name(c)
                        ),
                    });
                }
            }
        }
    }
    flags
}

/// The scans of a plan with the predicates and ordering that could drive an index.
pub fn scan_sites(explain: &Value) -> Vec<ScanSite> {
    let Some(top) = root(explain) else { return Vec::new() };
    let mut out = Vec::new();
    collect_sites(top, &[], &mut out);
    out
}

fn collect_sites(n: &Value, order: &[(String, bool)], out: &mut Vec<ScanSite>) {
    let t = n.get("Node Type").and_then(Value::as_str).unwrap_or("");
    if let Some(rel) = n.get("Relation Name").and_then(Value::as_str) {
        let mut preds = Vec::new();
        for key in ["Filter", "Index Cond", "Recheck Cond", "Join Filter"] {
            if let Some(f) = n.get(key).and_then(Value::as_str) {
                preds.extend(predicates(f));
            }
        }
        out.push(ScanSite {
            relation: rel.to_string(),
            node: node_name(n),
            predicates: preds,
            order_by: order.to_vec(),
            sequential: t == "Seq Scan",
        });
    }
    // A Sort's keys apply to the scan below it when only order-preserving nodes (Limit, Gather) stand between.
    let below: Vec<(String, bool)> = match t {
        "Sort" | "Incremental Sort" => n
            .get("Sort Key")
            .and_then(Value::as_array)
            .map(|keys| keys.iter().filter_map(Value::as_str).filter_map(sort_key).collect())
            .unwrap_or_default(),
        "Limit" | "Gather" | "Gather Merge" | "Result" => order.to_vec(),
        _ => Vec::new(),
    };
    for c in children(n) {
        collect_sites(c, &below, out);
    }
}

fn sort_key(k: &str) -> Option<(String, bool)> {
    let desc = k.ends_with(" DESC");
    let col = k.trim_end_matches(" DESC").trim_end_matches(" NULLS FIRST").trim_end_matches(" NULLS LAST");
    column_name(col).map(|c| (c, desc))
}

/// Splits a PostgreSQL-printed condition into the simple comparisons of its top-level AND.
pub fn predicates(cond: &str) -> Vec<Predicate> {
    let inner = strip_parens(cond.trim());
    if has_top_level(inner, " OR ") {
        return Vec::new();
    }
    split_top_level(inner, " AND ").into_iter().filter_map(|c| comparison(strip_parens(c.trim()))).collect()
}

fn comparison(c: &str) -> Option<Predicate> {
    for (op, kind) in [
        (" = ANY ", PredKind::Equality),
        (" >= ", PredKind::Range),
        (" <= ", PredKind::Range),
        (" = ", PredKind::Equality),
        (" > ", PredKind::Range),
        (" < ", PredKind::Range),
    ] {
        if let Some(i) = find_top_level(c, op) {
            let (lhs, rhs) = (&c[..i], &c[i + op.len()..]);
            // Either side may be the column; the other must be a constant or a parameter.
            if let (Some(col), true) = (column_name(lhs), is_constant(rhs)) {
                return Some(Predicate { column: col, kind, value: constant_text(rhs) });
            }
            if let (Some(col), true) = (column_name(rhs), is_constant(lhs)) {
                return Some(Predicate { column: col, kind, value: constant_text(lhs) });
            }
            // col = other.col: a join key, useful on the inner side of a nested loop.
            if kind == PredKind::Equality {
                if let (Some(col), Some(_)) = (column_name(lhs), column_name(rhs)) {
                    return Some(Predicate { column: col, kind, value: None });
                }
            }
            return None;
        }
    }
    None
}

fn is_constant(s: &str) -> bool {
    let s = strip_parens(s.trim());
    s.starts_with('\'')
        || s.starts_with('$')
        || s.starts_with(|c: char| c.is_ascii_digit() || c == '-')
        || s.starts_with("ARRAY")
}

fn constant_text(s: &str) -> Option<String> {
    let s = strip_parens(s.trim());
    let s = s.split("::").next().unwrap_or(s);
    if let Some(q) = s.strip_prefix('\'') {
        return Some(q.trim_end_matches('\'').replace("''", "'"));
    }
    Some(s.to_string())
}

/// `(status)::text`, `o.customer_id`, `"Col"` → the bare column name; None for expressions.
fn column_name(s: &str) -> Option<String> {
    let mut s = strip_parens(s.trim());
    if let Some(i) = s.find("::") {
        s = strip_parens(&s[..i]);
    }
    let s = s.rsplit('.').next()?;
    let s = s.trim_matches('"');
    if s.is_empty()
        || !s.chars().all(|c| c.is_alphanumeric() || c == '_')
        || s.starts_with(|c: char| c.is_ascii_digit())
    {
        return None;
    }
    Some(s.to_string())
}

fn strip_parens(mut s: &str) -> &str {
    while s.starts_with('(') && s.ends_with(')') && matching_close(s) == Some(s.len() - 1) {
        s = s[1..s.len() - 1].trim();
    }
    s
}

fn matching_close(s: &str) -> Option<usize> {
    let mut depth = 0i32;
    let mut in_str = false;
    for (i, c) in s.char_indices() {
        match c {
            '\'' => in_str = !in_str,
            '(' if !in_str => depth += 1,
            ')' if !in_str => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn find_top_level(s: &str, pat: &str) -> Option<usize> {
    let mut depth = 0i32;
    let mut in_str = false;
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\'' => in_str = !in_str,
            b'(' if !in_str => depth += 1,
            b')' if !in_str => depth -= 1,
            _ if depth == 0 && !in_str && s[i..].starts_with(pat) => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

fn has_top_level(s: &str, pat: &str) -> bool {
    find_top_level(s, pat).is_some()
}

fn split_top_level<'a>(s: &'a str, pat: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = find_top_level(rest, pat) {
        out.push(&rest[..i]);
        rest = &rest[i + pat.len()..];
    }
    out.push(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_become_predicates() {
        let p = predicates("((customer_id = 42) AND ((status)::text = 'open'::text))");
        assert_eq!(
            p,
            vec![
                Predicate { column: "customer_id".into(), kind: PredKind::Equality, value: Some("42".into()) },
                Predicate { column: "status".into(), kind: PredKind::Equality, value: Some("open".into()) },
            ]
        );
        let p = predicates("(created_at > '2024-01-01 00:00:00+00'::timestamp with time zone)");
        assert_eq!(p[0].kind, PredKind::Range);
        assert!(predicates("((a = 1) OR (b = 2))").is_empty());
        assert!(predicates("((note)::text ~~ '%abc'::text)").is_empty());
        assert_eq!(predicates("(o.account_id = a.id)")[0].column, "account_id");
        assert_eq!(predicates("(symbol = ANY ('{A,B}'::text[]))")[0].kind, PredKind::Equality);
    }

    #[test]
    fn sites_carry_sort_keys_through_limit() {
        let plan: Value = serde_json::from_str(
            r#"[{"Plan":{"Node Type":"Limit","Total Cost":10.0,"Plans":[{"Node Type":"Sort","Sort Key":["ts DESC"],
            "Plans":[{"Node Type":"Seq Scan","Relation Name":"trades","Filter":"(account_id = 7)","Plan Rows":60}]}]}}]"#,
        )
        .unwrap();
        let s = scan_sites(&plan);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].order_by, vec![("ts".to_string(), true)]);
        assert_eq!(s[0].predicates[0].column, "account_id");
        let flags = red_flags(&plan, &|_| 300_000.0);
        assert!(flags.iter().any(|f| f.kind == "seq_scan_filter"), "{flags:?}");
        assert!(flags.iter().any(|f| f.kind == "sort_after_scan"), "{flags:?}");
    }
}
