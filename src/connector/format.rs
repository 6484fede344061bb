//! Response bodies as a [`serde_json::Value`] tree, so that the connector's
//! JSONPaths select from JSON, XML and CSV alike. Pure: bytes in, value out.
//!
//! # Choosing the format
//!
//! A connector may declare `response.format: json | xml | csv`. Without it
//! (`auto`), the response's `Content-Type` decides (`…json`, `…/xml` or
//! `…+xml` such as `application/rss+xml` and `application/atom+xml`,
//! `text/csv`); when it says nothing useful, the first non-whitespace byte
//! does: `{` or `[` is JSON, `<` is XML, anything else is tried as JSON so
//! that the error explains what is wrong. CSV is never guessed from the body.
//!
//! # XML
//!
//! The well-known "Badgerfish-lite" (xml2json) convention:
//!
//! - The document is an object with one key, the root element's name:
//!   `<rss>…</rss>` is `{"rss": {…}}`.
//! - An element with only text (no attributes, no children) is a string,
//!   trimmed: `<title> Hi </title>` is `"title": "Hi"`. An empty element
//!   without attributes is `""`.
//! - Attributes are keys prefixed with `@`: `<link href="x"/>` is
//!   `"link": {"@href": "x"}`.
//! - Child elements are keys by element name, in document order. A name that
//!   appears more than once among siblings becomes an array in document
//!   order; a name that appears once is a single value, **not** a one-element
//!   array. So a feed that happens to hold exactly one `<item>` gives
//!   `$.rss.channel.item` an object, and `$.rss.channel.item[*]` then selects
//!   that object's *members*, not the item. The connector's `items:` knows
//!   this: for XML bodies, a path ending in `[*]` takes a lone element as a
//!   list of one, so `$.rss.channel.item[*]` works for one item or many.
//!   (Other JSONPaths see the tree as described: `$..item` selects the
//!   array when there are several items, not each item.)
//! - Text of an element that also has attributes or children is under the key
//!   `#text`: all of its direct text concatenated, then trimmed; the key is
//!   left out when that is empty.
//! - Names keep their namespace prefix as written (`atom:link`,
//!   `dc:creator`); `xmlns` and `xmlns:…` declarations are ordinary
//!   attributes (`@xmlns`).
//! - CDATA sections are text. The five predefined entities (`&amp;` …) and
//!   character references (`&#233;`, `&#xE9;`) are decoded; entities defined
//!   in a DTD are not supported (error). Comments and processing
//!   instructions are ignored.
//! - No type guessing: every text and attribute value is a string.
//!
//! The body must be well-formed XML in UTF-8: one root element, matching end
//! tags, nothing but whitespace, comments and processing instructions around
//! the root, elements nested at most 256 deep. An HTML error
//! page that is not well-formed, a JSON body or a truncated document is an
//! error, never a partial tree.
//!
//! # CSV
//!
//! The first row is the header; the body is an array of objects, one per
//! row, in order, mapping each header name to the row's value (a string,
//! untrimmed). Every row must have as many fields as the header, and header
//! names must be distinct (an object cannot hold both values of a repeated
//! name). An empty body is an empty array; a UTF-8 byte order mark is
//! skipped.

use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::XmlVersion;
use serde_json::{Map, Value};

/// Body formats a connector can declare (`response.format`), or Auto.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Decide per response, from the `Content-Type` and then the first byte
    /// (see the module doc). The default, so existing JSON connectors and
    /// feeds served with a proper type need no declaration.
    #[default]
    Auto,
    /// JSON, as is.
    Json,
    /// XML, mapped as described in the module doc.
    Xml,
    /// CSV with a header row, as an array of objects.
    Csv,
}

/// Elements nested deeper than this are an error: the tree is built without
/// recursion, but dropping, serializing and `..` selection of a
/// `serde_json::Value` recurse, so an unbounded depth could overflow the
/// stack on a hostile body.
const MAX_XML_DEPTH: usize = 256;

const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Parses `bytes` per `format`; with Auto, chooses by the Content-Type (json / xml incl. application/rss+xml, application/atom+xml, text/xml / text/csv), falling back to sniffing the first non-whitespace byte (`{`/`[` → JSON, `<` → XML), else JSON (whose error then explains).
///
/// Returns the tree and the format actually used (never [`Format::Auto`]),
/// so callers can say which parser rejected or produced it.
///
/// The error is a one-line human message saying what format was expected and
/// what is wrong, with the line and column where the parser gives them, e.g.
/// `not valid XML: unexpected end of input at line 3 column 5`.
pub fn parse_body(
    bytes: &[u8],
    content_type: Option<&str>,
    format: Format,
) -> Result<(Value, Format), BodyError> {
    let format = match format {
        Format::Auto => {
            // An HTML page where data was expected is almost always an error
            // page (maintenance, login, proxy): say so rather than report
            // the XML syntax errors of its HTML.
            if content_type.is_some_and(|ct| {
                ct.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("text/html")
            }) {
                return Err(BodyError::Html);
            }
            content_type
                .and_then(format_of_content_type)
                .unwrap_or_else(|| sniff(bytes))
        }
        declared => declared,
    };
    let value = match format {
        Format::Json | Format::Auto => parse_json(bytes)?,
        Format::Xml => parse_xml(bytes)?,
        Format::Csv => parse_csv(bytes)?,
    };
    Ok((value, format))
}

