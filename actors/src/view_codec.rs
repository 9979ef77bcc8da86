//! How a view is stored and sent to the changelog: a format byte, then the view in postcard's
//! compact binary encoding, where payload fields stay the JSON text they arrived as. Encoding
//! and decoding it costs a fraction of JSON's; views stored as JSON by earlier versions are
//! still read. The HTTP API serves views as JSON whatever the store holds.

use crate::aggregate::Aggregate;

/// First byte of a view in the binary encoding; JSON text never starts with it.
const BINARY_V1: u8 = 1;

/// Why a view could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ViewCodecError {
    /// The view could not be encoded.
    #[error("encoding the view: {0}")]
    Encode(postcard::Error),
    /// A binary view does not decode.
    #[error("binary view does not decode: {0}")]
    Binary(postcard::Error),
    /// A view stored as JSON does not decode.
    #[error("JSON view does not decode: {0}")]
    Json(serde_json::Error),
    /// The value starts with a byte that names no format.
    #[error("unknown view format (first byte {0:#04x})")]
    Format(u8),
    /// The value is empty.
    #[error("the stored view is empty")]
    Empty,
}

/// Encodes `view` in the binary format.
pub fn encode(view: &Aggregate) -> Result<Vec<u8>, ViewCodecError> {
    let mut out = Vec::with_capacity(1024);
    out.push(BINARY_V1);
    postcard::serialize_with_flavor(view, VecOutput(out)).map_err(ViewCodecError::Encode)
}

/// postcard's output into a vector a slice at a time: its `to_io` makes every byte a call to
/// `memcpy` and its `to_extend` copies byte by byte, which made most of the encoding's time.
struct VecOutput(Vec<u8>);

impl postcard::ser_flavors::Flavor for VecOutput {
    type Output = Vec<u8>;

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

/// Decodes a view in the binary format, or in JSON as earlier versions stored it.
pub fn decode(bytes: &[u8]) -> Result<Aggregate, ViewCodecError> {
    match bytes.first() {
        Some(&BINARY_V1) => postcard::from_bytes(&bytes[1..]).map_err(ViewCodecError::Binary),
        Some(b'{') => serde_json::from_slice(bytes).map_err(ViewCodecError::Json),
        Some(&other) => Err(ViewCodecError::Format(other)),
        None => Err(ViewCodecError::Empty),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::SourceSection;
    use crate::json_fields::Fields;
    use serde_json::json;

    fn view() -> Aggregate {
        let mut view = Aggregate::new("C000042", 3);
        view.events_applied = 7;
        view.updated_at_ms = 1_790_813_452_370;
        let state: Fields = serde_json::from_str(
            r#"{"address":{"city":"Hanoi","street":"354 \"Main\" St"},"total":118.0,"tags":[1,"é"],"none":null}"#,
        )
        .expect("json");
        view.sources.insert(
            "order-service".into(),
            SourceSection {
                code: "ORDER_CREATED".into(),
                message_id: "93b8f927".into(),
                partition: 3,
                offset: 2247,
                timestamp_ms: 1_790_813_452_370,
                state,
            },
        );
        view.sources.insert(
            "review-service".into(),
            SourceSection {
                code: "REVIEW_POSTED".into(),
                message_id: "0547".into(),
                partition: 3,
                offset: 1454,
                timestamp_ms: -1,
                state: serde_json::from_str("[1, 2]").expect("json"),
            },
        );
        view.counters.insert("ORDER_CREATED".into(), 3);
        view.figures.insert("order_total".into(), json!(442.25));
        view.figures
            .insert("rating".into(), json!({"avg": 1, "count": 1}));
        view.figures
            .insert("recent_orders".into(), json!(["ORD1", "ORD2"]));
        view.figures.insert("last".into(), json!(null));
        view.figures.insert("big".into(), json!(u64::MAX));
        view
    }

    #[test]
    fn a_view_reads_back_as_it_was_written_and_smaller_than_json() {
        let view = view();
        let bytes = encode(&view).expect("encodes");
        assert_eq!(bytes[0], BINARY_V1);
        assert_eq!(decode(&bytes).expect("decodes"), view);
        let json = serde_json::to_vec(&view).expect("json");
        assert!(
            bytes.len() < json.len(),
            "{} >= {}",
            bytes.len(),
            json.len()
        );
        // The API still serves the same JSON as before.
        let served = serde_json::to_value(decode(&bytes).expect("decodes")).expect("json");
        assert_eq!(served, serde_json::to_value(&view).expect("json"));
    }

    /// A view as the versions that kept its maps as B-tree maps encoded it.
    #[derive(serde::Serialize)]
    struct BTreeView<'a> {
        key: &'a str,
        partition: i32,
        events_applied: u64,
        updated_at_ms: i64,
        sources: std::collections::BTreeMap<&'a str, &'a SourceSection>,
        counters: std::collections::BTreeMap<&'a str, u64>,
        figures: Vec<(&'a str, String)>,
    }

    #[test]
    fn views_encode_exactly_as_when_their_maps_were_b_trees() {
        let view = view();
        let before = BTreeView {
            key: &view.key,
            partition: view.partition,
            events_applied: view.events_applied,
            updated_at_ms: view.updated_at_ms,
            sources: view.sources.iter().map(|(k, v)| (k.as_str(), v)).collect(),
            counters: view
                .counters
                .iter()
                .map(|(k, v)| (k.as_str(), *v))
                .collect(),
            figures: view
                .figures
                .iter()
                .map(|(k, v)| (k.as_str(), v.to_string()))
                .collect(),
        };
        let mut bytes = vec![BINARY_V1];
        bytes.extend(postcard::to_allocvec(&before).expect("encodes"));
        assert_eq!(encode(&view).expect("encodes"), bytes);
        assert_eq!(decode(&bytes).expect("decodes"), view);
    }

    #[test]
    fn views_stored_as_json_are_still_read() {
        let view = view();
        let json = serde_json::to_vec(&view).expect("json");
        assert_eq!(decode(&json).expect("decodes"), view);
    }

    #[test]
    fn a_damaged_value_is_an_error_that_says_what_it_found() {
        let bytes = encode(&view()).expect("encodes");
        assert!(matches!(
            decode(&bytes[..bytes.len() / 2]),
            Err(ViewCodecError::Binary(_))
        ));
        let err = decode(b"\x07abc").expect_err("unknown format");
        assert!(err.to_string().contains("0x07"), "{err}");
        assert!(matches!(decode(b""), Err(ViewCodecError::Empty)));
        assert!(matches!(
            decode(b"{\"key\":1}"),
            Err(ViewCodecError::Json(_))
        ));
    }
}
