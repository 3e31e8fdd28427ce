//! The one place stackwarden parses YAML.
//!
//! Two kinds of documents come through here:
//! - desired-state files, deserialized into typed structs with every error
//!   pointing at a line and column ([`Document`]);
//! - CloudFormation templates, which use short-form intrinsic tags (`!Ref`,
//!   `!Sub`, `!GetAtt`, ...) and are turned into plain JSON values in the
//!   long form (`{"Ref": ...}`), so that a template written in YAML and the
//!   same template read back from AWS as JSON compare equal ([`parse_template`]).
//!
//! serde_yaml does the typed deserialization; it keeps no positions once a
//! document is a `Value`, so a second pass with yaml-rust2's event parser
//! records where every key and value starts ([`Positions`]).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::Value as Json;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

/// A YAML syntax or shape error, with where it happened when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    pub pos: Pos,
    /// Dotted path of the offending field (`stacks.alb.parameters`), empty
    /// at the document root.
    pub path: String,
    pub message: String,
}

/// Where each node of a document starts, keyed by its path from the root.
/// Mapping keys are path segments; sequence items are their index.
#[derive(Debug, Default, Clone)]
pub struct Positions {
    /// For a mapping entry: the position of its key. For a sequence item:
    /// the position of the item.
    nodes: BTreeMap<Vec<String>, Pos>,
}

impl Positions {
    /// The position of `path`, or of its nearest ancestor that has one.
    pub fn find(&self, path: &[String]) -> Pos {
        let mut path = path.to_vec();
        loop {
            if let Some(pos) = self.nodes.get(&path) {
                return *pos;
            }
            if path.pop().is_none() {
                return Pos { line: 1, column: 1 };
            }
        }
    }

    /// The position of a dotted path such as `stacks.alb.template`.
    pub fn find_dotted(&self, path: &str) -> Pos {
        let segments: Vec<String> = path
            .split('.')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        self.find(&segments)
    }
}

/// A parsed document: its value tree and the positions of its nodes.
pub struct Document {
    pub value: serde_yaml::Value,
    pub positions: Positions,
}

impl Document {
    /// Parses `text` as a single YAML document.
    ///
    /// # Errors
    /// A syntax error, with its position.
    pub fn parse(text: &str) -> Result<Document, YamlError> {
        let text = strip_bom(text);
        let mut recorder = PositionRecorder::default();
        let mut parser = Parser::new_from_str(text);
        // The event parser runs first so that errors serde_yaml reports
        // without a place (duplicate keys, a second document, alias bombs)
        // can be given one. It does not expand aliases, so it is cheap on
        // an alias bomb. Where it fails, positions fall back to the start.
        let _ = parser.load(&mut recorder, true);
        let value: serde_yaml::Value =
            serde_yaml::from_str(text).map_err(|e| recorder.place(syntax_error(e)))?;
        Ok(Document {
            value,
            positions: Positions {
                nodes: recorder.nodes,
            },
        })
    }

    /// Deserializes the node at `base` (a path into this document) as `T`.
    ///
    /// # Errors
    /// The first shape error (unknown key, wrong type, missing field), with
    /// the full path of the offending field and its position.
    pub fn deserialize<T: DeserializeOwned>(
        &self,
        value: &serde_yaml::Value,
        base: &[String],
    ) -> Result<T, YamlError> {
        serde_path_to_error::deserialize(value.clone()).map_err(|e| {
            let mut path = base.to_vec();
            path.extend(path_segments(e.path()));
            let message = strip_location(&e.inner().to_string());
            // "unknown field" errors name a key that is a child of the path.
            if let Some(field) = unknown_field(&message)
                && path.last() != Some(&field)
            {
                path.push(field);
            }
            YamlError {
                pos: self.positions.find(&path),
                path: path.join("."),
                message,
            }
        })
    }
}

fn path_segments(path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Seq { index } => Some(index.to_string()),
            Segment::Map { key } => Some(key.clone()),
            Segment::Enum { variant } => Some(variant.clone()),
            Segment::Unknown => None,
        })
        .collect()
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest.split('`').next()?.to_owned())
}

