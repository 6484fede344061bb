//! Text log lines that outside data cannot forge.
//!
//! Log values come from upstreams and connector authors: instance names
//! found by discovery, ids, error bodies. A value holding a newline, a
//! carriage return or a terminal escape (`\x1b[…`) would otherwise start a
//! line of its own (`… ERROR forged …`) or rewrite what an operator's
//! terminal shows. Escaping once, where fields are formatted, covers every
//! call site, present and future, instead of trusting each one to escape.
//! JSON logs need nothing: JSON escapes control characters itself.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::FormatFields;

/// True for characters a log line must not carry as they are: controls
/// (C0, DEL, C1), the Unicode line and paragraph separators, and the
/// bidirectional overrides that reorder what a terminal shows.
pub fn is_unsafe_char(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Writes `s` with every [`is_unsafe_char`] escaped (`\n`, `\r`, `\t`,
/// `\u{1b}`), so that it stays on its line and shows as what it is.
pub fn write_escaped(out: &mut dyn fmt::Write, s: &str) -> fmt::Result {
    let mut rest = s;
    while let Some(i) = rest.find(is_unsafe_char) {
        out.write_str(&rest[..i])?;
        let c = rest[i..].chars().next().expect("found");
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c => write!(out, "\\u{{{:x}}}", c as u32)?,
        }
        rest = &rest[i + c.len_utf8()..];
    }
    out.write_str(rest)
}

/// The field formatter of text logs: `tracing-subscriber`'s default
/// layout (the message, then `name=value` separated by spaces, strings in
/// quotes) with every value escaped by [`write_escaped`]. The line's own
/// final newline is written by the event formatter, after the fields.
#[derive(Debug, Default, Clone, Copy)]
pub struct EscapedFields;

impl<'w> FormatFields<'w> for EscapedFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut v = Visitor {
            out: &mut writer,
            first: true,
            buf: String::new(),
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct Visitor<'a, 'w> {
    out: &'a mut Writer<'w>,
    first: bool,
    buf: String,
    result: fmt::Result,
}

impl Visitor<'_, '_> {
    fn field(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        self.buf.clear();
        let _ = self.buf.write_fmt(value);
        let name = field.name().strip_prefix("r#").unwrap_or(field.name());
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                self.out.write_char(' ')?;
            }
            if name != "message" {
                write!(self.out, "{name}=")?;
            }
            write_escaped(self.out, &self.buf)
        })();
    }
}

impl Visit for Visitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.field(field, format_args!("{value}"));
        } else {
            self.field(field, format_args!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, format_args!("{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn outside_values_cannot_start_a_log_line_or_send_escapes() {
        let buf = Buf::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer({
                let buf = buf.clone();
                move || buf.clone()
            })
            .with_ansi(false)
            .fmt_fields(EscapedFields)
            .finish();
        let forged = "acc\n\x1b[31mERROR pollhook: forged\r\u{202e}";
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(instance = %forged, id = forged, n = 3, "poll failed: {forged}");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.ends_with('\n') && !text.contains('\x1b') && !text.contains('\r'));
        assert!(
            text.contains(r"poll failed: acc\n\u{1b}[31mERROR pollhook: forged\r\u{202e}"),
            "{text}"
        );
        assert!(text.contains(r"instance=acc\n\u{1b}[31mERROR"), "{text}");
        assert!(text.contains(r#"id="acc\n\u{1b}[31mERROR"#), "{text}");
        assert!(text.contains(" n=3"), "{text}");
    }
}
