//! A JSON value held as text, an object as its top-level fields each kept as text: the payload an
//! envelope transfers and the state a view's section holds. Merging replaces whole fields and
//! encoding copies their text, so that folding and writing a view build no tree per value.

use std::ops::Range;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::figure::Figure;
use crate::name::Name;
use crate::small_map::SmallMap;

/// A JSON value: an object by its fields, each as JSON text, or any other value as JSON text.
#[derive(Clone, Debug)]
pub enum Fields {
    /// An object, field name to the field's JSON text.
    Object(SmallMap<Name, Box<RawValue>>),
    /// An object read out of a larger JSON text (an envelope's payload), its fields kept as
    /// spans of that text: reading it allocates nothing per field.
    Shared(SharedObject),
    /// Anything but an object, as JSON text.
    Other(Box<RawValue>),
}

/// Where a part of a JSON text lies in it, in bytes.
pub(crate) type Span = Range<usize>;

/// The span of `part`, a slice of `text`, within it.
pub(crate) fn span_of(text: &str, part: &str) -> Span {
    let start = part.as_ptr() as usize - text.as_ptr() as usize;
    debug_assert!(start + part.len() <= text.len(), "a slice of the text");
    start..start + part.len()
}

/// An object's fields as spans of a JSON text it shares with others.
#[derive(Clone, Debug)]
pub struct SharedObject {
    text: Arc<str>,
    fields: SmallMap<Name, Span>,
}

impl SharedObject {
    /// The JSON text of field `name`.
    fn get(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(|span| &self.text[span.clone()])
    }

    /// The fields in name order, each with its JSON text.
    fn iter(&self) -> impl Iterator<Item = (&Name, &str)> {
        self.fields
            .iter()
            .map(|(name, span)| (name, &self.text[span.clone()]))
    }
}

/// A small map's entries in key order.
type Entries<'a, V> = <Vec<(Name, V)> as litemap::store::StoreIterable<'a, Name, V>>::KeyValueIter;

/// An object's fields in name order, each with its JSON text, whichever way they are held.
enum Pairs<'a> {
    Object(Entries<'a, Box<RawValue>>),
    Shared(&'a str, Entries<'a, Span>),
}

impl<'a> Iterator for Pairs<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Pairs::Object(fields) => fields.next().map(|(name, raw)| (name.as_str(), raw.get())),
            Pairs::Shared(text, fields) => fields
                .next()
                .map(|(name, span)| (name.as_str(), &text[span.clone()])),
        }
    }

    // Exact: a binary format writes a sequence's length first.
    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            Pairs::Object(fields) => fields.size_hint(),
            Pairs::Shared(_, fields) => fields.size_hint(),
        }
    }
}

impl ExactSizeIterator for Pairs<'_> {}

impl Default for Fields {
    /// JSON `null`.
    fn default() -> Self {
        Fields::Other(RawValue::NULL.to_owned())
    }
}

impl Fields {
    /// Later fields overwrite earlier ones; anything but two objects is replaced whole.
    pub fn merge(self, next: Fields) -> Fields {
        match (self.into_owned(), next.into_owned()) {
            (Fields::Object(mut prev), Fields::Object(next)) => {
                prev.extend(next);
                Fields::Object(prev)
            }
            (_, next) => next,
        }
    }

    /// The same value, a shared object's fields copied out of the text they share (to be kept
    /// in a view: the text is the whole envelope).
    pub(crate) fn into_owned(self) -> Fields {
        match self {
            Fields::Shared(shared) => Fields::Object(
                shared
                    .iter()
                    .map(|(name, text)| (name.clone(), raw(text)))
                    .collect(),
            ),
            fields => fields,
        }
    }

