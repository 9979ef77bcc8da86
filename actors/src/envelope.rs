//! Turns a raw record into an [`Event`] (the envelope of DESIGN §1), or into a [`Rejection`] that
//! says why it cannot be processed and goes to the dead-letter topic.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;

use crate::json_fields::{decode, first_token, span_of, value_at, Fields, SharedSeed, Span};
use crate::name::Name;
use crate::record::{Origin, Record, RecordValue};
use crate::rules::Rules;
use crate::small_map::SmallMap;

/// Header that carries the message id; it wins over `metadata.message_id`.
pub const MESSAGE_ID_HEADER: &str = "message_id";

/// Size limits applied while parsing.
#[derive(Clone, Copy, Debug)]
pub struct ParseLimits {
    /// Largest record value accepted, in bytes.
    pub max_value_bytes: usize,
    /// Longest entity key accepted, in bytes.
    pub max_key_bytes: usize,
}

/// What an event carries: a full envelope, or a tombstone that deletes the source's section.
#[derive(Clone, Debug, PartialEq)]
pub enum Body {
    /// The parsed envelope (`metadata`, `code`, `payload`).
    Envelope(Envelope),
    /// A record with a key and no value.
    Tombstone,
}

/// An envelope as parsed: its text, once, and its payload's fields and its other top-level fields
/// as spans of it, each decoded only where a rule or the key pointer reads it.
#[derive(Clone, Debug)]
pub struct Envelope {
    /// The payload; the fold moves it into the view, leaving `None` (as for an envelope without).
    pub payload: Option<Fields>,
    /// The envelope's JSON text, which `rest` and an object payload's fields are spans of.
    text: Arc<str>,
    /// The other top-level fields (`metadata`, `code`, ...), by name.
    rest: SmallMap<Name, Span>,
}

impl Envelope {
    /// Splits the JSON text of an envelope into its fields; a rejection if it is not JSON or not
    /// an object.
    pub fn from_text(text: &str) -> Result<Self, Rejection> {
        Self::from_shared(Arc::from(text))
    }

    /// The same, over a text the envelope shares (a record's value) instead of copying it.
    pub fn from_shared(text: Arc<str>) -> Result<Self, Rejection> {
        let mut deserializer = serde_json::Deserializer::from_str(&text);
        let parsed = serde::Deserializer::deserialize_map(
            &mut deserializer,
            EnvelopeVisitor { text: &text },
        )
        .and_then(|parsed| deserializer.end().map(|()| parsed));
        let (payload, rest) = parsed.map_err(|e| {
            // Decoded again only to tell bad JSON from JSON that is not an object.
            match serde_json::from_str::<Value>(&text) {
                Ok(Value::Object(_)) => Rejection::InvalidJson(e.to_string()),
                Ok(other) => Rejection::NotAnObject(json_type(&other)),
                Err(e) => Rejection::InvalidJson(e.to_string()),
            }
        })?;
        Ok(Envelope {
            payload,
            text,
            rest,
        })
    }

    /// The number at JSON pointer `pointer`, read from its text without decoding anything else,
    /// when the pointer names a top-level field or a field of an object payload (what a rule
    /// reads); `None` when it names something else or no number, which [`Envelope::pointer`]
    /// then tells apart. Equal to what `pointer` decodes.
    pub fn number_at(&self, pointer: &str) -> Option<f64> {
        let (name, rest) = first_token(pointer)?;
        let text = if rest.is_empty() {
            self.field(&name)?
        } else if name == "payload" {
            let (field, deeper) = first_token(rest)?;
            if !deeper.is_empty() {
                return None;
            }
            self.payload.as_ref()?.field_text(&field)?
        } else {
            return None;
        };
        crate::json_fields::json_number(text)
    }

    /// The JSON text of top-level field `name` (not the payload).
    fn field(&self, name: &str) -> Option<&str> {
        self.rest.get(name).map(|span| &self.text[span.clone()])
    }

    /// The value at JSON pointer `pointer` (RFC 6901) within the envelope, decoded; only the
    /// field the pointer enters is decoded.
    pub fn pointer(&self, pointer: &str) -> Option<Value> {
        if pointer.is_empty() {
            let mut whole: serde_json::Map<String, Value> = self
                .rest
                .iter()
                .map(|(name, span)| (name.to_string(), decode(&self.text[span.clone()])))
                .collect();
            if let Some(payload) = &self.payload {
                whole.insert("payload".into(), payload.to_value());
            }
            return Some(Value::Object(whole));
        }
        let (name, rest) = first_token(pointer)?;
        if name == "payload" {
            return self.payload.as_ref()?.pointer(rest);
        }
        value_at(self.field(name.as_ref())?, rest)
    }
}