/// A serde_yaml parse error as a [`YamlError`] at its position.
fn syntax_error(e: serde_yaml::Error) -> YamlError {
    YamlError {
        pos: e
            .location()
            .map(|l| Pos {
                line: l.line(),
                column: l.column(),
            })
            .unwrap_or_default(),
        path: String::new(),
        message: strip_location(&e.to_string()),
    }
}

/// serde_yaml appends " at line L column C" to its messages; the position is
/// reported separately, so drop it from the text.
fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// Editors on Windows start UTF-8 files with a byte-order mark; YAML allows
/// it at the start of a stream, and it is not content.
fn strip_bom(text: &str) -> &str {
    text.strip_prefix('\u{feff}').unwrap_or(text)
}

#[derive(Default)]
struct PositionRecorder {
    nodes: BTreeMap<Vec<String>, Pos>,
    /// The first key seen twice in one mapping: its path and second place.
    duplicate: Option<(Vec<String>, Pos)>,
    /// Where each document of the stream starts.
    documents: Vec<Pos>,
    /// Where the first alias is used (an alias bomb is made of them).
    first_alias: Option<Pos>,
    /// Open containers: for a mapping, whether the next scalar is a key.
    stack: Vec<Frame>,
    path: Vec<String>,
}

enum Frame {
    Mapping { expecting_key: bool },
    Sequence { next_index: usize },
}

impl PositionRecorder {
    /// Gives a place to the errors serde_yaml reports without one.
    fn place(&self, mut e: YamlError) -> YamlError {
        if e.message.starts_with("duplicate entry")
            && let Some((path, pos)) = &self.duplicate
        {
            e.pos = *pos;
            e.path = path.join(".");
        } else if e.message.contains("more than one document")
            && let Some(pos) = self.documents.get(1)
        {
            e.pos = *pos;
        } else if (e.message.contains("repetition limit") || e.message.contains("recursion limit"))
            && let Some(pos) = self.first_alias
        {
            e.pos = pos;
            e.message = format!("{} (aliases expand too far)", e.message);
        }
        if e.pos.line == 0 {
            e.pos = Pos { line: 1, column: 1 };
        }
        e
    }

    /// Called when a value node (scalar, or container start) begins.
    fn enter_value(&mut self, mark: Marker) {
        if let Some(Frame::Sequence { next_index }) = self.stack.last_mut() {
            self.path.push(next_index.to_string());
            *next_index += 1;
            self.nodes.insert(self.path.clone(), pos_of(mark));
        }
    }

    /// Called when a value node ends: pop its path segment and flip the
    /// parent mapping back to expecting a key.
    fn leave_value(&mut self) {
        match self.stack.last_mut() {
            Some(Frame::Mapping { expecting_key }) => {
                *expecting_key = true;
                self.path.pop();
            }
            Some(Frame::Sequence { .. }) => {
                self.path.pop();
            }
            None => {}
        }
    }
}

fn pos_of(mark: Marker) -> Pos {
    Pos {
        line: mark.line(),
        column: mark.col() + 1,
    }
}

impl MarkedEventReceiver for PositionRecorder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(text, ..) => {
                if let Some(Frame::Mapping { expecting_key }) = self.stack.last_mut()
                    && *expecting_key
                {
                    *expecting_key = false;
                    self.path.push(text);
                    if self.nodes.insert(self.path.clone(), pos_of(mark)).is_some()
                        && self.duplicate.is_none()
                    {
                        self.duplicate = Some((self.path.clone(), pos_of(mark)));
                    }
                    return;
                }
                self.enter_value(mark);
                self.leave_value();
            }
            Event::DocumentStart => self.documents.push(pos_of(mark)),
            Event::Alias(_) => {
                self.first_alias.get_or_insert(pos_of(mark));
                self.enter_value(mark);
                self.leave_value();
            }
            Event::MappingStart(..) => {
                self.enter_value(mark);
                self.stack.push(Frame::Mapping {
                    expecting_key: true,
                });
            }
            Event::SequenceStart(..) => {
                self.enter_value(mark);
                self.stack.push(Frame::Sequence { next_index: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
                self.leave_value();
            }
            _ => {}
        }
    }
}

