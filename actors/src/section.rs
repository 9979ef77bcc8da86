//! A view's section: the latest state one source transferred about the entity. Between events a
//! view holds each section as its stored bytes: read back from the store, or built from them and
//! the event's payload when an event of its source changes it (`folded`; decoded, changed and
//! encoded again only where that cannot be done: `settle`). Loading a view decodes none of its
//! sections, writing it copies them whole, and a live view takes about its stored size.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::json_fields::{Fields, FieldsShape};
use crate::name::Name;

/// The latest state one source transferred about the entity.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceSection {
    /// Code of the last event applied from this source.
    pub code: Name,
    /// Message id of that event.
    pub message_id: String,
    /// Partition it was read from.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its time in milliseconds since the epoch.
    pub timestamp_ms: i64,
    /// The payload fields transferred so far, later events overwriting earlier ones field by field.
    pub state: Fields,
}

/// A [`SourceSection`] as stored, read without building it: its head borrowed and its payload
/// fields as `S` reads them (skipped to check the shape). postcard writes a struct as its fields
/// one after the other, so a head and a state encode as `SourceSection`'s fields do (the tests
/// below pin it): an event's fold reads the head, then the state's fields as stored
/// (`json_fields::take_stored_fields`), and writes them so too.
#[derive(Deserialize)]
struct StoredSection<'a, S> {
    #[serde(borrow)]
    _head: SectionHead<'a>,
    _state: S,
}

/// What an event sets in its source's section besides the payload fields: `SourceSection`'s
/// fields before its state, in their order.
#[derive(Deserialize, Serialize)]
pub(crate) struct SectionHead<'a> {
    /// The event's code.
    pub code: &'a str,
    /// Its message id.
    pub message_id: &'a str,
    /// The partition it was read from.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its time in milliseconds since the epoch.
    pub timestamp_ms: i64,
}

/// A section of a view: as stored (the binary encoding of a [`SourceSection`], checked to be
/// well formed when read), or decoded.
#[derive(Clone, Debug)]
pub enum Section {
    /// The section's binary encoding, as the store held it.
    Encoded(Box<[u8]>),
    /// The section, decoded (boxed: a view's map of sections sizes every entry for it).
    Decoded(Box<SourceSection>),
}

/// Why a stored section does not decode (its bytes are damaged).
#[derive(Debug, thiserror::Error)]
#[error("a stored section of the view does not decode: {0}")]
pub struct SectionDecodeError(#[from] postcard::Error);

impl Section {
    /// The section, decoded if it is still as stored.
    pub fn get(&self) -> Result<Cow<'_, SourceSection>, SectionDecodeError> {
        match self {
            Section::Decoded(section) => Ok(Cow::Borrowed(section.as_ref())),
            Section::Encoded(bytes) => Ok(Cow::Owned(postcard::from_bytes(bytes)?)),
        }
    }

    /// The section to change, decoded in place first if it is still as stored.
    pub fn get_mut(&mut self) -> Result<&mut SourceSection, SectionDecodeError> {
        if let Section::Encoded(bytes) = self {
            *self = Section::Decoded(Box::new(postcard::from_bytes(bytes)?));
        }
        match self {
            Section::Decoded(section) => Ok(section),
            Section::Encoded(_) => unreachable!("decoded just above"),
        }
    }

    /// Encodes a decoded section back to its stored form: a view at rest holds each section as
    /// one allocation of its bytes (decoded, it holds one per payload field and its spare room),
    /// and writing it copies them. A section that does not encode stays decoded.
    pub fn settle(&mut self) {
        if let Section::Decoded(section) = self {
            if let Ok(bytes) = crate::view_codec::encode_part(section) {
                *self = Section::Encoded(bytes);
            }
        }
    }

    /// The stored form of `section` (`None`: the source has none yet) after an event with
    /// `head` and `payload`, built from the stored bytes without decoding them: its payload
    /// fields merged as [`Fields::merge`] merges them, the stored fields kept copied as they are.
    /// `Ok(None)` when it cannot be built so (the section is decoded, or its stored fields are
    /// out of order): the section is then changed decoded. An error if the stored bytes are cut
    /// short or malformed (their strings were checked when the section was read).
    pub(crate) fn folded(
        section: Option<&Section>,
        head: &SectionHead<'_>,
        payload: &Fields,
    ) -> Result<Option<Box<[u8]>>, SectionDecodeError> {
        let stored = match section {
            Some(Section::Encoded(bytes)) => {
                let (_, state) = postcard::take_from_bytes::<SectionHead>(bytes)?;
                Some(crate::json_fields::take_stored_fields(state)?)
            }
            Some(Section::Decoded(_)) => return Ok(None),
            None => None,
        };
        let Some(merged) = payload.merged_over(stored) else {
            return Ok(None);
        };
        // Strings and integers always encode; should they not, the section is changed decoded.
        let written = crate::view_codec::encode_part_with(|ser| {
            head.serialize(&mut *ser)?;
            merged.write(ser)
        });
        Ok(written.ok())
    }

    /// Reads a section's binary encoding off the front of `bytes`, keeping it as it is once its
    /// shape is checked; returns it and the bytes after it.
    pub(crate) fn take_binary(bytes: &[u8]) -> postcard::Result<(Section, &[u8])> {
        let (_, rest) = postcard::take_from_bytes::<StoredSection<FieldsShape>>(bytes)?;
        let encoded = &bytes[..bytes.len() - rest.len()];
        Ok((Section::Encoded(encoded.into()), rest))
    }

    /// Writes the section's binary encoding: the stored bytes as they are, or the section
    /// encoded.
    pub(crate) fn put_binary<F: postcard::ser_flavors::Flavor>(
        &self,
        serializer: &mut postcard::Serializer<F>,
    ) -> postcard::Result<()> {
        match self {
            Section::Encoded(bytes) => serializer.output.try_extend(bytes),
            Section::Decoded(section) => section.serialize(serializer),
        }
    }
}