/// Reads an envelope in one pass: the payload and the other top-level fields are taken as spans
/// of `text` (the text being read) as the object is read. Only an object is an envelope.
struct EnvelopeVisitor<'t> {
    text: &'t Arc<str>,
}

impl<'de> serde::de::Visitor<'de> for EnvelopeVisitor<'_> {
    type Value = (Option<Fields>, SmallMap<Name, Span>);

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an envelope object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut payload = None;
        // An envelope's code and metadata, appended in name order as written (see
        // `json_fields::read_spans`).
        let mut rest = SmallMap::with_capacity(2);
        while let Some(name) = map.next_key::<Name>()? {
            if name.as_str() == "payload" {
                payload = Some(map.next_value_seed(SharedSeed { text: self.text })?);
            } else {
                let raw = map.next_value::<&'de RawValue>()?;
                rest.push_read(name, span_of(self.text, raw.get()));
            }
        }
        Ok((payload, rest))
    }
}

/// Equal when they mean the same JSON, however the text was spaced.
impl PartialEq for Envelope {
    fn eq(&self, other: &Self) -> bool {
        self.pointer("") == other.pointer("")
    }
}

/// One parsed, routable event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Where the record came from.
    pub origin: Origin,
    /// Index of the source in [`Rules::sources`].
    pub source: usize,
    /// The entity key.
    pub key: String,
    /// The message id that deduplication keys on.
    pub message_id: String,
    /// The event code (`TOMBSTONE` for a tombstone).
    pub code: Name,
    /// The event's time in milliseconds since the epoch.
    pub timestamp_ms: i64,
    /// The envelope or tombstone.
    pub body: Body,
}

/// Code given to tombstones.
pub const TOMBSTONE_CODE: &str = "TOMBSTONE";

/// Why a record cannot be processed. `reason()` is the stable label used in dead-letter headers
/// and metrics; `Display` gives the detail with the offending value.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum Rejection {
    /// The topic belongs to no configured source.
    #[error("topic {0:?} belongs to no configured source")]
    UnknownSource(String),
    /// The value is larger than the configured limit.
    #[error("value is {size} bytes, over the limit of {limit}")]
    TooLarge {
        /// Size of the value.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// The value is not UTF-8.
    #[error("value is not valid UTF-8: {0}")]
    InvalidUtf8(String),
    /// The value is not JSON.
    #[error("value is not valid JSON: {0}")]
    InvalidJson(String),
    /// The value is JSON but not an object.
    #[error("envelope is a JSON {0}, not an object")]
    NotAnObject(&'static str),
    /// The envelope has no `metadata` object.
    #[error("envelope has no metadata object")]
    MissingMetadata,
    /// Neither header nor metadata carries a non-empty message id.
    #[error("no message id in the {MESSAGE_ID_HEADER} header or metadata.message_id")]
    MissingMessageId,
    /// The envelope has no non-empty `code` string.
    #[error("envelope has no code")]
    MissingCode,
    /// No entity key where the source says it is.
    #[error("no entity key: {0}")]
    MissingKey(String),
    /// The entity key is unusable.
    #[error("entity key is invalid: {0}")]
    BadKey(String),
    /// `metadata.service_name` names another service than the topic's source.
    #[error("metadata.service_name is {found:?} but topic's source is {expected:?}")]
    ServiceMismatch {
        /// The source configured for the topic.
        expected: String,
        /// The name the envelope gave.
        found: String,
    },
    /// `metadata.timestamp` does not parse as RFC 3339.
    #[error("metadata.timestamp {0:?} is not an RFC 3339 time")]
    BadTimestamp(String),
    /// A rule could not fold the event (after retries, where the fault was transient).
    #[error("rule failed: {0}")]
    RuleFailed(String),
}

impl Rejection {
    /// Stable short label of the reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::UnknownSource(_) => "unknown_source",
            Rejection::TooLarge { .. } => "too_large",
            Rejection::InvalidUtf8(_) => "invalid_utf8",
            Rejection::InvalidJson(_) => "invalid_json",
            Rejection::NotAnObject(_) => "not_an_object",
            Rejection::MissingMetadata => "missing_metadata",
            Rejection::MissingMessageId => "missing_message_id",
            Rejection::MissingCode => "missing_code",
            Rejection::MissingKey(_) => "missing_key",
            Rejection::BadKey(_) => "bad_key",
            Rejection::ServiceMismatch { .. } => "service_mismatch",
            Rejection::BadTimestamp(_) => "bad_timestamp",
            Rejection::RuleFailed(_) => "rule_failed",
        }
    }
}

