//! The aggregate: one JSON document per entity key, and the fold that applies an event to it
//! according to the configured rules.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::envelope::{json_type, Body, Envelope, Event};
use crate::figure::Figure;
use crate::name::Name;
use crate::rules::{RuleConfig, RuleKind, Rules};
use crate::small_map::SmallMap;

use crate::json_fields::Fields;
pub use crate::section::{Section, SourceSection};
use crate::section::{SectionDecodeError, SectionHead};

/// The live view of one entity.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    /// The entity key.
    pub key: String,
    /// Partition number the entity belongs to (its topics are co-partitioned).
    pub partition: i32,
    /// Number of events applied, duplicates excluded.
    pub events_applied: u64,
    /// Latest event time seen, in milliseconds since the epoch.
    pub updated_at_ms: i64,
    /// Per source: the latest state it transferred (as stored between events).
    pub sources: SmallMap<Name, Section>,
    /// Events applied per code.
    pub counters: SmallMap<Name, u64>,
    /// The figures the rules derive, by rule name.
    #[serde(with = "crate::json_fields::figures_as_text")]
    pub figures: SmallMap<Name, Figure>,
}

/// Why an event could not be folded; the aggregate is left as it was.
#[derive(Clone, Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum FoldError {
    /// A numeric rule found no value at its field.
    #[error("rule {rule:?} needs a number at {field}, found nothing")]
    MissingField {
        /// The rule's name.
        rule: String,
        /// The rule's field pointer.
        field: String,
    },
    /// A numeric rule found a value of another type.
    #[error("rule {rule:?} needs a number at {field}, found a {found}")]
    WrongType {
        /// The rule's name.
        rule: String,
        /// The rule's field pointer.
        field: String,
        /// The JSON type found.
        found: &'static str,
    },
    /// A part of the view the event changes, still as stored, does not decode.
    #[error("the view's {part} does not decode: {reason}")]
    Unreadable {
        /// Which part: a source's section or a rule's figure, by name.
        part: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// A rule's input, read before anything is changed so that a failure leaves no partial effect.
enum Input {
    Nothing,
    Number(f64),
    Value(Option<Value>),
}

impl Aggregate {
    /// An empty view of `key` in `partition`.
    pub fn new(key: impl Into<String>, partition: i32) -> Self {
        Aggregate {
            key: key.into(),
            partition,
            ..Aggregate::default()
        }
    }

    /// Applies `event`: all of its effect, or none of it and an error. The envelope's payload
    /// moves into the view (a view is folded once per event, so it is not copied); on error the
    /// event is left as it was.
    pub fn apply(&mut self, rules: &Rules, event: &mut Event) -> Result<(), FoldError> {
        let source = rules.source(event.source);
        let deletes = event.body == Body::Tombstone
            || source.delete_codes.iter().any(|code| *code == *event.code);
        // The section the event changes, in its stored form, when it can be built so.
        let mut folded = None;
        if let Body::Envelope(envelope) = &event.body {
            // Every input is read before anything changes, so that a failure has no effect;
            // decoding the section the event changes changes nothing the view means.
            let inputs = read_inputs(rules, event, envelope)?;
            if !deletes {
                folded = self.fold_section(&source.name, event, envelope)?;
            }
            for (rule, input) in &inputs {
                if let Some(figure) = self.figures.get_mut(rule.name.as_str()) {
                    if number_stays_text(rule, input, figure) {
                        continue;
                    }
                    figure.value_mut().map_err(|e| FoldError::Unreadable {
                        part: format!("figure {:?}", rule.name),
                        reason: e.to_string(),
                    })?;
                }
            }
            for (rule, input) in inputs {
                self.fold_rule(rule, input);
            }
        }
        if deletes {
            self.sources.remove(source.name.as_str());
        } else if let Some(bytes) = folded {
            match self.sources.get_mut(source.name.as_str()) {
                Some(section) => *section = Section::Encoded(bytes),
                None => {
                    self.sources
                        .insert(Name::new(&source.name), Section::Encoded(bytes));
                }
            }
        } else if let Body::Envelope(envelope) = &mut event.body {
            let payload = envelope.payload.take().unwrap_or_default().into_owned();
            // Updated in place: keys are not cloned anew.
            match self.sources.get_mut(source.name.as_str()) {
                // Decoded above.
                Some(Section::Decoded(section)) => {
                    let prev = std::mem::take(&mut section.state);
                    section.state = prev.merge(payload);
                    section.code.clone_from(&event.code);
                    section.message_id.clone_from(&event.message_id);
                    section.partition = event.origin.tp.partition;
                    section.offset = event.origin.offset;
                    section.timestamp_ms = event.timestamp_ms;
                }
                Some(Section::Encoded(_)) => {
                    unreachable!("the section an event changes is decoded before any change")
                }
                None => {
                    let section = SourceSection {
                        code: event.code.clone(),
                        message_id: event.message_id.clone(),
                        partition: event.origin.tp.partition,
                        offset: event.origin.offset,
                        timestamp_ms: event.timestamp_ms,
                        state: payload,
                    };
                    self.sources.insert(Name::new(&source.name), section.into());
                }
            }
        }
        match self.counters.get_mut(&event.code) {
            Some(count) => *count += 1,
            None => {
                self.counters.insert(event.code.clone(), 1);
            }
        }
        self.events_applied += 1;
        self.updated_at_ms = self.updated_at_ms.max(event.timestamp_ms);
        self.settle();
        Ok(())
    }

    /// The stored form of source `name`'s section after `event`, built from its stored bytes
    /// (an event changes one source's section, and a view at rest holds it stored: decoding,
    /// changing and encoding it again cost more than merging its text). When it cannot be built
    /// so, the section is decoded here, to be changed in place. Changes nothing the view means.
    fn fold_section(
        &mut self,
        name: &str,
        event: &Event,
        envelope: &Envelope,
    ) -> Result<Option<Box<[u8]>>, FoldError> {
        let unreadable = |e: SectionDecodeError| FoldError::Unreadable {
            part: format!("section {name:?}"),
            reason: e.to_string(),
        };
        let null;
        let payload = match &envelope.payload {
            Some(payload) => payload,
            None => {
                null = Fields::default();
                &null
            }
        };
        let head = SectionHead {
            code: event.code.as_str(),
            message_id: &event.message_id,
            partition: event.origin.tp.partition,
            offset: event.origin.offset,
            timestamp_ms: event.timestamp_ms,
        };
        let section = self.sources.get_mut(name);
        match Section::folded(section.as_deref(), &head, payload).map_err(unreadable)? {
            Some(bytes) => Ok(Some(bytes)),
            None => {
                if let Some(section) = section {
                    section.get_mut().map_err(unreadable)?;
                }
                Ok(None)
            }
        }
    }

    /// Puts the parts an event decoded back in their stored form (see [`Section::settle`] and
    /// [`Figure::settle`]): a view at rest is about its stored size in memory.
    pub fn settle(&mut self) {
        for (_, section) in self.sources.iter_mut() {
            section.settle();
        }
        for (_, figure) in self.figures.iter_mut() {
            figure.settle();
        }
    }

    /// Folds `input` into the rule's figure, its slot looked up once.
    fn fold_rule(&mut self, rule: &RuleConfig, input: Input) {
        let figure = self.figures.get_mut(rule.name.as_str());
        // A number kept as text is read once and written straight back (`number_stays_text`).
        let number = figure
            .as_deref()
            .and_then(Figure::stored_number)
            .and_then(|current| next_number(rule, &input, Some(current)));
        match (figure, number) {
            (Some(figure), Some(next)) => *figure = Figure::stored(number_value(next)),
            (Some(Figure::Value(slot)), None) => {
                **slot = next_figure(rule, input, Some(std::mem::take(&mut **slot)))
            }
            (Some(Figure::Stored(_)), None) => {
                unreachable!("the figures an event changes are decoded before any change")
            }
            (None, _) => {
                let first = match next_number(rule, &input, None) {
                    Some(number) => Figure::stored(number_value(number)),
                    None => next_figure(rule, input, None).into(),
                };
                self.figures.insert(Name::new(&rule.name), first);
            }
        }
    }
}

/// The next value of a count, sum, min or max figure whose value is `current` (`None`: it has
/// none yet, or it is not a number); `None` for the other kinds.
fn next_number(rule: &RuleConfig, input: &Input, current: Option<f64>) -> Option<f64> {
    match (rule.kind, input) {
        (RuleKind::Count, _) => Some(current.unwrap_or(0.0) + rule.factor),
        (RuleKind::Sum, Input::Number(x)) => Some(current.unwrap_or(0.0) + rule.factor * x),
        (RuleKind::Min, Input::Number(x)) => Some(current.map_or(*x, |c| c.min(*x))),
        (RuleKind::Max, Input::Number(x)) => Some(current.map_or(*x, |c| c.max(*x))),
        _ => None,
    }
}

/// Whether the rule changes `figure` as a number read from its stored text and written straight
/// back (no JSON tree built, nothing to decode first): a count, sum, min or max kept as a number.
/// Exactly what decoding it would give, since serde_json reads and writes numbers exactly
/// (`float_roundtrip`).
fn number_stays_text(rule: &RuleConfig, input: &Input, figure: &Figure) -> bool {
    next_number(rule, input, Some(0.0)).is_some() && figure.stored_number().is_some()
}

/// The rule's figure after `input`, from its `current` value.
fn next_figure(rule: &RuleConfig, input: Input, current: Option<Value>) -> Value {
    if let Some(next) = next_number(rule, &input, current.as_ref().and_then(Value::as_f64)) {
        return number_value(next);
    }
    match (rule.kind, input) {
        (RuleKind::Avg, Input::Number(x)) => {
            let field = |name: &str| {
                current
                    .as_ref()
                    .and_then(|c| c.get(name))
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0)
            };
            let (count, sum) = (field("count") + 1.0, field("sum") + x);
            let mut avg = Map::new();
            avg.insert("count".into(), number_value(count));
            avg.insert("sum".into(), number_value(sum));
            avg.insert("avg".into(), number_value(sum / count));
            Value::Object(avg)
        }
        (RuleKind::Latest, Input::Value(v)) => v.unwrap_or(Value::Null),
        (RuleKind::History, Input::Value(v)) => {
            let mut list = match current {
                Some(Value::Array(list)) => list,
                _ => Vec::new(),
            };
            list.push(v.unwrap_or(Value::Null));
            if list.len() > rule.limit {
                list.drain(..list.len() - rule.limit);
            }
            Value::Array(list)
        }
        // read_inputs gives every kind the input it needs.
        (_, _) => current.unwrap_or(Value::Null),
    }
}

