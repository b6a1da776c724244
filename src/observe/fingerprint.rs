//! Placeholder until the single-pass normaliser lands: statement classification only.

/// Kind of statement, for the `query_type` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QueryType {
    Select,
    Insert,
    Update,
    Delete,
    Other,
}

impl QueryType {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueryType::Select => "select",
            QueryType::Insert => "insert",
            QueryType::Update => "update",
            QueryType::Delete => "delete",
            QueryType::Other => "other",
        }
    }
}

/// Classifies by the first keyword.
pub fn query_type(sql: &str) -> QueryType {
    let s = sql.trim_start_matches(|c: char| c.is_whitespace() || c == '(');
    let w = s.get(..6).unwrap_or(s);
    if w.eq_ignore_ascii_case("select") {
        QueryType::Select
    } else if w.eq_ignore_ascii_case("insert") {
        QueryType::Insert
    } else if w.eq_ignore_ascii_case("update") {
        QueryType::Update
    } else if w.eq_ignore_ascii_case("delete") {
        QueryType::Delete
    } else {
        QueryType::Other
    }
}