/// Parses `record` against the configured sources.
pub fn parse(record: &Record, rules: &Rules, limits: &ParseLimits) -> Result<Event, Rejection> {
    let source = rules
        .source_for_topic(&record.origin.tp.topic)
        .ok_or_else(|| Rejection::UnknownSource(record.origin.tp.topic.to_string()))?;
    let header_id = match record.header(MESSAGE_ID_HEADER) {
        Some(raw) => Some(
            std::str::from_utf8(raw)
                .map_err(|e| Rejection::InvalidUtf8(format!("{MESSAGE_ID_HEADER} header: {e}")))?
                .to_string(),
        ),
        None => None,
    }
    .filter(|id| !id.is_empty());

    let Some(value) = &record.value else {
        let key = record_key(record, limits)?;
        let message_id = header_id
            .unwrap_or_else(|| format!("tombstone/{}/{}", record.origin.tp, record.origin.offset));
        return Ok(Event {
            origin: record.origin.clone(),
            source,
            key,
            message_id,
            code: Name::new(TOMBSTONE_CODE),
            timestamp_ms: record.timestamp_ms.unwrap_or(0),
            body: Body::Tombstone,
        });
    };
    if value.len() > limits.max_value_bytes {
        return Err(Rejection::TooLarge {
            size: value.len(),
            limit: limits.max_value_bytes,
        });
    }
    let text = match value {
        RecordValue::Text(text) => text.clone(),
        RecordValue::Bytes(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => Arc::from(text),
            Err(e) => return Err(Rejection::InvalidUtf8(e.to_string())),
        },
    };
    let envelope = Envelope::from_shared(text)?;
    let meta = envelope
        .field("metadata")
        .and_then(|text| serde_json::from_str::<Metadata>(text).ok())
        .ok_or(Rejection::MissingMetadata)?;
    let message_id = match header_id {
        Some(id) => id,
        None => match meta.message_id {
            Some(Field::Text(id)) if !id.is_empty() => id.into_owned(),
            _ => return Err(Rejection::MissingMessageId),
        },
    };
    let code = match envelope
        .field("code")
        .and_then(|text| serde_json::from_str::<Field>(text).ok())
    {
        Some(Field::Text(c)) if !c.is_empty() => Name::new(&c),
        _ => return Err(Rejection::MissingCode),
    };
    let src = rules.source(source);
    match &meta.service_name {
        None => {}
        Some(Field::Text(name)) if *name == src.name => {}
        Some(other) => {
            return Err(Rejection::ServiceMismatch {
                expected: src.name.clone(),
                found: other.to_string(),
            })
        }
    }
    let timestamp_ms = match &meta.timestamp {
        None => record.timestamp_ms.unwrap_or(0),
        Some(Field::Text(ts)) => chrono::DateTime::parse_from_rfc3339(ts)
            .map_err(|_| Rejection::BadTimestamp(ts.to_string()))?
            .timestamp_millis(),
        Some(other) => return Err(Rejection::BadTimestamp(other.to_string())),
    };
    let key = match &src.key_pointer {
        None => record_key(record, limits)?,
        Some(pointer) => match envelope.pointer(pointer) {
            Some(Value::String(k)) => check_key(k, limits)?,
            Some(Value::Number(n)) => n.to_string(),
            Some(other) => {
                return Err(Rejection::BadKey(format!(
                    "{pointer} is a JSON {}",
                    json_type(&other)
                )))
            }
            None => return Err(Rejection::MissingKey(format!("nothing at {pointer}"))),
        },
    };
    Ok(Event {
        origin: record.origin.clone(),
        source,
        key,
        message_id,
        code,
        timestamp_ms,
        body: Body::Envelope(envelope),
    })
}

