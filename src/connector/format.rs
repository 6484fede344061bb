//! Placeholder, replaced by the format branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    #[default]
    Auto,
    Json,
    Xml,
    Csv,
}
pub fn parse_body(
    bytes: &[u8],
    _content_type: Option<&str>,
    _format: Format,
) -> Result<(serde_json::Value, Format), String> {
    serde_json::from_slice(bytes)
        .map(|v| (v, Format::Json))
        .map_err(|e| format!("not valid JSON: {e}"))
}
pub fn link_next(_header: &str) -> Option<String> {
    None
}