    /// An object's fields in name order, each with its JSON text; `None` for anything else.
    fn pairs(&self) -> Option<Pairs<'_>> {
        match self {
            Fields::Object(fields) => Some(Pairs::Object(fields.iter())),
            Fields::Shared(shared) => Some(Pairs::Shared(&shared.text, shared.fields.iter())),
            Fields::Other(_) => None,
        }
    }

    /// The JSON text of field `name` of an object; `None` for anything else.
    pub(crate) fn field_text(&self, name: &str) -> Option<&str> {
        match self {
            Fields::Object(fields) => fields.get(name).map(|raw| raw.get()),
            Fields::Shared(shared) => shared.get(name),
            Fields::Other(_) => None,
        }
    }

    /// The value at JSON pointer `pointer` (RFC 6901) within this one, decoded; only the field
    /// the pointer enters is decoded.
    pub fn pointer(&self, pointer: &str) -> Option<Value> {
        if pointer.is_empty() {
            return Some(self.to_value());
        }
        match self {
            Fields::Other(raw) => value_at(raw.get(), pointer),
            object => {
                let (name, rest) = first_token(pointer)?;
                value_at(object.field_text(&name)?, rest)
            }
        }
    }

    /// The whole value, decoded.
    pub fn to_value(&self) -> Value {
        match self {
            Fields::Other(raw) => decode(raw.get()),
            object => Value::Object(
                object
                    .pairs()
                    .into_iter()
                    .flatten()
                    .map(|(name, text)| (name.to_string(), decode(text)))
                    .collect(),
            ),
        }
    }
}

/// Equal when they mean the same JSON, however the text was spaced.
impl PartialEq for Fields {
    fn eq(&self, other: &Self) -> bool {
        self.to_value() == other.to_value()
    }
}

/// The form of [`Fields`] in formats that are not human-readable (the store's binary
/// encoding): each field's JSON text as a string, so that nothing is decoded.
#[derive(Serialize)]
pub(crate) enum FieldsText<'a, P> {
    /// A sequence of (name, JSON text) pairs.
    Object(P),
    Other(&'a str),
}

/// An object's fields as (name, JSON text) pairs, written straight from its map.
struct PairsText<'a>(&'a Fields);

impl Serialize for PairsText<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0.pairs() {
            Some(pairs) => serializer.collect_seq(pairs),
            None => serializer.collect_seq(std::iter::empty::<(&str, &str)>()),
        }
    }
}

/// A stored object's field, as postcard wrote the pair (name, JSON text), with its name: a merge
/// copies it whole, nothing decoded or checked again (the section was checked when read).
pub(crate) struct StoredField<'a> {
    name: &'a [u8],
    encoded: &'a [u8],
}

/// [`FieldsText`] as stored, read without decoding its texts: an object's fields in the order
/// they were written, or anything else (a later value replaces it whole).
pub(crate) enum StoredFields<'a> {
    Object(Vec<StoredField<'a>>),
    Other,
}

/// Reads the stored [`FieldsText`] at the front of `bytes`.
pub(crate) fn take_stored_fields(bytes: &[u8]) -> postcard::Result<StoredFields<'_>> {
    let (variant, rest) = postcard::take_from_bytes::<u32>(bytes)?;
    match variant {
        0 => {
            let (count, mut rest) = postcard::take_from_bytes::<usize>(rest)?;
            // Each field takes two bytes at least: a count beyond that is damage, not room.
            let mut fields = Vec::with_capacity(count.min(rest.len() / 2));
            for _ in 0..count {
                let (name, after_name) = postcard::take_from_bytes::<&[u8]>(rest)?;
                let (_, after) = postcard::take_from_bytes::<&[u8]>(after_name)?;
                let encoded = &rest[..rest.len() - after.len()];
                fields.push(StoredField { name, encoded });
                rest = after;
            }
            Ok(StoredFields::Object(fields))
        }
        1 => postcard::take_from_bytes::<&str>(rest).map(|_| StoredFields::Other),
        _ => Err(postcard::Error::DeserializeBadEnum),
    }
}

