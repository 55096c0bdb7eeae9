//! The store's one way to SQL, whichever database holds it: SQLite (one appliance) or
//! PostgreSQL (several appliances sharing it).
//!
//! Every query is written once, with SQLite's `?N` placeholders; [`Dialect`] supplies the
//! few fragments the two spell differently (JSON, case-insensitive matching, an unbounded
//! `LIMIT`). Values cross as [`Value`]: integers, text and NULL are all the schema holds
//! (booleans are 0/1 integers in both), so a row reads the same from either.
//!
//! PostgreSQL checks a parameter's Rust type against the column's SQL type; [`Value`] is
//! converted to what the prepared statement asks for instead (an `int4` column gets an
//! `i32`), so a query need not cast its parameters.

use std::collections::HashMap;
use std::mem::ManuallyDrop;

use postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};

/// A value bound to a query or read from a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "NULL",
            Value::Int(_) => "an integer",
            Value::Text(_) => "text",
        }
    }
}

macro_rules! int_value {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::Int(i64::from(v))
            }
        }
    )*};
}
int_value!(i64, i32, u32, u16, u8, bool);

impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}

impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Text(v.clone())
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// `[Value]` from a list of anything [`Value`] comes from.
macro_rules! args {
    ($($v:expr),* $(,)?) => {
        [$($crate::store::sql::Value::from($v)),*]
    };
}
pub(crate) use args;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("SQLite")]
    Sqlite(#[from] rusqlite::Error),
    #[error("PostgreSQL")]
    Postgres(#[from] postgres::Error),
    #[error("no PostgreSQL connection could be had")]
    Pool(#[from] r2d2::Error),
    #[error("column {column} holds {found}, not {expected}")]
    Type {
        column: usize,
        expected: &'static str,
        found: &'static str,
    },
    #[error("PostgreSQL sent a value of type {0}, which the store does not keep")]
    PgType(String),
    #[error("the query returned no row")]
    NoRow,
}

/// One row of a result.
#[derive(Debug, Clone)]
pub struct Row(Vec<Value>);

impl Row {
    /// Column `i` as it came (NULL past the last).
    pub fn value(&self, i: usize) -> Value {
        self.0.get(i).cloned().unwrap_or(Value::Null)
    }

    /// Column `i` as a `T`; a wrong type is an error naming the column, never a panic.
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T, DbError> {
        let v = self.0.get(i).unwrap_or(&Value::Null);
        T::from_value(v).ok_or(DbError::Type {
            column: i,
            expected: T::EXPECTED,
            found: v.kind(),
        })
    }
}

/// What a column can be read as.
pub trait FromValue: Sized {
    const EXPECTED: &'static str;
    fn from_value(v: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    const EXPECTED: &'static str = "an integer";
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

impl FromValue for u16 {
    const EXPECTED: &'static str = "a 16-bit integer";
    fn from_value(v: &Value) -> Option<Self> {
        i64::from_value(v).and_then(|i| u16::try_from(i).ok())
    }
}

impl FromValue for bool {
    const EXPECTED: &'static str = "0 or 1";
    fn from_value(v: &Value) -> Option<Self> {
        i64::from_value(v).map(|i| i != 0)
    }
}

impl FromValue for String {
    const EXPECTED: &'static str = "text";
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    const EXPECTED: &'static str = T::EXPECTED;
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// The fragments SQLite and PostgreSQL spell differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// The text at `key` of the JSON object in `column`.
    pub fn json_text(self, column: &str, key: &str) -> String {
        match self {
            Dialect::Sqlite => format!("json_extract({column}, '$.{key}')"),
            Dialect::Postgres => format!("({column}::jsonb ->> '{key}')"),
        }
    }

    /// Whether the JSON array of strings in `column` holds the parameter `param` (`?N`).
    pub fn json_array_has(self, column: &str, param: &str) -> String {
        match self {
            Dialect::Sqlite => {
                format!("EXISTS (SELECT 1 FROM json_each({column}) WHERE value = {param})")
            }
            Dialect::Postgres => format!(
                "EXISTS (SELECT 1 FROM jsonb_array_elements_text({column}::jsonb) AS e(value) \
                 WHERE value = {param})"
            ),
        }
    }

    /// `LIKE` that ignores ASCII case (SQLite's `LIKE` does; PostgreSQL's does not).
    pub fn like_nocase(self) -> &'static str {
        match self {
            Dialect::Sqlite => "LIKE",
            Dialect::Postgres => "ILIKE",
        }
    }

    /// `column` as a sort key that ignores case (the index PostgreSQL's schema has is on
    /// `lower(hostname)`).
    pub fn nocase(self, column: &str) -> String {
        match self {
            Dialect::Sqlite => format!("{column} COLLATE NOCASE"),
            Dialect::Postgres => format!("lower({column})"),
        }
    }

    /// What puts NULLs where SQLite does (first going up, last going down) after an
    /// `ORDER BY` key; PostgreSQL's default is the other way.
    pub fn nulls_as_sqlite(self, descending: bool) -> &'static str {
        match (self, descending) {
            (Dialect::Sqlite, _) => "",
            (Dialect::Postgres, false) => " NULLS FIRST",
            (Dialect::Postgres, true) => " NULLS LAST",
        }
    }

    /// The order rows of `interfaces` were inserted in.
    pub fn insertion_order(self) -> &'static str {
        match self {
            Dialect::Sqlite => "rowid",
            Dialect::Postgres => "seq",
        }
    }

    /// The value of a `LIMIT ?N` of `n` rows, or of all of them.
    pub fn limit(self, n: Option<i64>) -> Value {
        match (n, self) {
            (Some(n), _) => Value::Int(n),
            (None, Dialect::Sqlite) => Value::Int(-1),
            (None, Dialect::Postgres) => Value::Null,
        }
    }
}

/// A connection, or a transaction open on one: what every store query runs on.
pub trait Sql {
    fn dialect(&self) -> Dialect;
    /// Runs a statement; the number of rows it changed.
    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, DbError>;
    /// Runs a query; all its rows.
    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DbError>;

    /// The first row, if any.
    fn query_opt(&mut self, sql: &str, args: &[Value]) -> Result<Option<Row>, DbError> {
        Ok(self.query(sql, args)?.into_iter().next())
    }

    /// The first row, which must be there.
    fn query_one(&mut self, sql: &str, args: &[Value]) -> Result<Row, DbError> {
        self.query_opt(sql, args)?.ok_or(DbError::NoRow)
    }
}

// ---- SQLite ----

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(match self {
            Value::Null => ToSqlOutput::Borrowed(ValueRef::Null),
            Value::Int(i) => ToSqlOutput::Borrowed(ValueRef::Integer(*i)),
            Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        })
    }
}