fn read_inputs<'r>(
    rules: &'r Rules,
    event: &Event,
    envelope: &Envelope,
) -> Result<Vec<(&'r RuleConfig, Input)>, FoldError> {
    rules
        .matching(event.source, &event.code)
        .map(|rule| {
            let field = rule.field.as_deref().unwrap_or("");
            let input = match rule.kind {
                RuleKind::Count => Input::Nothing,
                kind if kind.is_numeric() => match envelope.number_at(field) {
                    Some(x) => Input::Number(x),
                    None => number_input(rule, field, envelope.pointer(field))?,
                },
                _ => Input::Value(envelope.pointer(field)),
            };
            Ok((rule, input))
        })
        .collect()
}

/// A numeric rule's input from the value at its field, decoded: where
/// [`Envelope::number_at`] found no number, this tells what is there.
fn number_input(rule: &RuleConfig, field: &str, value: Option<Value>) -> Result<Input, FoldError> {
    match value {
        Some(Value::Number(n)) => Ok(Input::Number(n.as_f64().unwrap_or(0.0))),
        None | Some(Value::Null) => Err(FoldError::MissingField {
            rule: rule.name.clone(),
            field: field.to_string(),
        }),
        Some(other) => Err(FoldError::WrongType {
            rule: rule.name.clone(),
            field: field.to_string(),
            found: json_type(&other),
        }),
    }
}