/// Parses a CloudFormation template (YAML with short-form tags, or JSON)
/// into JSON with every intrinsic function in its long form.
///
/// # Errors
/// A syntax error with its position, or a short-form tag used wrongly.
pub fn parse_template(text: &str) -> Result<Json, YamlError> {
    let text = strip_bom(text);
    let value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| {
        let mut recorder = PositionRecorder::default();
        let _ = Parser::new_from_str(text).load(&mut recorder, true);
        recorder.place(syntax_error(e))
    })?;
    let mut path = Vec::new();
    to_json(value, &mut path).map_err(|message| {
        locate(
            text,
            YamlError {
                pos: Pos::default(),
                path: path.join("."),
                message,
            },
        )
    })
}

/// Gives an error found in a parsed template (which keeps no positions)
/// the position of its path in `text`. Costs a second parse, on errors only.
pub fn locate(text: &str, mut e: YamlError) -> YamlError {
    if e.pos == Pos::default() {
        let mut recorder = PositionRecorder::default();
        let _ = Parser::new_from_str(strip_bom(text)).load(&mut recorder, true);
        e.pos = Positions {
            nodes: recorder.nodes,
        }
        .find_dotted(&e.path);
    }
    e
}

/// CloudFormation's short-form function tags (the template reference's
/// intrinsic and condition functions, the rule functions, and those of the
/// `AWS::LanguageExtensions` transform).
const SHORT_FORMS: &[&str] = &[
    "Ref",
    "Condition",
    "GetAtt",
    "Base64",
    "Cidr",
    "FindInMap",
    "GetAZs",
    "ImportValue",
    "Join",
    "Select",
    "Split",
    "Sub",
    "Transform",
    "And",
    "Equals",
    "If",
    "Not",
    "Or",
    "Contains",
    "EachMemberEquals",
    "EachMemberIn",
    "RefAll",
    "ValueOf",
    "ValueOfAll",
    "Length",
    "ToJsonString",
];