/// Why a body is not data of its format; the message says what is wrong,
/// with the line and column where the parser gives them.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("an HTML page (Content-Type: text/html), not JSON, XML or CSV; if the API really serves data as text/html, declare `response.format`")]
    Html,
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The XML parser's complaint, or what pollhook refuses (a second
    /// root, elements nested too deep), where it was found.
    #[error("not valid XML: {what} at line {line} column {column}")]
    Xml {
        what: String,
        line: usize,
        column: usize,
    },
    /// The input ended inside `element`.
    #[error("not valid XML: unexpected end of input at line {line} column {column} (`<{element}>` not closed)")]
    XmlUnclosed {
        element: String,
        line: usize,
        column: usize,
    },
    /// Nothing but comments and declarations.
    #[error("not valid XML: no root element")]
    XmlNoRoot,
    /// An object cannot hold two columns of one name.
    #[error("not valid CSV: column name `{0}` appears more than once in the header")]
    CsvDuplicateColumn(String),
    /// A row whose field count is not the header's.
    #[error("not valid CSV: {}has {len} fields, the header has {expected}", line.map_or(String::new(), |l| format!("line {l} ")))]
    CsvFieldCount {
        line: Option<u64>,
        len: u64,
        expected: u64,
    },
    /// A field that is not UTF-8.
    #[error("not valid CSV: not UTF-8{}: {error}", line.map_or(String::new(), |l| format!(" at line {l}")))]
    CsvUtf8 { line: Option<u64>, error: String },
    /// Anything else the CSV reader refused.
    #[error("not valid CSV: {0}")]
    Csv(String),
}

/// What is wrong with one event of an XML body; becomes the `what` of
/// [`BodyError::Xml`], placed at the event.
#[derive(Debug, thiserror::Error)]
enum XmlFault {
    #[error("a second root element")]
    SecondRoot,
    #[error("elements nested deeper than {MAX_XML_DEPTH} levels")]
    TooDeep,
    #[error("an end tag without a start tag")]
    UnmatchedEnd,
    /// Text, CDATA or an entity reference before or after the root.
    #[error("{0} outside the root element")]
    Outside(&'static str),
    #[error("unknown entity `&{0};`")]
    UnknownEntity(String),
    #[error(transparent)]
    Tag(#[from] TagError),
    /// quick-xml could not decode or unescape the event: its message.
    #[error("{0}")]
    Reader(String),
}

impl XmlFault {
    fn reader(e: impl std::fmt::Display) -> XmlFault {
        XmlFault::Reader(e.to_string())
    }
}

/// Why an element's start tag is refused; becomes the `what` of
/// [`BodyError::Xml`].
#[derive(Debug, thiserror::Error)]
enum TagError {
    #[error("element name is not UTF-8: {0}")]
    NameNotUtf8(std::str::Utf8Error),
    #[error("in `<{name}>`: {error}")]
    Attribute { name: String, error: String },
    #[error("attribute name in `<{name}>` is not UTF-8: {error}")]
    AttributeNameNotUtf8 {
        name: String,
        error: std::str::Utf8Error,
    },
    #[error("attribute `{key}` of `<{name}>`: {error}")]
    AttributeValue {
        key: String,
        name: String,
        error: String,
    },
}

/// The format a `Content-Type` value names, if it names one we read.
fn format_of_content_type(content_type: &str) -> Option<Format> {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let (kind, subtype) = essence.split_once('/')?;
    if subtype == "json" || subtype.ends_with("+json") {
        Some(Format::Json)
    } else if subtype == "xml" || subtype.ends_with("+xml") {
        Some(Format::Xml)
    } else if subtype == "csv" && (kind == "text" || kind == "application") {
        Some(Format::Csv)
    } else {
        None
    }
}

/// JSON or XML from the first non-whitespace byte (after a BOM).
fn sniff(bytes: &[u8]) -> Format {
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'<') => Format::Xml,
        _ => Format::Json,
    }
}

fn parse_json(bytes: &[u8]) -> Result<Value, BodyError> {
    // A BOM is not JSON, but some servers send one; it hides nothing.
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    Ok(serde_json::from_slice(bytes)?)
}

