//! What AWS publishes about CloudFormation resource types, as data: which
//! properties replace a resource when they change (the resource provider
//! schemas' `createOnlyProperties`, plus the documented "Update requires:
//! Replacement" properties the schemas lack) and which types hold data.
//!
//! The tables are generated into `src/resource_types/` by
//! `scripts/gen-resource-types` from the pinned cfn-lint package, so that
//! the forecast covers every resource type, not a hand-picked few;
//! `tests/resource_types.rs` checks them against the schemas.

use serde_json::Value as Json;
use std::collections::HashMap;
use std::sync::OnceLock;

const CREATE_ONLY: &str = include_str!("resource_types/create_only.tsv");
const STATEFUL: &str = include_str!("resource_types/stateful.txt");

/// A property below a resource's `Properties`, as the schema names it:
/// segments of nested objects, `*` for every item of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PropertyPath(Vec<&'static str>);

impl PropertyPath {
    fn parse(text: &'static str) -> PropertyPath {
        PropertyPath(text.split('/').collect())
    }

    /// The part of `properties` this path reaches, as a value to compare:
    /// `Null` where it is absent. Where the path meets something it cannot
    /// look into (an intrinsic function such as `!If`, or a value of
    /// another shape) the whole of that value stands for it, so a change
    /// there counts: a forecast errs on the side of replacement.
    pub fn project(&self, properties: &Json) -> Json {
        project(properties, &self.0)
    }

    /// Whether a property at `segments` (a drift's property path split at
    /// `/`, list indexes included) lies at or under this path.
    pub fn covers(&self, segments: &[&str]) -> bool {
        self.0.len() <= segments.len()
            && self
                .0
                .iter()
                .zip(segments)
                .all(|(mine, theirs)| *mine == "*" || mine == theirs)
    }
}

impl std::fmt::Display for PropertyPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

fn is_intrinsic(m: &serde_json::Map<String, Json>) -> bool {
    m.len() == 1
        && m.keys()
            .next()
            .is_some_and(|k| k == "Ref" || k.starts_with("Fn::"))
}

fn project(v: &Json, path: &[&str]) -> Json {
    let Some((first, rest)) = path.split_first() else {
        return v.clone();
    };
    match v {
        Json::Object(m) if !is_intrinsic(m) => m
            .get(*first)
            .map_or(Json::Null, |inner| project(inner, rest)),
        Json::Array(items) if *first == "*" => {
            Json::Array(items.iter().map(|i| project(i, rest)).collect())
        }
        Json::Null => Json::Null,
        other => other.clone(),
    }
}

fn data_lines(text: &'static str) -> impl Iterator<Item = &'static str> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
}

fn table() -> &'static HashMap<&'static str, Vec<PropertyPath>> {
    static TABLE: OnceLock<HashMap<&'static str, Vec<PropertyPath>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        data_lines(CREATE_ONLY)
            .filter_map(|line| {
                let mut fields = line.split('\t');
                let ty = fields.next()?;
                Some((ty, fields.map(PropertyPath::parse).collect()))
            })
            .collect()
    })
}

/// The properties whose change replaces a resource of this type (none for
/// a type AWS publishes no schema for, such as a third-party type: see
/// [`has_schema`]).
pub fn create_only_properties(resource_type: &str) -> &'static [PropertyPath] {
    table().get(resource_type).map_or(&[], Vec::as_slice)
}

/// Whether AWS publishes a resource provider schema for the type: only
/// then does the absence of a create-only change prove an in-place update.
pub fn has_schema(resource_type: &str) -> bool {
    table().contains_key(resource_type)
}

/// The resource types cfn-lint lists as stateful (they hold data).
pub fn stateful_types() -> impl Iterator<Item = &'static str> {
    data_lines(STATEFUL)
}

/// The types protected unless the desired state says otherwise: the
/// stateful types, plus MSK clusters (their brokers hold the topics' data;
/// cfn-lint's list lacks them), minus nested stacks (what a nested stack
/// holds is judged through its nested change set, and removing one is
/// blocked on its own: see `policy::check_changes`).
pub fn default_protected_types() -> impl Iterator<Item = &'static str> {
    stateful_types()
        .filter(|t| !crate::cloud::NESTED_STACK_TYPES.contains(t))
        .chain(["AWS::MSK::Cluster"])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_table_covers_types_beyond_the_protected_few() {
        let names = |t: &str| -> Vec<String> {
            create_only_properties(t)
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert!(names("AWS::DynamoDB::Table").contains(&"TableName".to_owned()));
        // Documented in the template reference, absent from the schema.
        assert!(names("AWS::DynamoDB::Table").contains(&"KeySchema".to_owned()));
        assert!(names("AWS::EC2::Subnet").contains(&"VpcId".to_owned()));
        assert!(
            names("AWS::MSK::Cluster").contains(&"BrokerNodeGroupInfo.ClientSubnets".to_owned())
        );
        assert!(create_only_properties("Custom::Thing").is_empty());
        assert!(!has_schema("Custom::Thing"));
        assert!(has_schema("AWS::SNS::Topic") && has_schema("AWS::CloudWatch::Dashboard"));
    }

    #[test]
    fn a_path_projects_nested_values_lists_and_stops_at_intrinsics() {
        let path = PropertyPath::parse("A/*/B");
        let props = json!({"A": [{"B": 1, "C": 2}, {"C": 3}], "D": 4});
        assert_eq!(path.project(&props), json!([1, null]));
        assert_eq!(path.project(&json!({"D": 4})), Json::Null);
        let hidden = json!({"A": {"Fn::If": ["c", [{"B": 1}], []]}});
        assert_eq!(path.project(&hidden), hidden["A"]);
        assert_eq!(PropertyPath::parse("A").to_string(), "A");
    }

    #[test]
    fn defaults_protect_the_stateful_types_and_msk_but_not_nested_stacks() {
        let d: Vec<&str> = default_protected_types().collect();
        for t in [
            "AWS::DynamoDB::Table",
            "AWS::S3::Bucket",
            "AWS::RDS::DBCluster",
            "AWS::MSK::Cluster",
            "AWS::ElastiCache::ReplicationGroup",
        ] {
            assert!(d.contains(&t), "{t}");
        }
        assert!(!d.contains(&"AWS::CloudFormation::Stack"));
    }
}