/// A number as JSON: integral values print without a fraction.
fn number_value(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9_007_199_254_740_992.0 {
        Value::from(x as i64)
    } else {
        serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Origin, TopicPartition};
    use crate::rules::SourceConfig;
    use proptest::prelude::*;
    use serde_json::json;

    /// A name, for indexing the view's maps.
    fn name(text: &str) -> Name {
        Name::new(text)
    }

    fn source(name: &str, delete: &[&str]) -> SourceConfig {
        SourceConfig {
            name: name.into(),
            topic: format!("t.{name}"),
            key_pointer: None,
            delete_codes: delete.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn rule(
        name: &str,
        kind: RuleKind,
        src: &str,
        codes: &[&str],
        field: Option<&str>,
    ) -> RuleConfig {
        RuleConfig {
            name: name.into(),
            kind,
            source: src.into(),
            codes: codes.iter().map(|s| s.to_string()).collect(),
            field: field.map(Into::into),
            factor: 1.0,
            limit: 3,
        }
    }

    fn rules() -> Rules {
        let mut redeemed = rule(
            "points",
            RuleKind::Sum,
            "loyalty",
            &["REDEEMED"],
            Some("/payload/points"),
        );
        redeemed.factor = -1.0;
        Rules::new(
            vec![
                source("orders", &[]),
                source("loyalty", &[]),
                source("customer", &["DELETED"]),
            ],
            vec![
                rule("orders", RuleKind::Count, "orders", &["CREATED"], None),
                rule(
                    "total",
                    RuleKind::Sum,
                    "orders",
                    &["CREATED"],
                    Some("/payload/amount"),
                ),
                rule(
                    "smallest",
                    RuleKind::Min,
                    "orders",
                    &["CREATED"],
                    Some("/payload/amount"),
                ),
                rule(
                    "largest",
                    RuleKind::Max,
                    "orders",
                    &["CREATED"],
                    Some("/payload/amount"),
                ),
                rule(
                    "mean",
                    RuleKind::Avg,
                    "orders",
                    &["CREATED"],
                    Some("/payload/amount"),
                ),
                rule(
                    "last_order",
                    RuleKind::Latest,
                    "orders",
                    &[],
                    Some("/payload/id"),
                ),
                rule(
                    "recent",
                    RuleKind::History,
                    "orders",
                    &[],
                    Some("/payload/id"),
                ),
                rule(
                    "points",
                    RuleKind::Sum,
                    "loyalty",
                    &["EARNED"],
                    Some("/payload/points"),
                ),
                redeemed,
            ],
        )
        .unwrap()
    }

    fn event(rules: &Rules, src: &str, offset: i64, code: &str, payload: Value) -> Event {
        let source = rules.source_named(src).unwrap();
        Event {
            origin: Origin {
                tp: TopicPartition::new(format!("t.{src}"), 0),
                offset,
            },
            source,
            key: "C1".into(),
            message_id: format!("{src}-{offset}"),
            code: code.into(),
            timestamp_ms: 1000 + offset,
            body: Body::Envelope(
                Envelope::from_text(
                    &json!({"metadata": {}, "code": code, "payload": payload}).to_string(),
                )
                .unwrap(),
            ),
        }
    }

    #[test]
    fn count_sum_min_max_avg_fold_numbers() {
        let r = rules();
        let mut agg = Aggregate::new("C1", 0);
        for (i, amount) in [10.0, 2.5, 30.0].into_iter().enumerate() {
            let mut e = event(
                &r,
                "orders",
                i as i64,
                "CREATED",
                json!({"id": i, "amount": amount}),
            );
            agg.apply(&r, &mut e).unwrap();
        }
        agg.apply(
            &r,
            &mut event(&r, "orders", 3, "CANCELLED", json!({"id": 3})),
        )
        .unwrap();
        assert_eq!(agg.figures[&name("orders")], json!(3));
        assert_eq!(agg.figures[&name("total")], json!(42.5));
        assert_eq!(agg.figures[&name("smallest")], json!(2.5));
        assert_eq!(agg.figures[&name("largest")], json!(30));
        assert_eq!(
            agg.figures[&name("mean")].value().unwrap()["count"],
            json!(3)
        );
        assert_eq!(
            agg.figures[&name("mean")].value().unwrap()["avg"]
                .as_f64()
                .unwrap(),
            42.5 / 3.0
        );
        assert_eq!(agg.counters[&name("CREATED")], 3);
        assert_eq!(agg.counters[&name("CANCELLED")], 1);
        assert_eq!(agg.events_applied, 4);
        assert_eq!(agg.updated_at_ms, 1003);
    }

    #[test]
    fn a_folded_view_holds_its_parts_as_stored_and_means_the_same() {
        let r = rules();
        let mut agg = Aggregate::new("C1", 0);
        for (i, (src, code, payload)) in [
            ("orders", "CREATED", json!({"id": 0, "amount": 10.5})),
            ("loyalty", "EARNED", json!({"points": 100, "tier": "gold"})),
            ("orders", "CREATED", json!({"id": 1, "amount": 2.25})),
        ]
        .into_iter()
        .enumerate()
        {
            agg.apply(&r, &mut event(&r, src, i as i64, code, payload))
                .unwrap();
        }
        assert!(agg
            .sources
            .values()
            .all(|s| matches!(s, Section::Encoded(_))));
        assert!(agg.figures.values().all(|f| matches!(f, Figure::Stored(_))));
        let mut decoded = agg.clone();
        for (_, section) in decoded.sources.iter_mut() {
            section.get_mut().unwrap();
        }
        for (_, figure) in decoded.figures.iter_mut() {
            figure.value_mut().unwrap();
        }
        assert_eq!(agg, decoded);
        assert_eq!(
            crate::view_codec::encode(&agg).unwrap(),
            crate::view_codec::encode(&decoded).unwrap(),
            "stored as the decoded view would be"
        );
        agg.apply(
            &r,
            &mut event(&r, "loyalty", 3, "REDEEMED", json!({"points": 30})),
        )
        .unwrap();
        assert_eq!(agg.figures[&name("points")], json!(70));
        assert_eq!(agg.figures[&name("total")], json!(12.75));
        assert_eq!(
            agg.sources[&name("loyalty")]
                .get()
                .unwrap()
                .state
                .to_value(),
            json!({"points": 30, "tier": "gold"})
        );
    }

    #[test]
    fn latest_and_bounded_history_keep_the_last_values_in_order() {
        let r = rules();
        let mut agg = Aggregate::new("C1", 0);
        for i in 0..5 {
            agg.apply(
                &r,
                &mut event(&r, "orders", i, "CANCELLED", json!({"id": i})),
            )
            .unwrap();
        }
        assert_eq!(agg.figures[&name("last_order")], json!(4));
        assert_eq!(agg.figures[&name("recent")], json!([2, 3, 4]));
    }

    #[test]
    fn factor_subtracts_and_sections_merge_fields() {
        let r = rules();
        let mut agg = Aggregate::new("C1", 0);
        agg.apply(
            &r,
            &mut event(
                &r,
                "loyalty",
                0,
                "EARNED",
                json!({"points": 100, "tier": "gold"}),
            ),
        )
        .unwrap();
        agg.apply(
            &r,
            &mut event(&r, "loyalty", 1, "REDEEMED", json!({"points": 30})),
        )
        .unwrap();
        assert_eq!(agg.figures[&name("points")], json!(70));
        let section = agg.sources[&name("loyalty")].get().unwrap();
        assert_eq!(
            section.state.to_value(),
            json!({"points": 30, "tier": "gold"})
        );
        assert_eq!((section.code.as_str(), section.offset), ("REDEEMED", 1));
    }

    #[test]
    fn delete_code_and_tombstone_remove_the_section() {
        let r = rules();
        let mut agg = Aggregate::new("C1", 0);
        agg.apply(
            &r,
            &mut event(&r, "customer", 0, "REGISTERED", json!({"name": "A"})),
        )
        .unwrap();
        agg.apply(&r, &mut event(&r, "customer", 1, "DELETED", json!({})))
            .unwrap();
        assert!(!agg.sources.contains_key("customer"));
        agg.apply(
            &r,
            &mut event(&r, "orders", 2, "CANCELLED", json!({"id": 1})),
        )
        .unwrap();
        let mut tomb = event(&r, "orders", 3, "TOMBSTONE", json!({}));
        tomb.body = Body::Tombstone;
        agg.apply(&r, &mut tomb).unwrap();
        assert!(agg.sources.is_empty());
        assert_eq!(agg.counters[&name("TOMBSTONE")], 1);
    }

    #[test]
    fn a_failing_rule_leaves_the_aggregate_untouched() {
        let r = rules();
        let mut agg = Aggregate::new("C1", 0);
        agg.apply(
            &r,
            &mut event(&r, "orders", 0, "CREATED", json!({"id": 0, "amount": 1})),
        )
        .unwrap();
        let before = agg.clone();
        let mut bad = event(
            &r,
            "orders",
            1,
            "CREATED",
            json!({"id": 1, "amount": "ten"}),
        );
        let sent = bad.clone();
        let err = agg.apply(&r, &mut bad).unwrap_err();
        assert_eq!(
            bad, sent,
            "a failed fold leaves the event whole, for its retry"
        );
        assert_eq!(
            err.to_string(),
            "rule \"total\" needs a number at /payload/amount, found a string"
        );
        let err = agg
            .apply(&r, &mut event(&r, "orders", 2, "CREATED", json!({"id": 2})))
            .unwrap_err();
        assert!(matches!(err, FoldError::MissingField { .. }));
        assert_eq!(agg, before);
    }

    #[test]
    fn a_stored_figure_that_does_not_decode_fails_the_fold_and_changes_nothing() {
        let r = rules();
        let mut agg = Aggregate::new("C1", 0);
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let raw = serde_json::value::RawValue::from_string(deep).unwrap();
        agg.figures.insert(name("total"), Figure::Stored(raw));
        let before = agg.clone();
        let err = agg
            .apply(
                &r,
                &mut event(&r, "orders", 0, "CREATED", json!({"id": 0, "amount": 1})),
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the view's figure \"total\" does not decode"),
            "{err}"
        );
        assert_eq!(agg, before);
        // An event no rule of that figure matches still folds.
        agg.apply(
            &r,
            &mut event(&r, "loyalty", 1, "EARNED", json!({"points": 5})),
        )
        .unwrap();
        assert_eq!(agg.figures[&name("points")], json!(5));
    }

    #[test]
    fn folding_one_sources_events_is_deterministic() {
        let r = rules();
        let events: Vec<Event> = (0..50)
            .map(|i| {
                event(
                    &r,
                    "orders",
                    i,
                    "CREATED",
                    json!({"id": i, "amount": (i as f64) * 0.1}),
                )
            })
            .collect();
        let fold = || {
            let mut agg = Aggregate::new("C1", 0);
            for e in &events {
                agg.apply(&r, &mut e.clone()).unwrap();
            }
            serde_json::to_vec(&agg).unwrap()
        };
        assert_eq!(fold(), fold());
    }

    fn arb_source_events() -> impl Strategy<Value = Vec<(usize, String, i64)>> {
        // (source index, code, amount) triples; each source's own order is kept by the interleaving.
        let code = prop_oneof![
            Just("CREATED".to_string()),
            Just("CANCELLED".to_string()),
            Just("EARNED".to_string()),
            Just("REDEEMED".to_string()),
            Just("REGISTERED".to_string()),
            Just("DELETED".to_string()),
        ];
        prop::collection::vec((0usize..3, code, -50i64..500), 1..40)
    }

    proptest! {
        #[test]
        fn interleaving_sources_in_any_order_gives_the_same_view(
            events in arb_source_events(),
            picks in prop::collection::vec(0usize..3, 0..120),
        ) {
            let r = rules();
            let names = ["orders", "loyalty", "customer"];
            let built: Vec<Event> = events.iter().enumerate().map(|(i, (s, code, amount))| {
                event(&r, names[*s], i as i64, code, json!({"id": i, "amount": *amount as f64 / 4.0, "points": amount}))
            }).collect();
            let mut sequential = Aggregate::new("C1", 0);
            for e in &built {
                let _ = sequential.apply(&r, &mut e.clone());
            }
            // Interleave: per-source queues in order, drained in an order the picks choose.
            let mut queues: Vec<std::collections::VecDeque<&Event>> = vec![Default::default(); 3];
            for (e, (s, _, _)) in built.iter().zip(&events) {
                queues[*s].push_back(e);
            }
            let mut interleaved = Aggregate::new("C1", 0);
            let mut picks = picks.into_iter();
            while queues.iter().any(|q| !q.is_empty()) {
                let mut s = picks.next().unwrap_or(0);
                while queues[s].is_empty() {
                    s = (s + 1) % 3;
                }
                let e = queues[s].pop_front().unwrap();
                let _ = interleaved.apply(&r, &mut e.clone());
            }
            prop_assert_eq!(sequential, interleaved);
        }

        #[test]
        fn numbers_folded_as_their_text_are_written_as_decoded_ones_are(
            amounts in prop::collection::vec(
                prop_oneof![
                    any::<i32>().prop_map(f64::from),
                    -1e6f64..1e6,
                    Just(0.1),
                    Just(-0.0),
                    Just(1e308),
                    Just(9_007_199_254_740_993.0),
                ],
                1..20,
            ),
        ) {
            let r = rules();
            let mut as_text = Aggregate::new("C1", 0);
            let mut decoded = Aggregate::new("C1", 0);
            for (i, amount) in amounts.iter().enumerate() {
                let payload = json!({"id": i, "amount": amount, "points": amount});
                let (src, code) = [("orders", "CREATED"), ("loyalty", "EARNED"), ("loyalty", "REDEEMED")][i % 3];
                let e = event(&r, src, i as i64, code, payload);
                // Decoded first, every figure takes the way through a JSON tree.
                for (_, figure) in decoded.figures.iter_mut() {
                    figure.value_mut().unwrap();
                }
                let numbers_as_text = as_text.figures.iter().filter(|(_, f)| f.stored_number().is_some()).count();
                prop_assert_eq!(as_text.apply(&r, &mut e.clone()), decoded.apply(&r, &mut e.clone()));
                prop_assert!(numbers_as_text > 0 || i == 0);
                let texts = |agg: &Aggregate| -> Vec<(String, String)> {
                    agg.figures.iter().map(|(n, f)| (n.to_string(), f.json_text().into_owned())).collect()
                };
                prop_assert_eq!(texts(&as_text), texts(&decoded));
            }
        }
    }
}