/// The metadata fields the service reads (a `null` one as if absent), read from the metadata's
/// text without building a map of all of them; only an object is metadata, and a later field of
/// a name wins, as in a map.
#[derive(Default)]
struct Metadata<'a> {
    message_id: Option<Field<'a>>,
    service_name: Option<Field<'a>>,
    timestamp: Option<Field<'a>>,
}

/// An envelope field the service reads as text: a string, borrowed from the envelope's text
/// unless it has escapes, or any other JSON value, kept to be named in a rejection.
#[derive(Debug, PartialEq)]
enum Field<'a> {
    Text(Cow<'a, str>),
    Other(Value),
}

/// As a rejection names it: a string as it is, anything else as JSON.
impl std::fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Text(text) => f.write_str(text),
            Field::Other(value) => write!(f, "{value}"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Field<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor;

        impl<'de> serde::de::Visitor<'de> for FieldVisitor {
            type Value = Field<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_borrowed_str<E>(self, text: &'de str) -> Result<Field<'de>, E> {
                Ok(Field::Text(Cow::Borrowed(text)))
            }

            fn visit_str<E>(self, text: &str) -> Result<Field<'de>, E> {
                Ok(Field::Text(Cow::Owned(text.to_string())))
            }

            fn visit_string<E>(self, text: String) -> Result<Field<'de>, E> {
                Ok(Field::Text(Cow::Owned(text)))
            }

            fn visit_bool<E>(self, v: bool) -> Result<Field<'de>, E> {
                Ok(Field::Other(Value::Bool(v)))
            }

            fn visit_i64<E>(self, v: i64) -> Result<Field<'de>, E> {
                Ok(Field::Other(Value::from(v)))
            }

            fn visit_u64<E>(self, v: u64) -> Result<Field<'de>, E> {
                Ok(Field::Other(Value::from(v)))
            }

            fn visit_f64<E>(self, v: f64) -> Result<Field<'de>, E> {
                Ok(Field::Other(Value::from(v)))
            }

            fn visit_unit<E>(self) -> Result<Field<'de>, E> {
                Ok(Field::Other(Value::Null))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<Field<'de>, A::Error> {
                Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(Field::Other)
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Field<'de>, A::Error> {
                Value::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(Field::Other)
            }
        }

        deserializer.deserialize_any(FieldVisitor)
    }
}

/// A metadata field's name: one the service reads, or another.
enum MetadataKey {
    MessageId,
    ServiceName,
    Timestamp,
    Other,
}

impl<'de> serde::Deserialize<'de> for MetadataKey {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = MetadataKey;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }

            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<MetadataKey, E> {
                Ok(match name {
                    "message_id" => MetadataKey::MessageId,
                    "service_name" => MetadataKey::ServiceName,
                    "timestamp" => MetadataKey::Timestamp,
                    _ => MetadataKey::Other,
                })
            }
        }

        deserializer.deserialize_identifier(KeyVisitor)
    }
}

impl<'de> serde::Deserialize<'de> for Metadata<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MetadataVisitor;

        impl<'de> serde::de::Visitor<'de> for MetadataVisitor {
            type Value = Metadata<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a metadata object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Metadata<'de>, A::Error> {
                let mut meta = Metadata::default();
                while let Some(key) = map.next_key::<MetadataKey>()? {
                    match key {
                        MetadataKey::MessageId => meta.message_id = map.next_value()?,
                        MetadataKey::ServiceName => meta.service_name = map.next_value()?,
                        MetadataKey::Timestamp => meta.timestamp = map.next_value()?,
                        MetadataKey::Other => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                    }
                }
                Ok(meta)
            }
        }

        deserializer.deserialize_map(MetadataVisitor)
    }
}

fn record_key(record: &Record, limits: &ParseLimits) -> Result<String, Rejection> {
    let raw = record
        .key
        .as_deref()
        .ok_or_else(|| Rejection::MissingKey("the record has no key".into()))?;
    let key = std::str::from_utf8(raw)
        .map_err(|e| Rejection::BadKey(format!("record key is not UTF-8: {e}")))?;
    check_key(key.to_string(), limits)
}

