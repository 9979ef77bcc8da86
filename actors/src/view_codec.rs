//! How a view is stored and sent to the changelog: a format byte, then the view in postcard's
//! compact binary encoding, where payload fields stay the JSON text they arrived as. Encoding
//! and decoding it costs a fraction of JSON's; views stored as JSON by earlier versions are
//! still read. The HTTP API serves views as JSON whatever the store holds.

use serde::{Deserialize, Serialize};

use crate::aggregate::{Aggregate, Section};
use crate::figure::Figure;
use crate::json_fields::figures_as_text;
use crate::name::Name;
use crate::small_map::SmallMap;

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

/// Encodes `view` in the binary format: as postcard encodes the [`Aggregate`], its sections
/// still as stored copied as they are.
pub fn encode(view: &Aggregate) -> Result<Vec<u8>, ViewCodecError> {
    let mut out = Vec::with_capacity(1024);
    out.push(BINARY_V1);
    let mut ser = postcard::Serializer {
        output: VecOutput(out),
    };
    encode_fields(view, &mut ser).map_err(ViewCodecError::Encode)?;
    Ok(ser.output.0)
}

/// The view's fields in declaration order, as `#[derive(Serialize)]` writes them: a struct and a
/// tuple are their fields one after the other, a map its length and its pairs.
fn encode_fields(
    view: &Aggregate,
    ser: &mut postcard::Serializer<VecOutput>,
) -> postcard::Result<()> {
    (
        &view.key,
        view.partition,
        view.events_applied,
        view.updated_at_ms,
    )
        .serialize(&mut *ser)?;
    view.sources.len().serialize(&mut *ser)?;
    for (name, section) in view.sources.iter() {
        name.serialize(&mut *ser)?;
        section.put_binary(ser)?;
    }
    view.counters.serialize(&mut *ser)?;
    figures_as_text::serialize(&view.figures, &mut *ser)
}

thread_local! {
    /// The bytes of the part being encoded by [`encode_part`]: a part is copied out at its exact
    /// length, so that the buffer's spare room is not kept with every view.
    static PART: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Encodes one part of a view (a section) as postcard does, into one allocation of its exact
/// length.
pub(crate) fn encode_part<T: Serialize>(part: &T) -> postcard::Result<Box<[u8]>> {
    encode_part_with(|ser| part.serialize(ser))
}

/// [`encode_part`] for a part that `write` writes itself (copying bytes already encoded).
pub(crate) fn encode_part_with(
    write: impl FnOnce(&mut postcard::Serializer<VecOutput>) -> postcard::Result<()>,
) -> postcard::Result<Box<[u8]>> {
    PART.with_borrow_mut(|buffer| {
        buffer.clear();
        let mut ser = postcard::Serializer {
            output: VecOutput(std::mem::take(buffer)),
        };
        let written = write(&mut ser);
        *buffer = ser.output.0;
        written.map(|()| buffer.as_slice().into())
    })
}

/// postcard's output into a vector a slice at a time: its `to_io` makes every byte a call to
/// `memcpy` and its `to_extend` copies byte by byte, which made most of the encoding's time.
pub(crate) struct VecOutput(Vec<u8>);

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

/// Decodes a view in the binary format, or in JSON as earlier versions stored it. Sections of a
/// binary view are checked and kept as stored ([`Section::Encoded`]).
pub fn decode(bytes: &[u8]) -> Result<Aggregate, ViewCodecError> {
    match bytes.first() {
        Some(&BINARY_V1) => decode_fields(&bytes[1..]).map_err(ViewCodecError::Binary),
        Some(b'{') => serde_json::from_slice(bytes).map_err(ViewCodecError::Json),
        Some(&other) => Err(ViewCodecError::Format(other)),
        None => Err(ViewCodecError::Empty),
    }
}

/// The figures as [`encode_fields`] writes them.
#[derive(Deserialize)]
struct Figures(#[serde(with = "crate::json_fields::figures_as_text")] SmallMap<Name, Figure>);

/// Reads what [`encode_fields`] wrote.
fn decode_fields(bytes: &[u8]) -> postcard::Result<Aggregate> {
    let ((key, partition, events_applied, updated_at_ms), mut rest) =
        postcard::take_from_bytes::<(String, i32, u64, i64)>(bytes)?;
    let (count, after) = postcard::take_from_bytes::<usize>(rest)?;
    rest = after;
    let mut sources = SmallMap::for_reading(count);
    for _ in 0..count {
        let (name, after) = postcard::take_from_bytes::<Name>(rest)?;
        let (section, after) = Section::take_binary(after)?;
        rest = after;
        sources.push_read(name, section);
    }
    let (counters, rest) = postcard::take_from_bytes(rest)?;
    let (Figures(figures), _) = postcard::take_from_bytes(rest)?;
    Ok(Aggregate {
        key,
        partition,
        events_applied,
        updated_at_ms,
        sources,
        counters,
        figures,
    })
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
            }
            .into(),
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
            }
            .into(),
        );
        view.counters.insert("ORDER_CREATED".into(), 3);
        view.figures
            .insert("order_total".into(), json!(442.25).into());
        view.figures
            .insert("rating".into(), json!({"avg": 1, "count": 1}).into());
        view.figures
            .insert("recent_orders".into(), json!(["ORD1", "ORD2"]).into());
        view.figures.insert("last".into(), json!(null).into());
        view.figures.insert("big".into(), json!(u64::MAX).into());
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
        sources: std::collections::BTreeMap<&'a str, &'a Section>,
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
                .map(|(k, v)| (k.as_str(), v.json_text().into_owned()))
                .collect(),
        };
        let mut bytes = vec![BINARY_V1];
        bytes.extend(postcard::to_allocvec(&before).expect("encodes"));
        assert_eq!(encode(&view).expect("encodes"), bytes);
        assert_eq!(decode(&bytes).expect("decodes"), view);
    }

    #[test]
    fn a_view_read_back_keeps_its_sections_as_stored_until_one_changes() {
        let mut view = view();
        let bytes = encode(&view).expect("encodes");
        let mut read = decode(&bytes).expect("decodes");
        assert!(read
            .sources
            .values()
            .all(|s| matches!(s, Section::Encoded(_))));
        assert!(read
            .figures
            .values()
            .all(|f| matches!(f, Figure::Stored(_))));
        assert_eq!(encode(&read).expect("encodes"), bytes, "copied as stored");
        for v in [&mut view, &mut read] {
            let section = v.sources.get_mut("review-service").expect("section");
            section.get_mut().expect("decodes").offset = 1455;
        }
        assert!(matches!(
            read.sources.get("order-service"),
            Some(Section::Encoded(_))
        ));
        assert!(matches!(
            read.sources.get("review-service"),
            Some(Section::Decoded(_))
        ));
        assert_eq!(
            encode(&read).expect("encodes"),
            encode(&view).expect("encodes")
        );
        assert_eq!(read, view);
        assert_eq!(
            serde_json::to_value(&read).expect("json"),
            serde_json::to_value(&view).expect("json"),
            "the API serves stored sections decoded"
        );
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