/// One field of a merged object: a stored one, copied as encoded, or one of the later value's.
pub(crate) enum MergedField<'a> {
    Stored(&'a [u8]),
    Next(&'a str, &'a str),
}

/// Fields merged from stored ones and an event's payload, written as [`Fields`] are.
pub(crate) enum Merged<'a> {
    Object(Vec<MergedField<'a>>),
    Other(&'a str),
}

impl Merged<'_> {
    /// Writes the merged value as [`FieldsText`] encodes: the variant, then an object's field
    /// count and its pairs, or the other value's text.
    pub(crate) fn write<F: postcard::ser_flavors::Flavor>(
        &self,
        ser: &mut postcard::Serializer<F>,
    ) -> postcard::Result<()> {
        match self {
            Merged::Object(fields) => {
                0u32.serialize(&mut *ser)?;
                fields.len().serialize(&mut *ser)?;
                for field in fields {
                    match field {
                        MergedField::Stored(encoded) => ser.output.try_extend(encoded)?,
                        MergedField::Next(name, text) => (name, text).serialize(&mut *ser)?,
                    }
                }
                Ok(())
            }
            Merged::Other(text) => FieldsText::<()>::Other(text).serialize(ser),
        }
    }
}

impl Fields {
    /// `stored` (`None`: nothing yet) merged with this later value as [`Fields::merge`] merges,
    /// nothing decoded; `None` if the stored fields are not in strict name order (a map writes
    /// them in order, so only a damaged or foreign value is).
    pub(crate) fn merged_over<'a>(
        &'a self,
        stored: Option<StoredFields<'a>>,
    ) -> Option<Merged<'a>> {
        let next = match self {
            Fields::Other(raw) => return Some(Merged::Other(raw.get())),
            object => object.pairs()?,
        };
        let Some(StoredFields::Object(prev)) = stored else {
            return Some(Merged::Object(
                next.map(|(name, text)| MergedField::Next(name, text))
                    .collect(),
            ));
        };
        if !prev.windows(2).all(|w| w[0].name < w[1].name) {
            return None;
        }
        let mut merged = Vec::with_capacity(prev.len() + next.len());
        let mut prev = prev.into_iter().peekable();
        for (name, text) in next {
            let name_bytes = name.as_bytes();
            while let Some(earlier) = prev.next_if(|p| p.name < name_bytes) {
                merged.push(MergedField::Stored(earlier.encoded));
            }
            // The later value of a name replaces the stored one.
            prev.next_if(|p| p.name == name_bytes);
            merged.push(MergedField::Next(name, text));
        }
        merged.extend(prev.map(|p| MergedField::Stored(p.encoded)));
        Some(Merged::Object(merged))
    }
}

/// [`FieldsText`] read back.
#[derive(Deserialize)]
enum OwnedFieldsText {
    Object(TextMap<Name, Box<RawValue>>),
    Other(String),
}

/// [`FieldsText`] checked without being built: its strings borrowed, an object's pairs read and
/// dropped (a stored view's sections are checked when it is read, decoded only when changed).
#[derive(Deserialize)]
#[allow(dead_code)] // Read only to check the shape.
pub(crate) enum FieldsShape<'a> {
    Object(PairsShape),
    Other(#[serde(borrow)] &'a str),
}

/// A sequence of (name, JSON text) pairs, read and dropped.
pub(crate) struct PairsShape;

impl<'de> Deserialize<'de> for PairsShape {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(PairsShapeVisitor)
    }
}

struct PairsShapeVisitor;

impl<'de> serde::de::Visitor<'de> for PairsShapeVisitor {
    type Value = PairsShape;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a sequence of (name, JSON text) pairs")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<(&'de str, &'de str)>()?.is_some() {}
        Ok(PairsShape)
    }
}

/// A value that can be read from its JSON text.
trait FromJsonText: Sized {
    fn from_json_text(text: String) -> serde_json::Result<Self>;
}

