//! How the admin commands print lists: one set of named fields per item, written as a JSON
//! array of objects or as CSV with those names as the header (so both carry the same fields
//! under the same names), and a table for people that fits an 80-column terminal unless asked
//! to be wide.
use clap::ValueEnum;
use serde_json::Value;

/// Output format of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON array of objects.
    Json,
    /// Comma-separated values with a header row (RFC 4180).
    Csv,
}

/// The width a table keeps to unless `--wide`.
pub const TERMINAL_WIDTH: usize = 80;

/// One item's fields, in order: the JSON keys and the CSV header.
pub type Fields = Vec<(&'static str, Value)>;

/// A listing in `format`: JSON or CSV of `items` (whose fields are `names`), or the table
/// `table` draws.
pub fn render(
    format: Format,
    names: &[&str],
    items: impl Iterator<Item = Fields>,
    table: impl FnOnce() -> String,
) -> String {
    match format {
        Format::Json => json(&items.collect::<Vec<_>>()),
        Format::Csv => csv(names, &items.collect::<Vec<_>>()),
        Format::Table => table(),
    }
}

/// A JSON array of objects, keys in the fields' order, ending with a newline.
pub fn json(items: &[Fields]) -> String {
    let mut out = String::from("[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('{');
        for (j, (name, value)) in item.iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str(&Value::from(*name).to_string());
            out.push(':');
            out.push_str(&value.to_string());
        }
        out.push('}');
    }
    out.push_str("]\n");
    out
}

/// CSV with a header row of the field names (`names`, for an empty list too); strings as they
/// are, numbers in digits, null as an empty field.
pub fn csv(names: &[&str], items: &[Fields]) -> String {
    let mut out = names.join(",");
    out.push_str("\r\n");
    for item in items {
        let line: Vec<String> = item
            .iter()
            .map(|(_, v)| match v {
                Value::Null => String::new(),
                Value::String(s) => csv_field(s),
                other => csv_field(&other.to_string()),
            })
            .collect();
        out.push_str(&line.join(","));
        out.push_str("\r\n");
    }
    out
}

/// One CSV field, quoted when it holds a comma, a quote or a line break.
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// A table column: its header, and whether it may be shortened (with `…`) to fit the width.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub header: &'static str,
    pub flex: bool,
}

/// A fixed column.
pub const fn fixed(header: &'static str) -> Column {
    Column {
        header,
        flex: false,
    }
}

/// A column that gives up width first.
pub const fn flex(header: &'static str) -> Column {
    Column { header, flex: true }
}

/// Aligned columns, two spaces apart, no trailing blanks. With `width`, the widest flexible
/// columns are shortened one character at a time until a line fits (or none can give more).
pub fn table(columns: &[Column], rows: &[Vec<String>], width: Option<usize>) -> String {
    let n = columns.len();
    let mut widths: Vec<usize> = columns.iter().map(|c| c.header.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    if let Some(limit) = width {
        let total = |w: &[usize]| w.iter().sum::<usize>() + 2 * n.saturating_sub(1);
        while total(&widths) > limit {
            // Never narrower than its header or 6 characters.
            let widest = (0..n)
                .filter(|&i| columns[i].flex && widths[i] > columns[i].header.len().max(6))
                .max_by_key(|&i| widths[i]);
            match widest {
                Some(i) => widths[i] -= 1,
                None => break,
            }
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut text = String::new();
        for (i, cell) in cells.enumerate().take(n) {
            if i > 0 {
                text.push_str("  ");
            }
            let cell = shorten(cell, widths[i]);
            let pad = widths[i].saturating_sub(cell.chars().count());
            text.push_str(&cell);
            text.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&mut columns.iter().map(|c| c.header));
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// `s` in at most `width` characters, ending with `…` when cut.
fn shorten(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_owned();
    }
    let mut cut: String = s.chars().take(width.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// A time for a narrow table: `MM-DD HH:MM` (UTC).
pub fn short_time(ms: i64) -> String {
    let iso = super::format_utc_ms(ms);
    // 2026-11-22T16:25:26.123Z
    format!("{} {}", &iso[5..10], &iso[11..16])
}

/// A duration for a narrow table: `9.5s`, `12s`, `3m05s`, `2h07m`, `3d04h`.
pub fn short_duration(ms: i64) -> String {
    let ms = ms.max(0);
    let s = ms / 1000;
    match s {
        0..10 => format!("{}.{}s", s, ms % 1000 / 100),
        10..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// An optional time as an ISO 8601 UTC string, else null.
pub fn iso(ms: Option<i64>) -> Value {
    ms.map_or(Value::Null, |m| Value::from(super::format_utc_ms(m)))
}

/// An optional value as JSON (null when absent).
pub fn opt<T: Into<Value>>(v: Option<T>) -> Value {
    v.map_or(Value::Null, Into::into)
}

/// `-` for an empty table cell.
pub fn dash(s: impl Into<String>) -> String {
    let s = s.into();
    if s.is_empty() { "-".to_owned() } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_csv_carry_the_same_names() {
        let items = vec![vec![
            ("id", Value::from("a,b")),
            ("n", Value::from(5)),
            ("none", Value::Null),
        ]];
        assert_eq!(json(&items), "[{\"id\":\"a,b\",\"n\":5,\"none\":null}]\n");
        assert_eq!(
            csv(&["id", "n", "none"], &items),
            "id,n,none\r\n\"a,b\",5,\r\n"
        );
        assert_eq!(json(&[]), "[]\n");
    }

    #[test]
    fn tables_fit_the_width_by_shortening_flexible_columns() {
        let columns = [fixed("ID"), flex("NAME"), flex("NOTE")];
        let rows = vec![vec![
            "12345678".to_owned(),
            "a-rather-long-account-name".to_owned(),
            "x".repeat(60),
        ]];
        let t = table(&columns, &rows, Some(40));
        for line in t.lines() {
            assert!(line.chars().count() <= 40, "{line:?}");
        }
        assert!(t.contains('…'), "{t}");
        assert!(
            t.lines()
                .nth(1)
                .is_some_and(|l| l.starts_with("12345678  "))
        );
        // Wide: everything whole.
        let t = table(&columns, &rows, None);
        assert!(t.contains(&"x".repeat(60)) && !t.contains('…'));
    }

    #[test]
    fn short_forms() {
        assert_eq!(short_time(1_795_364_726_123), "11-22 16:25");
        assert_eq!(short_duration(9_540), "9.5s");
        assert_eq!(short_duration(42_000), "42s");
        assert_eq!(short_duration(185_000), "3m05s");
        assert_eq!(short_duration(7_620_000), "2h07m");
        assert_eq!(short_duration(273_600_000), "3d04h");
    }
}