/// 1-based line and column (in characters) of byte offset `pos` in `bytes`.
fn line_col(bytes: &[u8], pos: usize) -> (usize, usize) {
    let before = &bytes[..pos.min(bytes.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    // Count characters, not bytes: UTF-8 continuation bytes do not start one.
    let column = before[line_start..]
        .iter()
        .filter(|&&b| b & 0xC0 != 0x80)
        .count()
        + 1;
    (line, column)
}

/// An element being built: its name and what it has collected so far.
struct Open {
    name: String,
    /// Attributes (`@…`) and children, in document order.
    members: Map<String, Value>,
    /// Direct text, untrimmed and concatenated (CDATA and references included).
    text: String,
}

impl Open {
    fn finish(self) -> (String, Value) {
        let text = self.text.trim();
        let value = if self.members.is_empty() {
            Value::String(text.to_string())
        } else {
            let mut members = self.members;
            if !text.is_empty() {
                members.insert("#text".to_string(), Value::String(text.to_string()));
            }
            Value::Object(members)
        };
        (self.name, value)
    }

    /// Adds a child: a repeated name turns into an array in document order.
    /// Element values are never arrays themselves, so an array here can only
    /// be one built from earlier repetitions.
    fn add_child(&mut self, name: String, value: Value) {
        match self.members.get_mut(&name) {
            None => {
                self.members.insert(name, value);
            }
            Some(Value::Array(items)) => items.push(value),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, value]);
            }
        }
    }
}

fn parse_xml(bytes: &[u8]) -> Result<Value, BodyError> {
    let at = |pos: u64| line_col(bytes, usize::try_from(pos).unwrap_or(usize::MAX));
    let error_at = |what: String, pos: u64| {
        let (line, column) = at(pos);
        BodyError::Xml { what, line, column }
    };
    let mut reader = quick_xml::Reader::from_reader(bytes);
    {
        // Defaults as of quick-xml 0.41, set explicitly because correctness
        // depends on them: mismatched and unmatched end tags are errors, and
        // text is kept whole (trimming per event would cut around CDATA and
        // entity references).
        let config = reader.config_mut();
        config.check_end_names = true;
        config.allow_unmatched_ends = false;
        config.allow_dangling_amp = false;
        config.trim_text(false);
    }
    let mut tree = Tree::default();
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let event_start = reader.buffer_position();
        let event = match reader.read_event_into(&mut buf) {
            Ok(event) => event,
            Err(e) => {
                let what = match &e {
                    quick_xml::Error::Syntax(e) => e.to_string(),
                    quick_xml::Error::IllFormed(e) => e.to_string(),
                    other => other.to_string(),
                };
                return Err(error_at(what, reader.error_position()));
            }
        };
        if let Event::Eof = event {
            if let Some(element) = tree.stack.last() {
                let (line, column) = at(reader.buffer_position());
                return Err(BodyError::XmlUnclosed {
                    element: element.name.clone(),
                    line,
                    column,
                });
            }
            return tree.root.ok_or(BodyError::XmlNoRoot);
        }
        tree.apply(event)
            .map_err(|fault| error_at(fault.to_string(), event_start))?;
    }
}

/// The document being built from the reader's events: the elements still
/// open, innermost last, and the root once it closed. Each step's error
/// is what is wrong, placed at the event by [`parse_xml`].
#[derive(Default)]
struct Tree {
    stack: Vec<Open>,
    root: Option<Value>,
}

impl Tree {
    /// One event of the document (not its end).
    fn apply(&mut self, event: Event<'_>) -> Result<(), XmlFault> {
        match event {
            Event::Start(start) => {
                let element = self.start(&start)?;
                self.stack.push(element);
            }
            Event::Empty(start) => {
                let element = self.start(&start)?;
                self.attach(element);
            }
            Event::End(_) => {
                // The reader checked the name against the open element.
                let Some(element) = self.stack.pop() else {
                    return Err(XmlFault::UnmatchedEnd);
                };
                self.attach(element);
            }
            Event::Text(text) => {
                let text = text.xml10_content().map_err(XmlFault::reader)?;
                match self.stack.last_mut() {
                    Some(element) => element.text.push_str(&text),
                    None if text.trim().is_empty() => {}
                    None => return Err(XmlFault::Outside("text")),
                }
            }
            Event::CData(cdata) => {
                let text = cdata.xml10_content().map_err(XmlFault::reader)?;
                match self.stack.last_mut() {
                    Some(element) => element.text.push_str(&text),
                    None => return Err(XmlFault::Outside("CDATA")),
                }
            }
            Event::GeneralRef(reference) => self.reference(&reference)?,
            Event::Comment(_) | Event::PI(_) | Event::Decl(_) | Event::DocType(_) | Event::Eof => {}
        }
        Ok(())
    }