impl FromJsonText for Box<RawValue> {
    fn from_json_text(text: String) -> serde_json::Result<Self> {
        RawValue::from_string(text)
    }
}

impl FromJsonText for Figure {
    fn from_json_text(text: String) -> serde_json::Result<Self> {
        RawValue::from_string(text).map(Figure::Stored)
    }
}

/// A map written as a sequence of (name, JSON text) pairs, read straight into a map: a view
/// read back builds no vector of pairs to collect from (the view loader decodes a view for every
/// actor started again).
struct TextMap<K, V>(SmallMap<K, V>);

impl<'de, K: Deserialize<'de> + Ord, V: FromJsonText> Deserialize<'de> for TextMap<K, V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(TextMapVisitor(std::marker::PhantomData))
    }
}

struct TextMapVisitor<K, V>(std::marker::PhantomData<(K, V)>);

impl<'de, K: Deserialize<'de> + Ord, V: FromJsonText> serde::de::Visitor<'de>
    for TextMapVisitor<K, V>
{
    type Value = TextMap<K, V>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a sequence of (name, JSON text) pairs")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut map = SmallMap::for_reading(seq.size_hint().unwrap_or(0));
        while let Some((name, text)) = seq.next_element::<(K, String)>()? {
            let value = V::from_json_text(text).map_err(serde::de::Error::custom)?;
            map.push_read(name, value);
        }
        Ok(TextMap(map))
    }
}

impl Serialize for Fields {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !serializer.is_human_readable() {
            return match self {
                Fields::Other(raw) => FieldsText::Other(raw.get()),
                object => FieldsText::Object(PairsText(object)),
            }
            .serialize(serializer);
        }
        match self {
            Fields::Object(fields) => fields.serialize(serializer),
            Fields::Shared(shared) => serializer.collect_map(
                shared
                    .iter()
                    .map(|(name, text)| (name.as_str(), raw_ref(text))),
            ),
            Fields::Other(raw) => raw.serialize(serializer),
        }
    }
}

/// Read in one pass: an object's fields are taken as text as the object is read (only
/// serde_json's deserializer hands out text); in a binary format, as the text it was written as,
/// checked to be JSON.
impl<'de> Deserialize<'de> for Fields {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            return deserializer.deserialize_any(FieldsVisitor);
        }
        Ok(match OwnedFieldsText::deserialize(deserializer)? {
            OwnedFieldsText::Object(TextMap(fields)) => Fields::Object(fields),
            OwnedFieldsText::Other(text) => Fields::Other(
                Box::<RawValue>::from_json_text(text).map_err(serde::de::Error::custom)?,
            ),
        })
    }
}

/// Serde adapter for a view's figures in formats that are not human-readable: each figure as its
/// JSON text (such formats cannot read a value whose type the data alone tells), read back as
/// stored ([`Figure::Stored`]).
pub(crate) mod figures_as_text {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::figure::Figure;
    use crate::name::Name;
    use crate::small_map::SmallMap;

    /// Writes `figures`: as they are in JSON, each as its text otherwise.
    pub(crate) fn serialize<S: Serializer>(
        figures: &SmallMap<Name, Figure>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            return figures.serialize(serializer);
        }
        serializer.collect_seq(
            figures
                .iter()
                .map(|(name, figure)| (name.as_str(), FigureText(figure))),
        )
    }

    thread_local! {
        /// The JSON text of the decoded figure being written: every view written changes one
        /// figure or more, and a string for each would be allocated and dropped again.
        static TEXT: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// A figure written as its JSON text.
    struct FigureText<'a>(&'a Figure);

    impl Serialize for FigureText<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            use serde::ser::Error;
            match self.0 {
                Figure::Stored(raw) => serializer.serialize_str(raw.get()),
                Figure::Value(value) => TEXT.with_borrow_mut(|text| {
                    text.clear();
                    serde_json::to_writer(&mut *text, value).map_err(S::Error::custom)?;
                    serializer.serialize_str(std::str::from_utf8(text).map_err(S::Error::custom)?)
                }),
            }
        }
    }

    /// Reads what [`serialize`] wrote.
    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<SmallMap<Name, Figure>, D::Error> {
        if deserializer.is_human_readable() {
            return SmallMap::deserialize(deserializer);
        }
        super::TextMap::<Name, Figure>::deserialize(deserializer)
            .map(|super::TextMap(figures)| figures)
    }
}

