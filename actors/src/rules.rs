//! The sources and aggregation rules as the user writes them in `config.toml`, and their
//! validated, indexed form that the fold reads.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::KeyHasher;

/// One upstream service: the topic it publishes to and how its entity key is found.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Name of the upstream service; events whose `metadata.service_name` differs are dead-lettered.
    pub name: String,
    /// Topic the service publishes to.
    pub topic: String,
    /// JSON pointer into the envelope that holds the entity key (for example
    /// `/payload/customer_id`); when unset, the record key is the entity key.
    #[serde(default)]
    pub key_pointer: Option<String>,
    /// Codes that delete this source's section of the view (a tombstone does the same).
    #[serde(default)]
    pub delete_codes: Vec<String>,
}

/// What a rule computes.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// Number of matching events, times `factor`.
    Count,
    /// Sum of a numeric field, times `factor`.
    Sum,
    /// Smallest value of a numeric field.
    Min,
    /// Largest value of a numeric field.
    Max,
    /// Mean of a numeric field, kept as `{count, sum, avg}`.
    Avg,
    /// The field's value in the latest matching event.
    Latest,
    /// The latest `limit` values of the field, oldest first.
    History,
}

impl RuleKind {
    /// Whether the rule reads a numeric field.
    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            RuleKind::Sum | RuleKind::Min | RuleKind::Max | RuleKind::Avg
        )
    }
}

/// One aggregation rule: a derived figure of the view, fed by one source's events.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    /// Name of the figure in the view (`figures.<name>`); rules may share a name when they
    /// share kind and source (a balance is a sum fed by two codes with factors 1 and -1).
    pub name: String,
    /// What the rule computes: count, sum, min, max, avg, latest or history.
    pub kind: RuleKind,
    /// Name of the source whose events feed the rule.
    pub source: String,
    /// Codes that feed the rule; empty means every code of the source.
    #[serde(default)]
    pub codes: Vec<String>,
    /// JSON pointer into the envelope to the value the rule reads (for example
    /// `/payload/total_amount`); required by every kind but count.
    #[serde(default)]
    pub field: Option<String>,
    /// Multiplier for count and sum: -1 subtracts.
    #[serde(default = "default_factor")]
    pub factor: f64,
    /// Entries a history rule keeps.
    #[serde(default = "default_history_limit")]
    pub limit: usize,
}

/// Default multiplier of count and sum rules.
pub const DEFAULT_FACTOR: f64 = 1.0;
/// Default number of entries a history rule keeps.
pub const DEFAULT_HISTORY_LIMIT: usize = 10;

fn default_factor() -> f64 {
    DEFAULT_FACTOR
}

fn default_history_limit() -> usize {
    DEFAULT_HISTORY_LIMIT
}

/// Why the sources or rules were refused; each names the offending key and value.
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum RulesError {
    /// No source was configured.
    #[error("sources: at least one source is required")]
    NoSources,
    /// A field that must not be empty is empty.
    #[error("{key}: must not be empty")]
    Empty {
        /// The offending key.
        key: String,
    },
    /// Two sources share a name or a topic.
    #[error("{key}: {value:?} is used by more than one source")]
    DuplicateSource {
        /// The offending key.
        key: String,
        /// The repeated value.
        value: String,
    },
    /// A JSON pointer does not start with `/`.
    #[error("{key}: {value:?} is not a JSON pointer (it must start with '/')")]
    BadPointer {
        /// The offending key.
        key: String,
        /// The offending value.
        value: String,
    },
    /// A rule names a source that is not configured.
    #[error("{key}: no source is named {value:?}")]
    UnknownSource {
        /// The offending key.
        key: String,
        /// The unknown source name.
        value: String,
    },
    /// A rule needs a field it was not given.
    #[error("{key}: a {kind:?} rule needs a field")]
    MissingField {
        /// The offending key.
        key: String,
        /// The rule's kind.
        kind: RuleKind,
    },
    /// Rules that share a name disagree on kind or source.
    #[error("{key}: rule {name:?} is declared again with another kind or source")]
    ConflictingRule {
        /// The offending key.
        key: String,
        /// The shared name.
        name: String,
    },
    /// A number is out of range.
    #[error("{key}: {value} is out of range ({reason})")]
    OutOfRange {
        /// The offending key.
        key: String,
        /// The offending value.
        value: String,
        /// What the range is.
        reason: &'static str,
    },
}