/// A SQLite connection (a transaction derefs to one), its statements cached by rusqlite.
pub struct Lite<'a>(pub &'a rusqlite::Connection);

impl Sql for Lite<'_> {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, DbError> {
        let n = self
            .0
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(args))?;
        Ok(n as u64)
    }

    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DbError> {
        use rusqlite::types::ValueRef;
        let mut stmt = self.0.prepare_cached(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut row = Vec::with_capacity(columns);
            for i in 0..columns {
                row.push(match r.get_ref(i)? {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(n) => Value::Int(n),
                    // The schema has no real columns; JSON functions may still answer one.
                    ValueRef::Real(f) => Value::Int(f as i64),
                    ValueRef::Text(t) | ValueRef::Blob(t) => {
                        Value::Text(String::from_utf8_lossy(t).into_owned())
                    }
                });
            }
            out.push(Row(row));
        }
        Ok(out)
    }
}

// ---- PostgreSQL ----

impl ToSql for Value {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut postgres::types::private::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                _ => i.to_string().as_str().to_sql(ty, out),
            },
            Value::Text(s) => match *ty {
                Type::INT8 => s.parse::<i64>()?.to_sql(ty, out),
                Type::INT4 => s.parse::<i32>()?.to_sql(ty, out),
                // PostgreSQL's text cannot hold NUL; SQLite's can. What a host sent is kept
                // with the NULs marked rather than refused (an event must not be lost).
                _ if s.contains('\0') => s.replace('\0', "\u{FFFD}").as_str().to_sql(ty, out),
                _ => s.as_str().to_sql(ty, out),
            },
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A column's value as PostgreSQL sent it.
struct PgValue(Value);

impl<'a> FromSql<'a> for PgValue {
    fn from_sql(
        ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(PgValue(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i64::from(i32::from_sql(ty, raw)?)),
            Type::INT2 => Value::Int(i64::from(i16::from_sql(ty, raw)?)),
            Type::BOOL => Value::Int(i64::from(bool::from_sql(ty, raw)?)),
            _ if <&str as FromSql>::accepts(ty) => Value::Text(String::from_sql(ty, raw)?),
            _ => return Err(Box::new(DbError::PgType(ty.to_string()))),
        }))
    }

    fn from_sql_null(_: &Type) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(PgValue(Value::Null))
    }

    fn accepts(_: &Type) -> bool {
        true
    }
}