fn check_key(key: String, limits: &ParseLimits) -> Result<String, Rejection> {
    if key.is_empty() {
        return Err(Rejection::MissingKey("the key is empty".into()));
    }
    if key.len() > limits.max_key_bytes {
        return Err(Rejection::BadKey(format!(
            "{} bytes, over the limit of {}",
            key.len(),
            limits.max_key_bytes
        )));
    }
    if key.chars().any(char::is_control) {
        return Err(Rejection::BadKey(format!("{key:?} has control characters")));
    }
    Ok(key)
}

/// Name of a JSON value's type, for messages.
pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::TopicPartition;
    use crate::rules::SourceConfig;

    const LIMITS: ParseLimits = ParseLimits {
        max_value_bytes: 1024,
        max_key_bytes: 64,
    };

    fn rules(key_pointer: Option<&str>) -> Rules {
        Rules::new(
            vec![SourceConfig {
                name: "order-service".into(),
                topic: "orders".into(),
                key_pointer: key_pointer.map(Into::into),
                delete_codes: vec![],
            }],
            vec![],
        )
        .unwrap()
    }

    fn record(value: Option<&[u8]>, headers: Vec<(&str, &[u8])>) -> Record {
        Record {
            origin: Origin {
                tp: TopicPartition::new("orders", 1),
                offset: 7,
            },
            key: Some(b"C1".to_vec()),
            value: value.map(RecordValue::new),
            headers: headers
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
            timestamp_ms: Some(5),
            finished: Default::default(),
        }
    }

    const GOOD: &[u8] = br#"{"metadata":{"timestamp":"2026-10-01T12:00:00Z","message_id":"m1","service_name":"order-service"},"code":"ORDER_CREATED","payload":{"customer_id":"C9","total_amount":1.5}}"#;

    #[test]
    fn an_envelope_shares_its_records_text_and_bytes_that_are_not_utf8_are_rejected() {
        let r = record(Some(GOOD), vec![]);
        let e = parse(&r, &rules(None), &LIMITS).unwrap();
        let (Some(RecordValue::Text(value)), Body::Envelope(envelope)) = (&r.value, &e.body) else {
            panic!("a UTF-8 value parses into an envelope");
        };
        assert!(Arc::ptr_eq(value, &envelope.text), "not copied again");
        let bad = record(Some(&[b'{', 0xff, b'}']), vec![]);
        assert!(matches!(
            parse(&bad, &rules(None), &LIMITS),
            Err(Rejection::InvalidUtf8(_))
        ));
    }

    #[test]
    fn metadata_is_read_as_a_map_would_be() {
        // Escaped names, fields it does not read (nested too), a later field of a name winning,
        // null as if absent.
        let value = br#"{"metadata":{"trace":{"id":[1,{"x":null}]},"message\u005fid":"first",
            "service_name":null,"message_id":"m2","timestamp":"2026-10-01T12:00:01Z","timestamp":null},
            "code":"ORDER_CREATED","payload":{}}"#;
        let event = parse(&record(Some(value), vec![]), &rules(None), &LIMITS).unwrap();
        assert_eq!(event.message_id, "m2");
        assert_eq!(
            event.timestamp_ms, 5,
            "the record's time when the metadata's is null"
        );
        let value =
            br#"{"metadata":{"message_id":"m","timestamp":"2026-10-01T12:00:01Z"},"code":"C"}"#;
        let event = parse(&record(Some(value), vec![]), &rules(None), &LIMITS).unwrap();
        assert_eq!(event.timestamp_ms, 1_790_856_001_000);
    }

    #[test]
    fn parses_a_good_envelope_with_record_key() {
        let e = parse(&record(Some(GOOD), vec![]), &rules(None), &LIMITS).unwrap();
        assert_eq!(e.key, "C1");
        assert_eq!(e.message_id, "m1");
        assert_eq!(e.code, "ORDER_CREATED");
        assert_eq!(e.timestamp_ms, 1_790_856_000_000);
    }

    #[test]
    fn header_message_id_wins_and_pointer_key_is_used() {
        let e = parse(
            &record(Some(GOOD), vec![("message_id", b"h1")]),
            &rules(Some("/payload/customer_id")),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(e.message_id, "h1");
        assert_eq!(e.key, "C9");
    }

    #[test]
    fn tombstone_gets_an_offset_based_id() {
        let e = parse(&record(None, vec![]), &rules(None), &LIMITS).unwrap();
        assert_eq!(e.body, Body::Tombstone);
        assert_eq!(e.message_id, "tombstone/orders[1]/7");
    }

    #[test]
    fn each_bad_input_gets_its_reason() {
        let cases: Vec<(&[u8], &str)> = vec![
            (b"\xff\xfe", "invalid_utf8"),
            (b"{not json", "invalid_json"),
            (b"[1,2]", "not_an_object"),
            (br#"{"code":"X"}"#, "missing_metadata"),
            (
                br#"{"metadata":{"message_id":""},"code":"X"}"#,
                "missing_message_id",
            ),
            (br#"{"metadata":{"message_id":"m"}}"#, "missing_code"),
            (
                br#"{"metadata":{"message_id":"m","service_name":"shop"},"code":"X"}"#,
                "service_mismatch",
            ),
            (
                br#"{"metadata":{"message_id":"m","timestamp":"yesterday"},"code":"X"}"#,
                "bad_timestamp",
            ),
            (br#"{"metadata":["m"],"code":"X"}"#, "missing_metadata"),
            (br#"{"metadata":"m","code":"X"}"#, "missing_metadata"),
            (
                br#"{"metadata":{"message_id":7},"code":"X"}"#,
                "missing_message_id",
            ),
            (
                br#"{"metadata":{"message_id":"m","service_name":7},"code":"X"}"#,
                "service_mismatch",
            ),
        ];
        for (value, reason) in cases {
            let err = parse(&record(Some(value), vec![]), &rules(None), &LIMITS).unwrap_err();
            assert_eq!(err.reason(), reason, "{}", String::from_utf8_lossy(value));
        }
        let big = vec![b' '; 2000];
        let err = parse(&record(Some(&big), vec![]), &rules(None), &LIMITS).unwrap_err();
        assert_eq!(
            err.to_string(),
            "value is 2000 bytes, over the limit of 1024"
        );
        let err = parse(
            &record(Some(GOOD), vec![]),
            &rules(Some("/payload/nope")),
            &LIMITS,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "missing_key");
    }

    #[test]
    fn fields_read_as_text_are_borrowed_unless_escaped_and_rejections_name_them() {
        let field = |json: &'static str| serde_json::from_str::<Field>(json).unwrap();
        assert!(matches!(field(r#""m1""#), Field::Text(Cow::Borrowed("m1"))));
        assert!(matches!(field(r#""m\u0031""#), Field::Text(Cow::Owned(t)) if t == "m1"));
        for (json, shown) in [
            ("7", "7"),
            ("true", "true"),
            (r#"{"a":[1]}"#, r#"{"a":[1]}"#),
        ] {
            assert_eq!(field(json).to_string(), shown);
        }
        // Escaped text reads as what it means; other types are named as JSON in the rejection.
        let value = br#"{"metadata":{"message_id":"m\u0031","service_name":"order\u002dservice"},
            "code":"ORDER\u005fCREATED"}"#;
        let event = parse(&record(Some(value), vec![]), &rules(None), &LIMITS).unwrap();
        assert_eq!(
            (event.message_id.as_str(), event.code.as_str()),
            ("m1", "ORDER_CREATED")
        );
        let detail = |value: &[u8]| {
            parse(&record(Some(value), vec![]), &rules(None), &LIMITS)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            detail(br#"{"metadata":{"message_id":"m","service_name":{"a":1}},"code":"X"}"#),
            r#"metadata.service_name is "{\"a\":1}" but topic's source is "order-service""#
        );
        assert_eq!(
            detail(br#"{"metadata":{"message_id":"m","service_name":"shop"},"code":"X"}"#),
            r#"metadata.service_name is "shop" but topic's source is "order-service""#
        );
        assert_eq!(
            detail(br#"{"metadata":{"message_id":"m","timestamp":[1]},"code":"X"}"#),
            r#"metadata.timestamp "[1]" is not an RFC 3339 time"#
        );
        assert_eq!(
            detail(br#"{"metadata":{"message_id":"m","timestamp":"soon"},"code":"X"}"#),
            r#"metadata.timestamp "soon" is not an RFC 3339 time"#
        );
        assert_eq!(
            detail(br#"{"metadata":{"message_id":"m"},"code":7}"#),
            "envelope has no code"
        );
    }

    #[test]
    fn the_payload_is_read_as_spans_of_the_envelope_meaning_what_it_alone_means() {
        // Spacing, escapes in names and values, nesting, a later field of a name winning.
        let payload =
            r#"{ "b" : [1, {"c": "x\"y"}], "a\u0062c": 1.5e3, "b": {"z": null}, "d":"é" }"#;
        let text =
            format!(r#"{{"code":"C", "payload": {payload}, "metadata" : {{"message_id":"m"}}}}"#);
        let envelope = Envelope::from_text(&text).unwrap();
        let Some(Fields::Shared(_)) = &envelope.payload else {
            panic!("an object payload is held as spans: {:?}", envelope.payload);
        };
        let alone: Fields = serde_json::from_str(payload).unwrap();
        let read = envelope.payload.clone().unwrap();
        assert_eq!(read, alone);
        assert_eq!(
            read.to_value(),
            serde_json::from_str::<Value>(payload).unwrap()
        );
        // Stored and sent as the same bytes, and served as the same JSON.
        assert_eq!(
            postcard::to_allocvec(&read).unwrap(),
            postcard::to_allocvec(&alone).unwrap()
        );
        assert_eq!(
            serde_json::to_string(&read).unwrap(),
            serde_json::to_string(&alone).unwrap()
        );
        assert_eq!(read.pointer("/b/z"), Some(Value::Null));
        assert_eq!(read.pointer("/abc"), Some(serde_json::json!(1500.0)));
        assert_eq!(envelope.pointer("/metadata/message_id"), Some("m".into()));
        assert_eq!(envelope.pointer("/code"), Some("C".into()));
        // Copied out of the envelope's text, it is the same value.
        let owned = read.clone().into_owned();
        assert!(matches!(owned, Fields::Object(_)));
        assert_eq!(
            postcard::to_allocvec(&owned).unwrap(),
            postcard::to_allocvec(&alone).unwrap()
        );
        // Anything but an object is read as before.
        let envelope = Envelope::from_text(r#"{"payload": [1, 2], "code": "C"}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&envelope.payload.unwrap()).unwrap(),
            "[1,2]"
        );
        // Not JSON after the object, or not an object: rejected as before.
        assert!(matches!(
            Envelope::from_text(r#"{"payload": {}} x"#),
            Err(Rejection::InvalidJson(_))
        ));
        assert_eq!(
            Envelope::from_text("[1]").unwrap_err(),
            Rejection::NotAnObject("array")
        );
    }

    #[test]
    fn a_number_read_from_its_text_is_the_number_the_pointer_decodes() {
        let text = r#"{"code":"C","n":-7,"metadata":{"x":2},"payload":{"a":1.5e3,"b":"9",
            "c":null,"d":{"e":4},"f":18446744073709551615,"g":0.1,"h~":3,"i/j":5,"k":[6]}}"#;
        let envelope = Envelope::from_text(text).unwrap();
        let pointers = [
            "/n",
            "/code",
            "/metadata/x",
            "/payload",
            "/payload/a",
            "/payload/b",
            "/payload/c",
            "/payload/d",
            "/payload/d/e",
            "/payload/f",
            "/payload/g",
            "/payload/h~0",
            "/payload/i~1j",
            "/payload/k/0",
            "/payload/none",
            "/none",
            "",
            "n",
        ];
        for pointer in pointers {
            let decoded = envelope.pointer(pointer);
            let number = decoded.as_ref().and_then(Value::as_f64);
            match envelope.number_at(pointer) {
                Some(x) => assert_eq!(Some(x), number, "{pointer}"),
                // Only nested pointers are left to `pointer`.
                None => assert!(
                    number.is_none()
                        || pointer.matches('/').count() > 2
                        || pointer.starts_with("/metadata"),
                    "{pointer}: {decoded:?}"
                ),
            }
        }
        assert_eq!(envelope.number_at("/payload/a"), Some(1500.0));
        assert_eq!(
            envelope.number_at("/payload/f"),
            Some(18446744073709551615.0)
        );
        assert_eq!(envelope.number_at("/n"), Some(-7.0));
        assert_eq!(envelope.number_at("/payload/h~0"), Some(3.0));
        assert_eq!(envelope.number_at("/payload/i~1j"), Some(5.0));
        // A payload that is not an object is left to `pointer`.
        let envelope = Envelope::from_text(r#"{"payload": [1, 2], "code": "C"}"#).unwrap();
        assert_eq!(envelope.number_at("/payload/0"), None);
        assert_eq!(envelope.pointer("/payload/0"), Some(Value::from(1)));
    }
}
