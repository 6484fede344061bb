//! Columnar listings: an object of parallel arrays (SEC EDGAR's
//! `filings.recent`: `{"accessionNumber": [...], "form": [...], ...}`)
//! turned into one object per row, so that each row is an item like any
//! other (`columnar: true`). Pure.

use serde_json::{Map, Value};

/// The rows of an object of columns: row `i` has each array field's
/// `i`-th entry under the field's name. A field that is not an array is
/// the same in every row (a shared value, not a column). Columns of
/// different lengths give as many rows as the longest, with `null` where a
/// shorter one has no entry: misaligned data stays visible in the items
/// rather than shifting one column against another.
///
/// A node that is not an object is not columns: it is one item as is.
pub fn rows(node: &Value) -> Vec<Value> {
    let Value::Object(columns) = node else {
        return vec![node.clone()];
    };
    let len = columns
        .values()
        .filter_map(Value::as_array)
        .map(Vec::len)
        .max()
        .unwrap_or(0);
    (0..len)
        .map(|i| {
            let row: Map<String, Value> = columns
                .iter()
                .map(|(k, v)| {
                    let cell = match v {
                        Value::Array(a) => a.get(i).cloned().unwrap_or(Value::Null),
                        shared => shared.clone(),
                    };
                    (k.clone(), cell)
                })
                .collect();
            Value::Object(row)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parallel_arrays_become_rows_in_order() {
        let recent = json!({
            "accessionNumber": ["0000320193-26-000110", "0000320193-26-000109"],
            "form": ["8-K", "10-Q"],
            "filingDate": ["2026-11-28", "2026-11-01"],
        });
        assert_eq!(
            rows(&recent),
            [
                json!({"accessionNumber": "0000320193-26-000110", "form": "8-K", "filingDate": "2026-11-28"}),
                json!({"accessionNumber": "0000320193-26-000109", "form": "10-Q", "filingDate": "2026-11-01"}),
            ]
        );
    }

    #[test]
    fn shared_fields_repeat_and_short_columns_give_null() {
        let cols = json!({"id": [1, 2, 3], "name": ["a"], "source": "edgar"});
        assert_eq!(
            rows(&cols),
            [
                json!({"id": 1, "name": "a", "source": "edgar"}),
                json!({"id": 2, "name": null, "source": "edgar"}),
                json!({"id": 3, "name": null, "source": "edgar"}),
            ]
        );
    }

    #[test]
    fn no_columns_no_rows_and_a_non_object_is_one_item() {
        assert!(rows(&json!({})).is_empty());
        assert!(rows(&json!({"id": [], "form": []})).is_empty());
        assert!(rows(&json!({"count": 3})).is_empty());
        assert_eq!(rows(&json!("x")), [json!("x")]);
        assert_eq!(rows(&json!([1, 2])), [json!([1, 2])]);
    }
}