    /// A start tag (or an empty element's) as a new element: refused
    /// after the root closed, and beyond [`MAX_XML_DEPTH`] (the JSON tree
    /// is walked recursively later).
    fn start(&self, start: &BytesStart<'_>) -> Result<Open, XmlFault> {
        if self.root.is_some() {
            return Err(XmlFault::SecondRoot);
        }
        if self.stack.len() >= MAX_XML_DEPTH {
            return Err(XmlFault::TooDeep);
        }
        Ok(open(start)?)
    }

    /// A closed element goes into its parent, or is the document.
    fn attach(&mut self, element: Open) {
        let (name, value) = element.finish();
        match self.stack.last_mut() {
            Some(parent) => parent.add_child(name, value),
            None => self.root = Some(single(name, value)),
        }
    }

    /// `&#…;` or one of the five predefined entities, as text of the open
    /// element; any other entity is refused (no DTD is read).
    fn reference(&mut self, reference: &BytesRef<'_>) -> Result<(), XmlFault> {
        let Some(element) = self.stack.last_mut() else {
            return Err(XmlFault::Outside("an entity reference"));
        };
        match reference.resolve_char_ref() {
            Ok(Some(c)) => element.text.push(c),
            Ok(None) => {
                let name = reference.decode().map_err(XmlFault::reader)?;
                match quick_xml::escape::resolve_predefined_entity(&name) {
                    Some(s) => element.text.push_str(s),
                    None => return Err(XmlFault::UnknownEntity(name.to_string())),
                }
            }
            Err(e) => return Err(XmlFault::reader(e)),
        }
        Ok(())
    }
}

/// `{name: value}`: the document's shape.
fn single(name: String, value: Value) -> Value {
    let mut map = Map::new();
    map.insert(name, value);
    Value::Object(map)
}

/// A new open element with its attributes as `@name` members.
fn open(start: &BytesStart<'_>) -> Result<Open, TagError> {
    let name = std::str::from_utf8(start.name().as_ref())
        .map_err(TagError::NameNotUtf8)?
        .to_string();
    let mut members = Map::new();
    // `attributes()` checks for duplicates and unquoted or missing values.
    for attr in start.attributes() {
        let attr = attr.map_err(|e| TagError::Attribute {
            name: name.clone(),
            error: e.to_string(),
        })?;
        let key = std::str::from_utf8(attr.key.as_ref()).map_err(|error| {
            TagError::AttributeNameNotUtf8 {
                name: name.clone(),
                error,
            }
        })?;
        let value = attr
            .normalized_value(XmlVersion::Implicit1_0)
            .map_err(|e| TagError::AttributeValue {
                key: key.to_string(),
                name: name.clone(),
                error: e.to_string(),
            })?;
        members.insert(format!("@{key}"), Value::String(value.into_owned()));
    }
    Ok(Open {
        name,
        members,
        text: String::new(),
    })
}

fn parse_csv(bytes: &[u8]) -> Result<Value, BodyError> {
    let bytes = bytes.strip_prefix(BOM).unwrap_or(bytes);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes);
    let headers = reader.headers().map_err(csv_error)?.clone();
    for (i, name) in headers.iter().enumerate() {
        if headers.iter().take(i).any(|earlier| earlier == name) {
            // An object cannot hold both; silently keeping one would lose data.
            return Err(BodyError::CsvDuplicateColumn(name.to_string()));
        }
    }
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let row: Map<String, Value> = headers
            .iter()
            .zip(record.iter())
            .map(|(h, v)| (h.to_string(), Value::String(v.to_string())))
            .collect();
        rows.push(Value::Object(row));
    }
    Ok(Value::Array(rows))
}

fn csv_error(e: csv::Error) -> BodyError {
    match e.kind() {
        csv::ErrorKind::UnequalLengths {
            pos,
            expected_len,
            len,
        } => BodyError::CsvFieldCount {
            line: pos.as_ref().map(|p| p.line()),
            len: *len,
            expected: *expected_len,
        },
        csv::ErrorKind::Utf8 { pos, err } => BodyError::CsvUtf8 {
            line: pos.as_ref().map(|p| p.line()),
            error: err.to_string(),
        },
        _ => BodyError::Csv(e.to_string()),
    }
}