/// The validated sources and rules, indexed for the fold.
#[derive(Clone, Debug)]
pub struct Rules {
    sources: Vec<SourceConfig>,
    by_topic: HashMap<String, usize, KeyHasher>,
    by_name: HashMap<String, usize, KeyHasher>,
    rules: Vec<RuleConfig>,
    /// Per source: its rules that match every code.
    any_code: Vec<Vec<usize>>,
    /// Per source and code: the rules that match that code, with the any-code rules merged in,
    /// in configuration order.
    by_code: Vec<HashMap<String, Vec<usize>, KeyHasher>>,
}

impl Rules {
    /// Validates sources and rules; the error names the first offending key.
    pub fn new(sources: Vec<SourceConfig>, rules: Vec<RuleConfig>) -> Result<Self, RulesError> {
        if sources.is_empty() {
            return Err(RulesError::NoSources);
        }
        let mut by_topic = HashMap::default();
        let mut by_name = HashMap::default();
        for (i, s) in sources.iter().enumerate() {
            let at = |field: &str| format!("sources[{i}].{field}");
            if s.name.is_empty() {
                return Err(RulesError::Empty { key: at("name") });
            }
            if s.topic.is_empty() {
                return Err(RulesError::Empty { key: at("topic") });
            }
            if by_name.insert(s.name.clone(), i).is_some() {
                return Err(RulesError::DuplicateSource {
                    key: at("name"),
                    value: s.name.clone(),
                });
            }
            if by_topic.insert(s.topic.clone(), i).is_some() {
                return Err(RulesError::DuplicateSource {
                    key: at("topic"),
                    value: s.topic.clone(),
                });
            }
            if let Some(p) = &s.key_pointer {
                check_pointer(at("key_pointer"), p)?;
            }
        }
        let mut any_code = vec![Vec::new(); sources.len()];
        let mut by_code = vec![HashMap::<String, Vec<usize>, KeyHasher>::default(); sources.len()];
        let mut seen: BTreeMap<&str, (RuleKind, &str)> = BTreeMap::new();
        for (i, r) in rules.iter().enumerate() {
            let at = |field: &str| format!("rules[{i}].{field}");
            if r.name.is_empty() {
                return Err(RulesError::Empty { key: at("name") });
            }
            let Some(&source) = by_name.get(&r.source) else {
                return Err(RulesError::UnknownSource {
                    key: at("source"),
                    value: r.source.clone(),
                });
            };
            match (&r.field, r.kind) {
                (Some(p), _) => check_pointer(at("field"), p)?,
                (None, RuleKind::Count) => {}
                (None, kind) => {
                    return Err(RulesError::MissingField {
                        key: at("field"),
                        kind,
                    })
                }
            }
            if !r.factor.is_finite() {
                return Err(RulesError::OutOfRange {
                    key: at("factor"),
                    value: r.factor.to_string(),
                    reason: "must be a finite number",
                });
            }
            if r.kind == RuleKind::History && !(1..=10_000).contains(&r.limit) {
                return Err(RulesError::OutOfRange {
                    key: at("limit"),
                    value: r.limit.to_string(),
                    reason: "1 to 10000",
                });
            }
            match seen.get(r.name.as_str()) {
                Some(&(kind, src)) if kind != r.kind || src != r.source => {
                    return Err(RulesError::ConflictingRule {
                        key: at("name"),
                        name: r.name.clone(),
                    })
                }
                _ => {
                    seen.insert(&r.name, (r.kind, &r.source));
                }
            }
            if r.codes.is_empty() {
                any_code[source].push(i);
            } else {
                for code in &r.codes {
                    by_code[source].entry(code.clone()).or_default().push(i);
                }
            }
        }
        for (source, codes) in by_code.iter_mut().enumerate() {
            for idx in codes.values_mut() {
                idx.extend_from_slice(&any_code[source]);
                idx.sort_unstable();
                idx.dedup();
            }
        }
        Ok(Rules {
            sources,
            by_topic,
            by_name,
            rules,
            any_code,
            by_code,
        })
    }

