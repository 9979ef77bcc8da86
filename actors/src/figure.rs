//! A figure a rule derives (a count, a sum, a history, ...). Between events a view holds each
//! figure as its JSON text: as stored, or written out again once its rule has folded an event
//! into it (`settle`). Loading a view builds no JSON tree per figure and writing it copies the
//! text.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::Value;

/// A figure: as stored (JSON text, checked to be JSON when read), or decoded.
#[derive(Clone, Debug)]
pub enum Figure {
    /// The figure's JSON text, as the store held it.
    Stored(Box<RawValue>),
    /// The figure, decoded (boxed: a view's map of figures sizes every entry for it).
    Value(Box<Value>),
}

impl Figure {
    /// The figure's value, decoded if it is still as stored.
    pub fn value(&self) -> serde_json::Result<Cow<'_, Value>> {
        match self {
            Figure::Value(value) => Ok(Cow::Borrowed(value.as_ref())),
            Figure::Stored(raw) => serde_json::from_str(raw.get()).map(Cow::Owned),
        }
    }

    /// The figure's value to change, decoded in place first if it is still as stored.
    pub fn value_mut(&mut self) -> serde_json::Result<&mut Value> {
        if let Figure::Stored(raw) = self {
            *self = Figure::Value(Box::new(serde_json::from_str(raw.get())?));
        }
        match self {
            Figure::Value(value) => Ok(value),
            Figure::Stored(_) => unreachable!("decoded just above"),
        }
    }

    /// `value` as its JSON text at once (kept decoded should it not write out).
    pub fn stored(value: Value) -> Self {
        match serde_json::value::to_raw_value(&value) {
            Ok(raw) => Figure::Stored(raw),
            Err(_) => Figure::from(value),
        }
    }

    /// The figure's number when it is kept as a number's text, read without a JSON tree.
    pub fn stored_number(&self) -> Option<f64> {
        match self {
            Figure::Stored(raw) => crate::json_fields::json_number(raw.get()),
            Figure::Value(_) => None,
        }
    }

    /// Writes a decoded figure back out as its JSON text: a view at rest holds each figure as
    /// one allocation (decoded, an average or a history holds one per value), and writing it
    /// copies the text.
    pub fn settle(&mut self) {
        if let Figure::Value(value) = self {
            if let Ok(raw) = serde_json::value::to_raw_value(value) {
                *self = Figure::Stored(raw);
            }
        }
    }

    /// The figure's JSON text: as stored, or the value written out.
    pub fn json_text(&self) -> Cow<'_, str> {
        match self {
            Figure::Stored(raw) => Cow::Borrowed(raw.get()),
            Figure::Value(value) => Cow::Owned(value.to_string()),
        }
    }
}

impl From<Value> for Figure {
    fn from(value: Value) -> Self {
        Figure::Value(Box::new(value))
    }
}

/// Equal when they mean the same JSON, stored or decoded; a stored text that does not decode
/// equals only the same text.
impl PartialEq for Figure {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Figure::Stored(a), Figure::Stored(b)) if a.get() == b.get() => true,
            _ => matches!((self.value(), other.value()), (Ok(a), Ok(b)) if a == b),
        }
    }
}

impl PartialEq<Value> for Figure {
    fn eq(&self, other: &Value) -> bool {
        matches!(self.value(), Ok(value) if *value == *other)
    }
}

/// Written as the JSON value it is (a stored text as it is).
impl Serialize for Figure {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Figure::Stored(raw) => raw.serialize(serializer),
            Figure::Value(value) => value.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Figure {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(Figure::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn stored(text: &str) -> Figure {
        Figure::Stored(RawValue::from_string(text.into()).expect("JSON"))
    }

    #[test]
    fn a_stored_figure_means_its_value_and_decodes_only_to_change() {
        let value = json!({"avg": 1.5, "count": 2, "sum": 3});
        let mut figure = stored(&value.to_string());
        assert_eq!(figure, value);
        assert_eq!(figure, Figure::from(value.clone()));
        assert_eq!(figure.json_text(), value.to_string());
        assert!(matches!(figure.json_text(), Cow::Borrowed(_)));
        figure.value_mut().expect("decodes")["count"] = json!(3);
        assert!(matches!(figure, Figure::Value(_)));
        assert_ne!(figure, value);
        assert_eq!(figure.value().expect("decoded")["count"], json!(3));
    }

    #[test]
    fn stored_and_decoded_figures_serve_the_same_json() {
        for text in [
            "[\"ORD1\",\"ORD2\"]",
            "442.25",
            "null",
            "18446744073709551615",
        ] {
            let value: Value = serde_json::from_str(text).expect("JSON");
            assert_eq!(
                serde_json::to_string(&stored(text)).expect("json"),
                serde_json::to_string(&Figure::from(value)).expect("json")
            );
        }
    }

    #[test]
    fn a_stored_text_too_deep_to_decode_is_an_error_not_a_panic() {
        // Valid JSON (the text check has no nesting limit) past serde_json's limit for values.
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let mut figure = Figure::Stored(RawValue::from_string(deep).expect("JSON text"));
        let err = figure.value_mut().expect_err("too deep");
        assert!(err.to_string().contains("recursion"), "{err}");
        assert!(matches!(figure, Figure::Stored(_)), "left as it was");
        assert_ne!(figure, json!(null));
    }
}