impl From<SourceSection> for Section {
    fn from(section: SourceSection) -> Self {
        Section::Decoded(Box::new(section))
    }
}

/// Equal when they hold the same section, stored or decoded; a section that does not decode
/// equals only the same bytes.
impl PartialEq for Section {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Section::Encoded(a), Section::Encoded(b)) if a == b => true,
            _ => match (self.get(), other.get()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            },
        }
    }
}

/// Written as the [`SourceSection`] it holds (the store's binary form goes through
/// `Section::put_binary` and copies stored bytes instead).
impl Serialize for Section {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.get()
            .map_err(serde::ser::Error::custom)?
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Section {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        SourceSection::deserialize(deserializer).map(|section| Section::Decoded(Box::new(section)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json_fields::FieldsText;

    /// A section written from borrowed parts, encoding to the bytes of the `SourceSection` it
    /// stands for (see [`StoredSection`]).
    #[derive(Serialize)]
    struct SectionText<'a, S> {
        head: &'a SectionHead<'a>,
        state: S,
    }

    fn section(state: &str) -> SourceSection {
        SourceSection {
            code: "ORDER_CREATED".into(),
            message_id: "93b8f927".into(),
            partition: 3,
            offset: 2247,
            timestamp_ms: -1_790_813_452_370,
            state: serde_json::from_str(state).expect("json"),
        }
    }

    /// Sections of every shape of state: an object, an empty one, anything else.
    fn sections() -> Vec<SourceSection> {
        [
            r#"{"address":{"city":"Hanoi","street":"354 \"Main\" St"},"total":118.0,"é":[1,"é"]}"#,
            "{}",
            "[1, 2]",
            "null",
            "\"text\"",
        ]
        .into_iter()
        .map(section)
        .collect()
    }

    #[test]
    fn a_stored_section_is_taken_whole_and_decodes_to_what_was_written() {
        for written in sections() {
            let mut bytes = postcard::to_allocvec(&written).expect("encodes");
            bytes.extend_from_slice(b"after");
            let (taken, rest) = Section::take_binary(&bytes).expect("well formed");
            assert_eq!(rest, b"after", "the shape reads exactly the section");
            assert!(matches!(&taken, Section::Encoded(b) if b.len() == bytes.len() - 5));
            assert_eq!(*taken.get().expect("decodes"), written);
            assert_eq!(taken, Section::from(written.clone()));
            let mut changed = taken.clone();
            changed.get_mut().expect("decodes").offset += 1;
            assert!(matches!(changed, Section::Decoded(_)));
            assert_ne!(changed, taken);
        }
    }

    #[test]
    fn stored_bytes_are_written_back_as_they_are() {
        for written in sections() {
            let bytes = postcard::to_allocvec(&written).expect("encodes");
            let (taken, _) = Section::take_binary(&bytes).expect("well formed");
            let mut out = postcard::Serializer {
                output: postcard::ser_flavors::StdVec::new(),
            };
            taken.put_binary(&mut out).expect("writes");
            Section::from(written).put_binary(&mut out).expect("writes");
            let out = postcard::ser_flavors::Flavor::finalize(out.output).expect("finalizes");
            assert_eq!(out, [bytes.clone(), bytes].concat());
        }
    }

    fn fields(text: &str) -> Fields {
        serde_json::from_str(text).expect("json")
    }

    const HEAD: SectionHead<'static> = SectionHead {
        code: "ORDER_PAID",
        message_id: "a0c1",
        partition: 5,
        offset: 90_210,
        timestamp_ms: 1_790_813_452_371,
    };

    /// What changing the decoded section writes: the payload merged over its fields.
    fn folded_decoded(stored: Option<&SourceSection>, payload: &Fields) -> Vec<u8> {
        let state = match stored {
            Some(stored) => stored.state.clone().merge(payload.clone()),
            None => payload.clone(),
        };
        postcard::to_allocvec(&SourceSection {
            code: HEAD.code.into(),
            message_id: HEAD.message_id.into(),
            partition: HEAD.partition,
            offset: HEAD.offset,
            timestamp_ms: HEAD.timestamp_ms,
            state,
        })
        .expect("encodes")
    }

    #[test]
    fn folding_stored_bytes_writes_what_changing_the_decoded_section_writes() {
        let texts = [
            r#"{"total":3.5,"zz":null,"address":[1],"a":"x"}"#,
            r#"{"é":{"k":1}}"#,
            "{}",
            "[3]",
            "7",
        ];
        // Each payload read alone, and as an envelope holds it (spans of the envelope's text).
        let as_read = |text: &str| {
            crate::envelope::Envelope::from_text(&format!(r#"{{"code": "C", "payload": {text}}}"#))
                .expect("an envelope")
                .payload
                .expect("a payload")
        };
        let payloads = texts.map(fields).into_iter().chain(texts.map(as_read));
        for payload in &payloads.collect::<Vec<_>>() {
            for stored in sections() {
                let section = Section::Encoded(postcard::to_allocvec(&stored).expect("a").into());
                let folded = Section::folded(Some(&section), &HEAD, payload)
                    .expect("well formed")
                    .expect("in key order");
                assert_eq!(
                    *folded,
                    folded_decoded(Some(&stored), payload),
                    "{stored:?}"
                );
            }
            let new = Section::folded(None, &HEAD, payload).expect("nothing to read");
            assert_eq!(*new.expect("built"), folded_decoded(None, payload));
        }
    }

    #[test]
    fn a_stored_section_out_of_key_order_is_changed_decoded() {
        let text = SectionText {
            head: &SectionHead {
                code: "ORDER_CREATED",
                message_id: "93b8f927",
                partition: 3,
                offset: 2247,
                timestamp_ms: 0,
            },
            state: FieldsText::Object(vec![("total", "2"), ("address", "{}")]),
        };
        let section = Section::Encoded(postcard::to_allocvec(&text).expect("encodes").into());
        let payload = fields(r#"{"total":3}"#);
        assert!(Section::folded(Some(&section), &HEAD, &payload)
            .expect("well formed")
            .is_none());
        let decoded = section.get().expect("decodes");
        assert_eq!(decoded.state, fields(r#"{"address":{},"total":2}"#));
    }

    #[test]
    fn folding_damaged_stored_bytes_is_an_error() {
        let bytes = postcard::to_allocvec(&sections()[0]).expect("encodes");
        let payload = fields(r#"{"total":3}"#);
        for cut in [1, bytes.len() / 2, bytes.len() - 1] {
            let section = Section::Encoded(bytes[..cut].into());
            assert!(
                Section::folded(Some(&section), &HEAD, &payload).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_damaged_section_is_refused_when_read() {
        let bytes = postcard::to_allocvec(&sections()[0]).expect("encodes");
        for cut in [1, bytes.len() / 2, bytes.len() - 1] {
            assert!(Section::take_binary(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_utf8 = bytes.clone();
        // The code's first byte (after its length).
        bad_utf8[1] = 0xff;
        assert!(Section::take_binary(&bad_utf8).is_err());
    }

    #[test]
    fn a_section_whose_payload_is_not_json_is_an_error_when_decoded() {
        let mut bytes = postcard::to_allocvec(&section("[1]")).expect("encodes");
        let at = bytes.len() - 3;
        assert_eq!(&bytes[at..], b"[1]");
        bytes[at..].copy_from_slice(b"[1,");
        let (mut taken, _) = Section::take_binary(&bytes).expect("well formed");
        let err = taken.get_mut().expect_err("not JSON");
        assert!(err.to_string().contains("does not decode"), "{err}");
    }
}