/// The URL with rel="next" in an RFC 8288 `Link` header value (possibly several comma-separated links, rel may hold several space-separated relation types, quoted or not, case-insensitive; URIs in <…> may contain commas and semicolons inside). None when there is none.
///
/// The URL is returned as written, so it may be relative: resolve it against
/// the request URL. A malformed link is skipped rather than failing the
/// others, since a pager should follow whatever `next` it can read.
pub fn link_next(header: &str) -> Option<String> {
    let mut rest = header;
    loop {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if rest.is_empty() {
            return None;
        }
        let Some(after_lt) = rest.strip_prefix('<') else {
            // Not a link: skip to the next top-level comma.
            rest = &rest[skip_to_comma(rest)..];
            continue;
        };
        let end = after_lt.find('>')?;
        let uri = after_lt[..end].trim();
        rest = &after_lt[end + 1..];
        let mut rel: Option<String> = None;
        // Parameters: `; name[=value]` until the next comma or the end.
        loop {
            rest = rest.trim_start();
            let Some(after_semi) = rest.strip_prefix(';') else {
                break;
            };
            rest = after_semi.trim_start();
            let name_end = rest
                .find(|c: char| c == '=' || c == ';' || c == ',' || c.is_whitespace())
                .unwrap_or(rest.len());
            let name = &rest[..name_end];
            rest = rest[name_end..].trim_start();
            let mut value = String::new();
            if let Some(after_eq) = rest.strip_prefix('=') {
                rest = after_eq.trim_start();
                if let Some(quoted) = rest.strip_prefix('"') {
                    let mut chars = quoted.char_indices();
                    let mut closed = quoted.len();
                    while let Some((i, c)) = chars.next() {
                        match c {
                            '\\' => {
                                if let Some((_, escaped)) = chars.next() {
                                    value.push(escaped);
                                }
                            }
                            '"' => {
                                closed = i + 1;
                                break;
                            }
                            c => value.push(c),
                        }
                    }
                    rest = &quoted[closed.min(quoted.len())..];
                } else {
                    let value_end = rest
                        .find(|c: char| c == ';' || c == ',' || c.is_whitespace())
                        .unwrap_or(rest.len());
                    value.push_str(&rest[..value_end]);
                    rest = &rest[value_end..];
                }
            }
            // RFC 8288 §3.3: occurrences of `rel` after the first are ignored.
            if rel.is_none() && name.eq_ignore_ascii_case("rel") {
                rel = Some(value);
            }
        }
        if rel.is_some_and(|r| r.split_whitespace().any(|t| t.eq_ignore_ascii_case("next"))) {
            return Some(uri.to_string());
        }
        // Anything unexpected before the next link is skipped.
        rest = &rest[skip_to_comma(rest)..];
    }
}

/// Byte index of the next comma outside double quotes (or the end).
fn skip_to_comma(s: &str) -> usize {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => return i,
            _ => {}
        }
    }
    s.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use serde_json_path::JsonPath;

    fn xml(body: &str) -> Value {
        parse_body(body.as_bytes(), None, Format::Xml).unwrap().0
    }

    fn xml_err(body: &str) -> String {
        parse_body(body.as_bytes(), None, Format::Xml)
            .unwrap_err()
            .to_string()
    }

    fn select(value: &Value, path: &str) -> Vec<Value> {
        JsonPath::parse(path)
            .unwrap()
            .query(value)
            .all()
            .into_iter()
            .cloned()
            .collect()
    }

    const RSS: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0" xmlns:dc="http://purl.org/dc/elements/1.1/">
  <channel>
    <title>Example</title>
    <link>https://example.com/</link>
    <item>
      <title>First</title>
      <guid isPermaLink="false">a1</guid>
      <dc:creator>Ann</dc:creator>
    </item>
    <item>
      <title>Second</title>
      <guid isPermaLink="false">a2</guid>
      <dc:creator>Bob</dc:creator>
    </item>
  </channel>
