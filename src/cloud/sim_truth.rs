//! The simulated cloud's knowledge of AWS resource types, read at run time
//! from the CloudFormation resource provider schemas that the pinned
//! cfn-lint package ships (in `.venv`, which `scripts/setup-venv` makes).
//!
//! Deliberately independent of `crate::resource_types` and of the policy:
//! the simulator must not grade the code with the code's own tables, so a
//! property missing from the generated table (or a bug in how the policy
//! reads it) shows up as a replacement the policy did not foresee.

use serde_json::Value as Json;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Documented replacements the schemas lack: the same hand-kept source the
/// generator reads (it is AWS's documentation, not code).
const DOCUMENTED: &str = include_str!("../resource_types/documented_replacements.tsv");

struct Truth {
    data: PathBuf,
    providers: HashMap<String, String>,
    stateful: BTreeSet<String>,
    create_only: Mutex<HashMap<String, Vec<Vec<String>>>>,
}

/// cfn-lint's data folder: `$STACKWARDEN_CFNLINT_DATA`, else the one in
/// this checkout's `.venv`.
///
/// # Panics
/// Neither exists: the venv is made by `scripts/setup-venv`.
pub fn cfnlint_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("STACKWARDEN_CFNLINT_DATA") {
        return PathBuf::from(dir);
    }
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    std::fs::read_dir(&lib)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("site-packages/cfnlint/data"))
        .find(|p| p.is_dir())
        .unwrap_or_else(|| {
            panic!(
                "the simulated cloud reads AWS's resource schemas from cfn-lint in {}: run scripts/setup-venv (or set STACKWARDEN_CFNLINT_DATA)",
                lib.display()
            )
        })
}

fn read_json(path: &Path) -> Json {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn truth() -> &'static Truth {
    static TRUTH: OnceLock<Truth> = OnceLock::new();
    TRUTH.get_or_init(|| {
        let data = cfnlint_data_dir();
        let providers = read_json(&data.join("schemas/providers/us-east-1.json"));
        let providers = providers
            .as_object()
            .expect("providers map")
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
            .collect();
        let stateful = read_json(&data.join("AdditionalSpecs/StatefulResources.json"));
        let stateful = stateful["ResourceTypes"]
            .as_object()
            .expect("ResourceTypes")
            .keys()
            .cloned()
            .collect();
        Truth {
            data,
            providers,
            stateful,
            create_only: Mutex::new(HashMap::new()),
        }
    })
}

/// Whether cfn-lint lists the type as stateful (it holds data).
pub fn is_stateful(resource_type: &str) -> bool {
    truth().stateful.contains(resource_type)
}

/// The create-only property paths of a type, as JSON-pointer segments
/// below `Properties` (`*` = every list item), from its schema.
fn create_only(resource_type: &str) -> Vec<Vec<String>> {
    let t = truth();
    let mut cache = t.create_only.lock().expect("sim truth lock");
    cache
        .entry(resource_type.to_owned())
        .or_insert_with(|| {
            let mut paths: Vec<Vec<String>> = match t.providers.get(resource_type) {
                Some(digest) => {
                    let schema =
                        read_json(&t.data.join(format!("schemas/resources/{digest}.json")));
                    schema["createOnlyProperties"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Json::as_str)
                        .filter_map(|p| p.strip_prefix("/properties/"))
                        .map(|p| p.split('/').map(str::to_owned).collect())
                        .collect()
                }
                None => vec![],
            };
            for line in DOCUMENTED.lines().filter(|l| !l.starts_with('#')) {
                let mut f = line.split('\t');
                if f.next() == Some(resource_type)
                    && let Some(path) = f.next()
                {
                    paths.push(path.split('/').map(str::to_owned).collect());
                }
            }
            paths
        })
        .clone()
}

/// Whether a drift's property path (`/KeySchema/0/AttributeName`, as
/// DetectStackDrift writes it) lies under a create-only property of the
/// type: drift there is not reconciled by a drift-aware change set.
pub fn create_only_path(resource_type: &str, path: &str) -> bool {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    create_only(resource_type)
        .iter()
        .any(|co| co.len() <= segs.len() && co.iter().zip(&segs).all(|(c, s)| c == "*" || c == s))
}

/// Whether the type supports drift detection: its provider schema has a
/// read handler (CloudFormation reads the live resource through it).
/// Types without a schema (legacy, custom) are NOT_CHECKED.
pub fn drift_supported(resource_type: &str) -> bool {
    let t = truth();
    t.providers.get(resource_type).is_some_and(|digest| {
        read_json(&t.data.join(format!("schemas/resources/{digest}.json")))["handlers"]["read"]
            .is_object()
    })
}

/// The values a path reaches, flattened (lists expanded at `*`); a value
/// the path cannot look into stands for itself.
fn reach<'a>(v: &'a Json, path: &[String], out: &mut Vec<&'a Json>) {
    match (path.split_first(), v) {
        (None, _) => out.push(v),
        (Some((seg, rest)), Json::Array(items)) if seg == "*" => {
            for i in items {
                reach(i, rest, out);
            }
        }
        (Some((seg, rest)), Json::Object(m))
            if !m.keys().any(|k| k == "Ref" || k.starts_with("Fn::")) =>
        {
            if let Some(inner) = m.get(seg) {
                reach(inner, rest, out);
            }
        }
        _ => out.push(v),
    }
}

/// Whether changing `before` into `after` (a resource's `Properties`)
/// replaces a resource of this type: a create-only property changes, or
/// refers to a parameter whose value changes.
pub fn replaces(
    resource_type: &str,
    before: &Json,
    after: &Json,
    refers_to_changed_parameter: impl Fn(&Json) -> bool,
) -> bool {
    create_only(resource_type).iter().any(|path| {
        let (mut b, mut a) = (Vec::new(), Vec::new());
        reach(before, path, &mut b);
        reach(after, path, &mut a);
        b != a || a.iter().any(|v| refers_to_changed_parameter(v))
    })
}