    /// All configured sources, in configuration order.
    pub fn sources(&self) -> &[SourceConfig] {
        &self.sources
    }

    /// Index of the source that publishes to `topic`.
    pub fn source_for_topic(&self, topic: &str) -> Option<usize> {
        self.by_topic.get(topic).copied()
    }

    /// Index of the source named `name`.
    pub fn source_named(&self, name: &str) -> Option<usize> {
        self.by_name.get(name).copied()
    }

    /// The source at `index`.
    pub fn source(&self, index: usize) -> &SourceConfig {
        &self.sources[index]
    }

    /// The rules that an event of `source` with `code` feeds, in configuration order.
    pub fn matching(&self, source: usize, code: &str) -> impl Iterator<Item = &RuleConfig> {
        self.by_code[source]
            .get(code)
            .unwrap_or(&self.any_code[source])
            .iter()
            .map(move |&i| &self.rules[i])
    }

    /// The topics of all sources.
    pub fn topics(&self) -> Vec<String> {
        self.sources.iter().map(|s| s.topic.clone()).collect()
    }
}

fn check_pointer(key: String, pointer: &str) -> Result<(), RulesError> {
    if pointer.starts_with('/') {
        Ok(())
    } else {
        Err(RulesError::BadPointer {
            key,
            value: pointer.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(name: &str, topic: &str) -> SourceConfig {
        SourceConfig {
            name: name.into(),
            topic: topic.into(),
            key_pointer: None,
            delete_codes: vec![],
        }
    }

    fn rule(name: &str, kind: RuleKind, source: &str, field: Option<&str>) -> RuleConfig {
        RuleConfig {
            name: name.into(),
            kind,
            source: source.into(),
            codes: vec![],
            field: field.map(Into::into),
            factor: 1.0,
            limit: 10,
        }
    }

    #[test]
    fn refuses_a_rule_of_an_unknown_source_naming_it() {
        let err = Rules::new(
            vec![source("a", "t.a")],
            vec![rule("x", RuleKind::Count, "b", None)],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "rules[0].source: no source is named \"b\"");
    }

    #[test]
    fn refuses_duplicate_topics_and_bad_pointers() {
        let err = Rules::new(vec![source("a", "t"), source("b", "t")], vec![]).unwrap_err();
        assert!(matches!(err, RulesError::DuplicateSource { .. }), "{err}");
        let err = Rules::new(
            vec![source("a", "t")],
            vec![rule("x", RuleKind::Sum, "a", Some("payload.x"))],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "rules[0].field: \"payload.x\" is not a JSON pointer (it must start with '/')"
        );
    }

    #[test]
    fn refuses_numeric_rule_without_field_and_conflicting_names() {
        let err = Rules::new(
            vec![source("a", "t")],
            vec![rule("x", RuleKind::Sum, "a", None)],
        )
        .unwrap_err();
        assert!(matches!(err, RulesError::MissingField { .. }), "{err}");
        let err = Rules::new(
            vec![source("a", "t")],
            vec![
                rule("x", RuleKind::Sum, "a", Some("/p")),
                rule("x", RuleKind::Max, "a", Some("/p")),
            ],
        )
        .unwrap_err();
        assert!(matches!(err, RulesError::ConflictingRule { .. }), "{err}");
    }

    #[test]
    fn matching_keeps_configuration_order_across_any_code_and_per_code_rules() {
        let mut by_code = rule("c", RuleKind::Count, "a", None);
        by_code.codes = vec!["X".into()];
        let rules = Rules::new(
            vec![source("a", "t")],
            vec![
                rule("first", RuleKind::Count, "a", None),
                by_code,
                rule("third", RuleKind::Count, "a", None),
            ],
        )
        .unwrap();
        let names: Vec<_> = rules.matching(0, "X").map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["first", "c", "third"]);
        let names: Vec<_> = rules.matching(0, "Y").map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["first", "third"]);
    }
}