</rss>
"#;

    #[test]
    fn rss_with_two_items() {
        let v = xml(RSS);
        assert_eq!(
            v,
            json!({"rss": {
                "@version": "2.0",
                "@xmlns:dc": "http://purl.org/dc/elements/1.1/",
                "channel": {
                    "title": "Example",
                    "link": "https://example.com/",
                    "item": [
                        {"title": "First", "guid": {"@isPermaLink": "false", "#text": "a1"}, "dc:creator": "Ann"},
                        {"title": "Second", "guid": {"@isPermaLink": "false", "#text": "a2"}, "dc:creator": "Bob"},
                    ]
                }
            }})
        );
        assert_eq!(
            select(&v, "$.rss.channel.item[*].title"),
            vec![json!("First"), json!("Second")]
        );
    }

    #[test]
    fn single_item_feed_is_an_object_and_a_filter_selects_items_either_way() {
        let one = xml("<rss><channel><title>C</title><item><guid>g1</guid></item></channel></rss>");
        assert_eq!(
            one,
            json!({"rss": {"channel": {"title": "C", "item": {"guid": "g1"}}}})
        );
        // As documented: `[*]` on the single item selects its members, and
        // `..item` selects the array when there are several, not each item.
        assert_eq!(select(&one, "$.rss.channel.item[*]"), vec![json!("g1")]);
        let two = xml(RSS);
        assert_eq!(select(&two, "$..item").len(), 1);
        assert!(select(&two, "$..item")[0].is_array());
        // The documented path that selects each item in both shapes.
        let path = "$.rss.channel..[?@.guid]";
        assert_eq!(select(&one, path), vec![json!({"guid": "g1"})]);
        let items = select(&two, path);
        assert_eq!(items.len(), 2);
        assert_eq!(items[1]["title"], "Second");
        // Atom: the feed's own `id` is not matched, only entries'.
        let atom = xml("<feed><id>f</id><entry><id>e1</id></entry></feed>");
        assert_eq!(select(&atom, "$.feed..[?@.id]"), vec![json!({"id": "e1"})]);
    }

    #[test]
    fn atom_feed_with_namespaced_root_and_link_attributes() {
        let v = xml(r#"<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom">
  <title>Example Feed</title>
  <link href="https://example.org/feed" rel="self"/>
  <entry>
    <title>Atom-Powered Robots Run Amok</title>
    <link href="https://example.org/2003/12/13/atom03" rel="alternate"/>
    <link href="https://example.org/2003/12/13/atom03.pdf" rel="enclosure" type="application/pdf"/>
    <id>urn:uuid:1225c695-cfb8-4ebb-aaaa-80da344efa6a</id>
    <updated>2003-12-13T18:30:02Z</updated>
  </entry>
  <entry>
    <title>Second</title>
    <link href="https://example.org/2" rel="alternate"/>
    <id>urn:2</id>
    <updated>2003-12-14T18:30:02Z</updated>
  </entry>
</feed>"#);
        assert_eq!(v["feed"]["@xmlns"], "http://www.w3.org/2005/Atom");
        assert_eq!(
            v["feed"]["link"],
            json!({"@href": "https://example.org/feed", "@rel": "self"})
        );
        let entries = v["feed"]["entry"].as_array().unwrap();
        assert_eq!(entries.len(), 2);
        assert_eq!(
            entries[0]["link"],
            json!([
                {"@href": "https://example.org/2003/12/13/atom03", "@rel": "alternate"},
                {"@href": "https://example.org/2003/12/13/atom03.pdf", "@rel": "enclosure", "@type": "application/pdf"},
            ])
        );
        assert_eq!(entries[1]["link"]["@rel"], "alternate");
        assert_eq!(
            select(&v, "$.feed.entry[*].id"),
            vec![
                json!("urn:uuid:1225c695-cfb8-4ebb-aaaa-80da344efa6a"),
                json!("urn:2")
            ]
        );
    }

    #[test]
    fn cdata_entities_and_character_references_are_text() {
        let v = xml(
            "<item>\n  <title>Tom &amp; Jerry &lt;3 &#233;&#xE9;</title>\n  \
             <description><![CDATA[<p>raw & <b>bold</b></p>]]></description>\n  \
             <mixed>a <![CDATA[b]]> c</mixed>\n  <empty/>\n  <also></also>\n  \
             <n>  42 </n>\n</item>",
        );
        assert_eq!(
            v,
            json!({"item": {
                "title": "Tom & Jerry <3 éé",
                "description": "<p>raw & <b>bold</b></p>",
                "mixed": "a b c",
                "empty": "",
                "also": "",
                "n": "42",
            }})
        );
    }

    #[test]
    fn attributes_with_text_and_mixed_content() {
        let v = xml(
            r#"<r><price currency="EUR" note="a &amp; b">12.50</price><p>Hello <b>world</b> again</p><e a=""/><w x="1">   </w></r>"#,
        );
        assert_eq!(
            v,
            json!({"r": {
                "price": {"@currency": "EUR", "@note": "a & b", "#text": "12.50"},
                "p": {"b": "world", "#text": "Hello  again"},
                "e": {"@a": ""},
                "w": {"@x": "1"},
            }})
        );
    }

    #[test]
    fn repeated_names_interleaved_keep_document_order() {
        let v = xml("<r><a>1</a><b>x</b><a>2</a><a>3</a></r>");
        assert_eq!(v, json!({"r": {"a": ["1", "2", "3"], "b": "x"}}));
    }

    #[test]
    fn truncated_xml_is_an_error_with_position() {
        let e = xml_err("<rss>\n  <channel>\n    <title>x</title>\n    ");
        assert_eq!(
            e,
            "not valid XML: unexpected end of input at line 4 column 5 (`<channel>` not closed)"
        );
        let e = xml_err("<rss><channel><tit");
        assert!(e.starts_with("not valid XML: tag not closed"), "{e}");
        assert!(e.contains("line 1 column 15"), "{e}");
    }

    #[test]
    fn html_that_is_not_well_formed_is_an_error() {
        let e = xml_err(
            "<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\"><title>502 Bad Gateway</title></head>\n\
             <body><p>Bad gateway<br></p></body>\n</html>\n",
        );
        assert!(
            e.starts_with("not valid XML: expected `</meta>`, but `</head>` was found"),
            "{e}"
        );
        assert!(e.contains("line 3"), "{e}");
        let e = xml_err("<html><body><input disabled></body></html>");
        assert!(e.starts_with("not valid XML: "), "{e}");
        let e = xml_err("<p>&nbsp;</p>");
        assert!(e.contains("unknown entity `&nbsp;`"), "{e}");
    }

    #[test]
    fn json_body_declared_as_xml_is_an_error() {
        let e = xml_err("{\"items\": [{\"id\": 1}]}");
        assert_eq!(
            e,
            "not valid XML: text outside the root element at line 1 column 1"
        );
    }

    #[test]
    fn other_malformed_documents_are_errors() {
        assert!(xml_err("<a></a><b></b>").contains("a second root element"));
        assert!(xml_err("<a></a>trailing").contains("text outside the root element"));
        assert!(xml_err("").contains("no root element"));
        assert!(xml_err("<a></b>").contains("expected `</a>`, but `</b>` was found"));
        assert!(xml_err("<a x=\"1\" x=\"2\"/>").starts_with("not valid XML: "));
        assert!(xml_err("<a>b & c</a>").starts_with("not valid XML: "));
    }

    #[test]
    fn nesting_is_capped() {
        let ok = "<a>".repeat(MAX_XML_DEPTH) + &"</a>".repeat(MAX_XML_DEPTH);
        assert!(parse_body(ok.as_bytes(), None, Format::Xml).is_ok());
        let deep = "<a>".repeat(MAX_XML_DEPTH + 1) + &"</a>".repeat(MAX_XML_DEPTH + 1);
        assert!(xml_err(&deep).contains("nested deeper than 256 levels"));
        let deep_empty = "<a>".repeat(MAX_XML_DEPTH) + "<b/>" + &"</a>".repeat(MAX_XML_DEPTH);
        assert!(xml_err(&deep_empty).contains("nested deeper than 256 levels"));
    }

    #[test]
    fn xml_with_bom_parses() {
        let body = [BOM, b"<a>1</a>".as_slice()].concat();
        assert_eq!(
            parse_body(&body, None, Format::Auto).unwrap(),
            (json!({"a": "1"}), Format::Xml)
        );
    }

    #[test]
    fn auto_by_content_type() {
        let cases = [
            ("application/json", Format::Json),
            ("application/problem+json; charset=utf-8", Format::Json),
            ("application/xml", Format::Xml),
            ("text/xml; charset=UTF-8", Format::Xml),
            ("application/rss+xml", Format::Xml),
            ("Application/Atom+XML", Format::Xml),
            ("text/csv; header=present", Format::Csv),
        ];
        for (ct, expected) in cases {
            assert_eq!(format_of_content_type(ct), Some(expected), "{ct}");
        }
        assert_eq!(format_of_content_type("text/html"), None);
        assert_eq!(format_of_content_type("text/plain"), None);
        assert_eq!(format_of_content_type("garbage"), None);

        // The content type wins over the body's first byte.
        let (v, f) = parse_body(b"a,b\n1,2\n", Some("text/csv"), Format::Auto).unwrap();
        assert_eq!((v, f), (json!([{"a": "1", "b": "2"}]), Format::Csv));
        let e = parse_body(b"<a/>", Some("application/json"), Format::Auto)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("not valid JSON: "), "{e}");
        let (_, f) = parse_body(b"<a/>", Some("application/rss+xml"), Format::Auto).unwrap();
        assert_eq!(f, Format::Xml);
        // A declared format wins over the content type.
        let (_, f) = parse_body(b"<a/>", Some("application/json"), Format::Xml).unwrap();
        assert_eq!(f, Format::Xml);
    }

    #[test]
    fn auto_by_sniffing() {
        let ct = Some("text/plain");
        assert_eq!(
            parse_body(b"  \n{\"a\": 1}", ct, Format::Auto).unwrap(),
            (json!({"a": 1}), Format::Json)
        );
        assert_eq!(
            parse_body(b"[1]", None, Format::Auto).unwrap(),
            (json!([1]), Format::Json)
        );
        assert_eq!(
            parse_body(b"\n<?xml version=\"1.0\"?><a>x</a>", ct, Format::Auto).unwrap(),
            (json!({"a": "x"}), Format::Xml)
        );
        // An HTML error page served as text/html is called what it is.
        let e = parse_body(
            b"<html><body><p>oops</body></html>",
            Some("text/html; charset=utf-8"),
            Format::Auto,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("an HTML page"), "{e}");
        // Declared XML: parsed as XML, whose error explains.
        let e = parse_body(
            b"<html><body><p>oops</body></html>",
            Some("text/html"),
            Format::Xml,
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("not valid XML: "), "{e}");
        // Anything else is tried as JSON, whose error explains.
        let e = parse_body(b"Service Unavailable", None, Format::Auto)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("not valid JSON: expected value at line 1 column 1"),
            "{e}"
        );
        assert_eq!(
            parse_body(b"42", None, Format::Auto).unwrap(),
            (json!(42), Format::Json)
        );
    }

    #[test]
    fn csv_with_quotes_commas_and_bom() {
        let body = [
            BOM,
            b"id,name,note\r\n1,\"Smith, Ann\",\"said \"\"hi\"\"\"\r\n2,Bob,\"two\nlines\"\r\n3,,\r\n".as_slice(),
        ]
        .concat();
        let (v, f) = parse_body(&body, None, Format::Csv).unwrap();
        assert_eq!(f, Format::Csv);
        assert_eq!(
            v,
            json!([
                {"id": "1", "name": "Smith, Ann", "note": "said \"hi\""},
                {"id": "2", "name": "Bob", "note": "two\nlines"},
                {"id": "3", "name": "", "note": ""},
            ])
        );
        // The BOM did not end up in the first column's name.
        assert_eq!(
            select(&v, "$[*].id"),
            vec![json!("1"), json!("2"), json!("3")]
        );
    }

    #[test]
    fn csv_empty_and_header_only() {
        assert_eq!(parse_body(b"", None, Format::Csv).unwrap().0, json!([]));
        assert_eq!(parse_body(BOM, None, Format::Csv).unwrap().0, json!([]));
        assert_eq!(
            parse_body(b"a,b\n", None, Format::Csv).unwrap().0,
            json!([])
        );
    }

    #[test]
    fn csv_ragged_row_is_an_error_naming_the_line() {
        let e = parse_body(b"a,b,c\n1,2,3\n4,5\n", None, Format::Csv)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "not valid CSV: line 3 has 2 fields, the header has 3");
        let e = parse_body(b"a,b\n1,2,3\n", None, Format::Csv)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "not valid CSV: line 2 has 3 fields, the header has 2");
    }

    #[test]
    fn csv_duplicate_header_is_an_error() {
        let e = parse_body(b"a,b,a\n1,2,3\n", None, Format::Csv)
            .unwrap_err()
            .to_string();
        assert!(e.contains("column name `a` appears more than once"), "{e}");
    }

    #[test]
    fn json_errors_say_json() {
        let e = parse_body(b"{\"a\": }", None, Format::Json)
            .unwrap_err()
            .to_string();
        assert_eq!(e, "not valid JSON: expected value at line 1 column 7");
    }

    #[test]
    fn link_next_among_several_links() {
        assert_eq!(
            link_next(r#"<https://a/x?page=2>; rel="next", <https://a/x?page=9>; rel="last""#),
            Some("https://a/x?page=2".to_string())
        );
        assert_eq!(
            link_next(r#"<https://a/x?page=1>; rel="first", <https://a/x?page=3>; rel="next""#),
            Some("https://a/x?page=3".to_string())
        );
    }

    #[test]
    fn link_next_unquoted_and_case_insensitive() {
        assert_eq!(
            link_next("<https://a/x?page=2>; rel=next"),
            Some("https://a/x?page=2".to_string())
        );
        assert_eq!(
            link_next("<https://a/x?page=2> ; REL = \"Next\""),
            Some("https://a/x?page=2".to_string())
        );
    }

    #[test]
    fn link_next_with_several_relation_types() {
        assert_eq!(
            link_next(r#"<https://a/x?page=1>; rel="prev next""#),
            Some("https://a/x?page=1".to_string())
        );
        // `nextish` is not `next`.
        assert_eq!(link_next(r#"<https://a/x>; rel="nextish prev""#), None);
    }

    #[test]
    fn link_next_none() {
        assert_eq!(
            link_next(r#"<https://a/x?page=1>; rel="prev", <https://a/x?page=9>; rel="last""#),
            None
        );
        assert_eq!(link_next(""), None);
        assert_eq!(link_next("garbage"), None);
        assert_eq!(link_next("<https://a/x?page=2"), None);
        // Only the first `rel` counts (RFC 8288 §3.3).
        assert_eq!(link_next(r#"<https://a/x>; rel="prev"; rel="next""#), None);
    }

    #[test]
    fn link_next_with_commas_and_semicolons_inside() {
        assert_eq!(
            link_next(
                r#"<https://a/x?ids=1,2;3>; rel="prev"; title="a, b; c", <https://a/x?ids=4,5;6&p=2>; title="x,y"; rel="next""#
            ),
            Some("https://a/x?ids=4,5;6&p=2".to_string())
        );
        // A quoted comma in an ignored parameter does not split the link.
        assert_eq!(
            link_next(r#"<https://a/1>; title="has, \"comma\""; rel=next"#),
            Some("https://a/1".to_string())
        );
        // Relative references are returned as written.
        assert_eq!(
            link_next("</x?page=2>; rel=\"next\""),
            Some("/x?page=2".to_string())
        );
    }
}
