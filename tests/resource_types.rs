//! The generated resource-type tables (`src/resource_types/`) against the
//! data they come from: the CloudFormation resource provider schemas and
//! the stateful-type list shipped in the pinned cfn-lint (`.venv`, made by
//! `scripts/setup-venv`), read here without the generator or its tables.

use serde_json::Value as Json;
use stackwarden::cloud::sim::cfnlint_data_dir;
use stackwarden::resource_types::{create_only_properties, stateful_types};
use std::collections::BTreeSet;
use std::path::PathBuf;

fn read(path: PathBuf) -> Json {
    serde_json::from_str(&std::fs::read_to_string(&path).expect("readable")).expect("json")
}

#[test]
fn every_create_only_property_of_every_schema_is_in_the_table() {
    let data = cfnlint_data_dir();
    let providers = read(data.join("schemas/providers/us-east-1.json"));
    let documented = include_str!("../src/resource_types/documented_replacements.tsv");
    let mut types = 0;
    for (ty, digest) in providers.as_object().expect("map") {
        let schema = read(data.join(format!(
            "schemas/resources/{}.json",
            digest.as_str().expect("digest")
        )));
        let mut want: BTreeSet<String> = schema["createOnlyProperties"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str()?.strip_prefix("/properties/"))
            .map(|p| p.replace('/', "."))
            .collect();
        for line in documented.lines().filter(|l| !l.starts_with('#')) {
            let f: Vec<&str> = line.split('\t').collect();
            if f[0] == ty {
                want.insert(f[1].replace('/', "."));
            }
        }
        let have: BTreeSet<String> = create_only_properties(ty)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(have, want, "{ty}");
        types += 1;
    }
    assert!(types > 1000, "only {types} resource types in the schemas");
}

#[test]
fn the_stateful_types_are_cfn_lints() {
    let list = read(cfnlint_data_dir().join("AdditionalSpecs/StatefulResources.json"));
    let want: BTreeSet<&str> = list["ResourceTypes"]
        .as_object()
        .expect("map")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(stateful_types().collect::<BTreeSet<_>>(), want);
}