struct FieldsVisitor;

impl FieldsVisitor {
    /// Anything but an object: decoded, then kept as its text.
    fn other<E: serde::de::Error>(value: Value) -> Result<Fields, E> {
        serde_json::value::to_raw_value(&value)
            .map(Fields::Other)
            .map_err(E::custom)
    }
}

impl<'de> serde::de::Visitor<'de> for FieldsVisitor {
    type Value = Fields;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut fields = SmallMap::new();
        while let Some(name) = map.next_key::<Name>()? {
            fields.insert(name, map.next_value::<Box<RawValue>>()?);
        }
        Ok(Fields::Object(fields))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Fields, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Value>()? {
            items.push(item);
        }
        Self::other(Value::Array(items))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Fields, E> {
        Ok(Fields::default())
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Fields, E> {
        Ok(Fields::default())
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Fields, E> {
        Self::other(Value::Bool(v))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Fields, E> {
        Self::other(Value::from(v))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Fields, E> {
        Self::other(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Fields, E> {
        Self::other(Value::from(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Fields, E> {
        Self::other(Value::String(v.to_string()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Fields, E> {
        Self::other(Value::String(v))
    }
}

/// The first reference token of `pointer` (unescaped) and the pointer that follows it; `None`
/// if `pointer` does not start with `/`.
pub(crate) fn first_token(pointer: &str) -> Option<(std::borrow::Cow<'_, str>, &str)> {
    let pointer = pointer.strip_prefix('/')?;
    let (token, rest) = match pointer.find('/') {
        Some(at) => pointer.split_at(at),
        None => (pointer, ""),
    };
    let token = if token.contains('~') {
        std::borrow::Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
    } else {
        std::borrow::Cow::Borrowed(token)
    };
    Some((token, rest))
}

/// The value at `pointer` within the JSON text `text`, decoded.
pub(crate) fn value_at(text: &str, pointer: &str) -> Option<Value> {
    let mut value = decode(text);
    if pointer.is_empty() {
        return Some(value);
    }
    value.pointer_mut(pointer).map(Value::take)
}

/// The number JSON text `text` means, as serde_json reads it (correctly rounded, with
/// `float_roundtrip`), read by the standard library's parser, a few times faster on a rule's
/// input or figure; `None` for any other text, and for a number serde_json refuses as out of
/// range.
pub(crate) fn json_number(text: &str) -> Option<f64> {
    let first = *text.as_bytes().first()?;
    if first != b'-' && !first.is_ascii_digit() {
        return None; // "inf" and "NaN" parse, but are not JSON
    }
    let x: f64 = text.parse().ok()?;
    x.is_finite().then_some(x)
}

/// Decodes JSON text that serde_json already checked, so it cannot fail; `null` if it did.
pub(crate) fn decode(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// JSON text that serde_json already checked, as a raw value; `null` if it was not JSON.
fn raw_ref(text: &str) -> &RawValue {
    serde_json::from_str(text).unwrap_or(RawValue::NULL)
}

/// [`raw_ref`], owned.
fn raw(text: &str) -> Box<RawValue> {
    raw_ref(text).to_owned()
}

/// Reads a JSON value out of `text` as [`Fields`], an object's fields as spans of `text`
/// ([`Fields::Shared`]); `text` must be the text being deserialized.
pub(crate) struct SharedSeed<'t> {
    /// The text the deserializer reads.
    pub text: &'t Arc<str>,
}

impl<'de> serde::de::DeserializeSeed<'de> for SharedSeed<'_> {
    type Value = Fields;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Fields, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for SharedSeed<'_> {
    type Value = Fields;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Fields, A::Error> {
        let fields = read_spans(self.text, map)?;
        Ok(Fields::Shared(SharedObject {
            text: self.text.clone(),
            fields,
        }))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Fields, A::Error> {
        FieldsVisitor.visit_seq(seq)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Fields, E> {
        FieldsVisitor.visit_unit()
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Fields, E> {
        FieldsVisitor.visit_none()
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Fields, E> {
        FieldsVisitor.visit_bool(v)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Fields, E> {
        FieldsVisitor.visit_i64(v)
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Fields, E> {
        FieldsVisitor.visit_u64(v)
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Fields, E> {
        FieldsVisitor.visit_f64(v)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Fields, E> {
        FieldsVisitor.visit_str(v)
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Fields, E> {
        FieldsVisitor.visit_string(v)
    }
}

/// Fields an object read as spans is given room for before the first is read.
const FIELDS_AHEAD: usize = 8;

/// Reads the rest of an object from `map`, each field as the span of its JSON text in `text`
/// (which `map` must be reading), a later field of a name winning.
fn read_spans<'de, A: serde::de::MapAccess<'de>>(
    text: &str,
    mut map: A,
) -> Result<SmallMap<Name, Span>, A::Error> {
    // Room for an envelope's payload at once, and fields appended while they come in name
    // order, as serializers of maps and of structs declared in name order write them: growing
    // the map and inserting by search took about 4% of a parse's instructions.
    let mut fields = SmallMap::with_capacity(FIELDS_AHEAD);
    while let Some(name) = map.next_key::<Name>()? {
        let raw = map.next_value::<&'de RawValue>()?;
        fields.push_read(name, span_of(text, raw.get()));
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// What serde_json reads a text as, as a number.
    fn serde_number(text: &str) -> Option<f64> {
        serde_json::from_str::<f64>(text).ok()
    }

    #[test]
    fn a_number_is_read_from_its_text_as_serde_json_reads_it() {
        for text in [
            "0",
            "-0",
            "-0.0",
            "0.0",
            "1",
            "-7",
            "1.5e3",
            "1E-5",
            "2.5e+2",
            "0.1",
            "1e308",
            "1e309",
            "-1e400",
            "4.9e-324",
            "1e-400",
            "18446744073709551615",
            "18446744073709551616",
            "9007199254740993",
            "-9223372036854775809",
            "123456789012345678901234567890",
            "0.30000000000000004",
            "\"1\"",
            "null",
            "true",
            "[1]",
            "{}",
            "",
        ] {
            let (ours, theirs) = (json_number(text), serde_number(text));
            assert_eq!(ours.map(f64::to_bits), theirs.map(f64::to_bits), "{text}");
        }
    }

    proptest! {
        #[test]
        fn any_number_written_by_serde_json_is_read_back_as_serde_json_reads_it(
            x in any::<f64>().prop_filter("finite", |x| x.is_finite()),
            n in any::<i64>(),
            u in any::<u64>(),
        ) {
            for text in [serde_json::to_string(&x).unwrap(), n.to_string(), u.to_string()] {
                prop_assert_eq!(
                    json_number(&text).map(f64::to_bits),
                    serde_number(&text).map(f64::to_bits),
                    "{}", text
                );
            }
        }
    }

    fn fields(text: &str) -> Fields {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn objects_merge_field_by_field_and_anything_else_is_replaced() {
        let merged = fields(r#"{"a": 1, "b": {"x": 1}}"#).merge(fields(r#"{"b": {"y": 2}}"#));
        assert_eq!(merged.to_value(), json!({"a": 1, "b": {"y": 2}}));
        assert_eq!(fields("[1]").merge(fields("{}")).to_value(), json!({}));
        assert_eq!(fields("{}").merge(fields("3")).to_value(), json!(3));
    }

    #[test]
    fn encodes_to_the_same_json_it_was_read_from() {
        let text = r#"{"b":[1,{"c":"\u00e9"}],"a":"x\"y","n":1.5e3}"#;
        let encoded = serde_json::to_string(&fields(text)).unwrap();
        let back: Value = serde_json::from_str(&encoded).unwrap();
        assert_eq!(back, serde_json::from_str::<Value>(text).unwrap());
        assert_eq!(serde_json::to_string(&fields(" 7 ")).unwrap(), "7");
    }

    #[test]
    fn binary_pairs_read_back_in_key_order_the_last_of_a_name_winning() {
        let written = FieldsText::Object(vec![("b", "1"), ("a", "[2]"), ("b", "3")]);
        let bytes = postcard::to_allocvec(&written).unwrap();
        let Fields::Object(read) = postcard::from_bytes::<Fields>(&bytes).unwrap() else {
            panic!("an object was written");
        };
        let names: Vec<&str> = read.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(Fields::Object(read).to_value(), json!({"a": [2], "b": 3}));

        let bad = postcard::to_allocvec(&FieldsText::Object(vec![("a", "{")])).unwrap();
        assert!(postcard::from_bytes::<Fields>(&bad).is_err());
    }

    #[test]
    fn binary_fields_are_written_as_a_vector_of_pairs_was() {
        // The form stored views hold: variant index, then the pairs as a sequence.
        let object = fields(r#"{"b": [1, "x"], "a": {"c": null}}"#);
        // Each field's text as it arrived.
        let as_vector = FieldsText::Object(vec![("a", r#"{"c": null}"#), ("b", r#"[1, "x"]"#)]);
        assert_eq!(
            postcard::to_allocvec(&object).unwrap(),
            postcard::to_allocvec(&as_vector).unwrap()
        );
        let other = fields("[1, 2]");
        let as_text = FieldsText::<Vec<(&str, &str)>>::Other("[1,2]");
        assert_eq!(
            postcard::to_allocvec(&other).unwrap(),
            postcard::to_allocvec(&as_text).unwrap()
        );
    }

    #[test]
    fn pointers_decode_only_what_they_reach() {
        let f = fields(r#"{"a": {"b": [10, 20]}, "x/y": 1, "t~": 2}"#);
        assert_eq!(f.pointer("/a/b/1"), Some(json!(20)));
        assert_eq!(f.pointer("/x~1y"), Some(json!(1)));
        assert_eq!(f.pointer("/t~0"), Some(json!(2)));
        assert_eq!(f.pointer("/a/c"), None);
        assert_eq!(f.pointer("nope"), None);
        assert_eq!(f.pointer(""), Some(f.to_value()));
        assert_eq!(fields("[1, 2]").pointer("/1"), Some(json!(2)));
    }

    #[test]
    fn every_kind_of_value_reads_back_as_it_was() {
        for text in [
            r#"{"a":{"b":[1,"x"]},"c":null}"#,
            "[1,{\"a\":2},[]]",
            r#""\u00e9""#,
            "-3",
            "18446744073709551615",
            "2.5",
            "true",
            "null",
            "{}",
        ] {
            let f = fields(text);
            assert_eq!(
                f.to_value(),
                serde_json::from_str::<Value>(text).unwrap(),
                "{text}"
            );
            assert_eq!(
                matches!(f, Fields::Object(_)),
                text.starts_with('{'),
                "{text}"
            );
        }
    }

    #[test]
    fn equality_is_by_meaning() {
        assert_eq!(fields(r#"{"a":1}"#), fields(r#"{ "a" : 1 }"#));
        assert_ne!(fields(r#"{"a":1}"#), fields(r#"{"a":2}"#));
        assert_eq!(Fields::default().to_value(), Value::Null);
    }
}