/// The long-form JSON of a template node. On error, `path` is left at the
/// offending node.
fn to_json(value: serde_yaml::Value, path: &mut Vec<String>) -> Result<Json, String> {
    use serde_yaml::Value as Y;
    Ok(match value {
        Y::Null => Json::Null,
        Y::Bool(b) => Json::Bool(b),
        Y::Number(n) => serde_json::to_value(&n).map_err(|e| e.to_string())?,
        Y::String(s) => Json::String(s),
        Y::Sequence(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                path.push(i.to_string());
                out.push(to_json(item, path)?);
                path.pop();
            }
            Json::Array(out)
        }
        Y::Mapping(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let key = match k {
                    Y::String(s) => s,
                    Y::Number(n) => n.to_string(),
                    Y::Bool(b) => b.to_string(),
                    other => return Err(format!("unsupported mapping key {other:?}")),
                };
                path.push(key.clone());
                let v = to_json(v, path)?;
                path.pop();
                out.insert(key, v);
            }
            Json::Object(out)
        }
        Y::Tagged(tagged) => {
            let tag = tagged.tag.to_string();
            let name = tag.trim_start_matches('!');
            if !SHORT_FORMS.contains(&name) {
                return Err(format!(
                    "unknown tag !{name}: CloudFormation's short forms are !{}",
                    SHORT_FORMS.join(", !")
                ));
            }
            // A tag with nothing after it is an empty string, as
            // CloudFormation reads it: a bare `!GetAZs` is `!GetAZs ''`
            // (the current region), the same as `{"Fn::GetAZs": ""}`.
            let inner = match to_json(tagged.value, path)? {
                Json::Null => Json::String(String::new()),
                other => other,
            };
            let (key, arg) = match name {
                "Ref" => ("Ref".to_owned(), inner),
                "Condition" => ("Condition".to_owned(), inner),
                "GetAtt" => {
                    // `!GetAtt Res.Attr.Sub` splits at the first dot only.
                    let arg = match inner {
                        Json::String(s) => match s.split_once('.') {
                            Some((res, attr)) => Json::Array(vec![res.into(), attr.into()]),
                            None => {
                                return Err(format!("!GetAtt {s}: expected Resource.Attribute"));
                            }
                        },
                        other => other,
                    };
                    ("Fn::GetAtt".to_owned(), arg)
                }
                other => (format!("Fn::{other}"), inner),
            };
            let mut out = serde_json::Map::new();
            out.insert(key, arg);
            Json::Object(out)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> Vec<String> {
        p.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn positions_of_block_and_flow_keys_are_recorded() {
        let doc = Document::parse(
            "environment: dev\nstacks:\n  network:\n    template: a.yaml\n    parameters: {VpcCIDR: 10.0.0.0/16}\n  list:\n    - x\n    - y\n",
        )
        .unwrap();
        let p = &doc.positions;
        assert_eq!(p.find(&path("environment")), Pos { line: 1, column: 1 });
        assert_eq!(p.find(&path("stacks.network")), Pos { line: 3, column: 3 });
        assert_eq!(
            p.find(&path("stacks.network.template")),
            Pos { line: 4, column: 5 }
        );
        assert_eq!(
            p.find(&path("stacks.network.parameters.VpcCIDR")),
            Pos {
                line: 5,
                column: 18
            }
        );
        assert_eq!(p.find(&path("stacks.list.1")), Pos { line: 8, column: 7 });
        // An unknown path falls back to its nearest known ancestor.
        assert_eq!(
            p.find(&path("stacks.network.nope")),
            Pos { line: 3, column: 3 }
        );
    }

    #[test]
    fn syntax_errors_carry_a_position() {
        let err = Document::parse("a: b\n  c: [\n").err().unwrap();
        assert!(err.pos.line >= 2, "{err:?}");
    }

    #[test]
    fn a_bare_tag_is_an_empty_string_and_an_unknown_tag_is_refused() {
        // The same template in four spellings reads the same.
        let forms = [
            "A: !GetAZs\nB:\n  - !GetAZs\n",
            "A: !GetAZs ''\nB: [!GetAZs '']\n",
            "A: {Fn::GetAZs: ''}\nB: [{Fn::GetAZs: ''}]\n",
            r#"{"A": {"Fn::GetAZs": ""}, "B": [{"Fn::GetAZs": ""}]}"#,
        ];
        let read: Vec<Json> = forms.iter().map(|f| parse_template(f).unwrap()).collect();
        assert!(read.windows(2).all(|w| w[0] == w[1]), "{read:?}");
        let err = parse_template("A: !Module Foo\n").unwrap_err();
        assert!(err.message.contains("unknown tag !Module"), "{err:?}");
    }

    #[test]
    fn short_form_tags_become_long_form() {
        let t = parse_template(
            "A: !Ref X\nB: !GetAtt Res.Attr.Sub\nC: !Sub '${X}-y'\nD: !Select [0, !GetAZs '']\n",
        )
        .unwrap();
        assert_eq!(t["A"], serde_json::json!({"Ref": "X"}));
        assert_eq!(
            t["B"],
            serde_json::json!({"Fn::GetAtt": ["Res", "Attr.Sub"]})
        );
        assert_eq!(t["C"], serde_json::json!({"Fn::Sub": "${X}-y"}));
        assert_eq!(
            t["D"],
            serde_json::json!({"Fn::Select": [0, {"Fn::GetAZs": ""}]})
        );
    }

    #[test]
    fn yaml_and_json_forms_of_a_template_are_equal() {
        let yaml = parse_template("# comment\nResources:\n  B: {Type: 'AWS::S3::Bucket', Properties: {BucketName: !Ref N}}\n").unwrap();
        let json = parse_template(
            r#"{"Resources": {"B": {"Type": "AWS::S3::Bucket", "Properties": {"BucketName": {"Ref": "N"}}}}}"#,
        )
        .unwrap();
        assert_eq!(yaml, json);
    }
}
