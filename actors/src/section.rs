//! A view's section: the latest state one source transferred about the entity. Between events a
//! view holds each section as its stored bytes: read back from the store, or encoded again once
//! an event of its source has changed it (`settle`). Loading a view decodes none of its
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

/// A [`SourceSection`] as stored, checked without building it: the same fields in the same
/// order, strings borrowed and payload fields skipped. It must follow `SourceSection` field for
/// field (the tests below pin it).
#[derive(Deserialize)]
struct SectionShape<'a> {
    #[serde(borrow)]
    _code: &'a str,
    #[serde(borrow)]
    _message_id: &'a str,
    _partition: i32,
    _offset: i64,
    _timestamp_ms: i64,
    #[serde(borrow)]
    _state: FieldsShape<'a>,
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

    /// Reads a section's binary encoding off the front of `bytes`, keeping it as it is once its
    /// shape is checked; returns it and the bytes after it.
    pub(crate) fn take_binary(bytes: &[u8]) -> postcard::Result<(Section, &[u8])> {
        let (_, rest) = postcard::take_from_bytes::<SectionShape>(bytes)?;
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
/// [`Section::put_binary`] and copies stored bytes instead).
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
