//! The operator's tables (`pollhook status`): comfy-table set to the
//! layout the CLI has always printed, which people and scripts read:
//! left-aligned columns two spaces apart, the header as a plain first row,
//! no borders or lines, no trailing blanks, no wrapping to the terminal.

use comfy_table::{presets::NOTHING, Table};

/// `rows` (the header first) as left-aligned columns, one line each.
pub fn render(rows: &[Vec<String>]) -> String {
    let mut table = Table::new();
    table.load_preset(NOTHING);
    for r in rows {
        table.add_row(r.clone());
    }
    for c in table.column_iter_mut() {
        c.set_padding((0, 2));
    }
    table.trim_fmt()
}

/// Prints `rows` (the header first) as left-aligned columns.
pub fn print(rows: &[Vec<String>]) {
    if !rows.is_empty() {
        println!("{}", render(rows));
    }
}

#[cfg(test)]
mod tests {
    use super::render;

    /// The layout the CLI printed by hand before comfy-table, kept as
    /// the reference the crate's configuration must reproduce.
    fn by_hand(rows: &[Vec<String>]) -> String {
        let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
        let widths: Vec<usize> = (0..cols)
            .map(|c| {
                rows.iter()
                    .map(|r| r.get(c).map_or(0, |x| x.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        rows.iter()
            .map(|r| {
                let line: Vec<String> = r
                    .iter()
                    .enumerate()
                    .map(|(i, x)| format!("{x:<w$}", w = widths[i]))
                    .collect();
                line.join("  ").trim_end().to_string()
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn rows(rows: &[&[&str]]) -> Vec<Vec<String>> {
        rows.iter()
            .map(|r| r.iter().map(|c| c.to_string()).collect())
            .collect()
    }

    #[test]
    fn the_table_keeps_the_hand_made_layout() {
        for t in [
            rows(&[&["INSTANCE", "OK", "ERROR"]]),
            rows(&[
                &["INSTANCE", "LAST POLL", "OK", "CURSOR", "ERROR"],
                &["balances/default", "12s ago", "3", "-", ""],
                &["a/b", "in 3s", "1024", "c-2026-11-29", "HTTP 500: boom"],
                &["x", "", "", "", ""],
            ]),
            rows(&[
                &["HOST", "REQUESTS", "PAUSED"],
                &["api.example:8443", "7", "1200 ms"],
                &["é.example", "0", "-"],
            ]),
        ] {
            assert_eq!(render(&t), by_hand(&t), "{t:?}");
        }
        let out = render(&rows(&[&["ENDPOINT", "QUEUE"], &["agent", "0"]]));
        assert_eq!(out, "ENDPOINT  QUEUE\nagent     0");
    }
}