/// A PostgreSQL connection with its prepared statements, by the SQLite text they came from.
pub struct PgConn {
    pub client: ManuallyDrop<postgres::Client>,
    statements: HashMap<String, postgres::Statement>,
}

/// `postgres::Client` closes its connection on drop by blocking on a runtime of its own,
/// which panics on a thread of tokio's (a pool dropped by an async task, the runtime's
/// shutdown): there it is closed on a thread of its own.
impl Drop for PgConn {
    fn drop(&mut self) {
        // SAFETY: `client` is taken once, here, and not used after.
        let client = unsafe { ManuallyDrop::take(&mut self.client) };
        if tokio::runtime::Handle::try_current().is_err() {
            drop(client);
            return;
        }
        let closed = std::thread::Builder::new()
            .name("stork-pg-close".into())
            .spawn(move || drop(client));
        if let Err(e) = closed {
            tracing::warn!(error = %e, "cannot close a PostgreSQL connection cleanly");
        }
    }
}

impl PgConn {
    pub fn new(client: postgres::Client) -> Self {
        Self {
            client: ManuallyDrop::new(client),
            statements: HashMap::new(),
        }
    }

    fn prepare(&mut self, sql: &str) -> Result<postgres::Statement, DbError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let stmt = self.client.prepare(&numbered(sql))?;
        // Statement texts are the store's own (a page's `IN` list varies with its length),
        // so the cache stays small; it is bounded all the same.
        if self.statements.len() >= 512 {
            self.statements.clear();
        }
        self.statements.insert(sql.to_string(), stmt.clone());
        Ok(stmt)
    }
}

fn pg_args(args: &[Value]) -> Vec<&(dyn ToSql + Sync)> {
    args.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
}

impl Sql for PgConn {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn execute(&mut self, sql: &str, args: &[Value]) -> Result<u64, DbError> {
        let stmt = self.prepare(sql)?;
        Ok(self.client.execute(&stmt, &pg_args(args))?)
    }

    fn query(&mut self, sql: &str, args: &[Value]) -> Result<Vec<Row>, DbError> {
        let stmt = self.prepare(sql)?;
        let rows = self.client.query(&stmt, &pg_args(args))?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let mut row = Vec::with_capacity(r.len());
            for i in 0..r.len() {
                row.push(r.try_get::<_, PgValue>(i)?.0);
            }
            out.push(Row(row));
        }
        Ok(out)
    }
}

/// SQLite's `?N` placeholders as PostgreSQL's `$N` (none appear inside the store's string
/// literals, which are skipped all the same).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\'' {
            quoted = !quoted;
        }
        if c == '?' && !quoted && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

/// r2d2's handle on PostgreSQL: opens [`PgConn`]s, and drops one whose connection closed
/// (PostgreSQL restarted), so the next checkout opens a fresh one.
#[derive(Debug)]
pub struct PgManager(pub postgres::Config);

impl r2d2::ManageConnection for PgManager {
    type Connection = PgConn;
    type Error = postgres::Error;

    fn connect(&self) -> Result<PgConn, postgres::Error> {
        Ok(PgConn::new(self.0.connect(postgres::NoTls)?))
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), postgres::Error> {
        conn.client.simple_query("").map(|_| ())
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.client.is_closed()
    }
}

/// Where PostgreSQL is, for messages: never the password.
pub fn describe(config: &postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(h) => h.clone(),
            postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    format!(
        "database {:?} on {}",
        config.get_dbname().unwrap_or("(the user's)"),
        hosts.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_renumbered_outside_string_literals() {
        assert_eq!(
            numbered("SELECT '?1', x FROM t WHERE a = ?1 AND b IN (?2, ?10) AND c IS ?"),
            "SELECT '?1', x FROM t WHERE a = $1 AND b IN ($2, $10) AND c IS ?"
        );
    }

    #[test]
    fn a_row_reads_its_columns_and_names_the_one_of_the_wrong_type() {
        let row = Row(vec![Value::Int(3), Value::Null, Value::Text("x".into())]);
        assert_eq!(row.get::<i64>(0).unwrap(), 3);
        assert!(row.get::<bool>(0).unwrap());
        assert_eq!(row.get::<Option<String>>(1).unwrap(), None);
        assert_eq!(row.get::<String>(2).unwrap(), "x");
        let err = row.get::<i64>(2).unwrap_err().to_string();
        assert_eq!(err, "column 2 holds text, not an integer");
        assert!(row.get::<String>(1).is_err(), "NULL is not text");
    }
}
