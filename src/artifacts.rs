//! The artifact bucket: templates CloudFormation cannot take inline (over
//! 51,200 bytes in the request) and local nested-stack templates, uploaded
//! to S3 and passed by URL, as `aws cloudformation package` does.
//!
//! Keys are content-addressed (`<prefix><sha256 of the body>.template`): a
//! template is uploaded once, an object is never overwritten, and a change
//! of a nested template changes its URL, hence its parent's revision.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value as Json;
use sha2::{Digest, Sha256};

use crate::cloud::{Cloud, CloudError, CloudResult};

/// Where an environment's templates go: `artifacts:` in the desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactStore {
    pub bucket: String,
    /// Prepended to every key; empty or ending with `/`.
    pub prefix: String,
    /// Upload every template, not only those too large to send inline.
    pub always: bool,
}

/// One template to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub bucket: String,
    pub key: String,
    /// The https URL CloudFormation reads it from.
    pub url: String,
    /// The region the bucket must be in: the stack's.
    pub region: String,
    pub body: String,
    /// The file it was read from (for messages).
    pub source: PathBuf,
}

impl ArtifactStore {
    /// The artifact for `body`, read from `source`, for a stack in `region`.
    pub fn artifact(&self, region: &str, source: PathBuf, body: String) -> Artifact {
        let key = format!(
            "{}{}.template",
            self.prefix,
            hex::encode(Sha256::digest(body.as_bytes()))
        );
        Artifact {
            url: url(&self.bucket, region, &key),
            bucket: self.bucket.clone(),
            key,
            region: region.to_owned(),
            body,
            source,
        }
    }
}

/// The https URL of an object (CloudFormation: "The location for an Amazon
/// S3 bucket must start with https://"). Virtual-hosted style, except for
/// bucket names with dots, whose virtual host no certificate covers.
pub fn url(bucket: &str, region: &str, key: &str) -> String {
    let domain = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    if bucket.contains('.') {
        format!("https://s3.{region}.{domain}/{bucket}/{key}")
    } else {
        format!("https://{bucket}.s3.{region}.{domain}/{key}")
    }
}

/// Whether `name` is a valid S3 bucket name (general purpose buckets):
/// 3 to 63 lower-case letters, digits, dots and hyphens, starting and
/// ending with a letter or digit, no two adjacent dots, not an IP address.
///
/// # Errors
/// What is wrong with it.
pub fn check_bucket_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-');
    let ends_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !(3..=63).contains(&name.len())
        || !ok_chars
        || !ends_ok(name.chars().next())
        || !ends_ok(name.chars().last())
        || name.contains("..")
        || name.parse::<std::net::Ipv4Addr>().is_ok()
    {
        return Err(format!(
            "`{name}` is not a valid S3 bucket name (3 to 63 lower-case letters, digits, dots and hyphens, starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// The nested stacks of a template whose `TemplateURL` is a local path
/// (not `https://`, `http://` or `s3://`): logical id and path as written.
pub fn local_nested(canonical: &Json) -> Vec<(String, String)> {
    let Some(Json::Object(resources)) = canonical.get("Resources") else {
        return Vec::new();
    };
    resources
        .iter()
        .filter(|(_, r)| r.get("Type").and_then(Json::as_str) == Some("AWS::CloudFormation::Stack"))
        .filter_map(|(id, r)| {
            let url = r.get("Properties")?.get("TemplateURL")?.as_str()?;
            let remote = ["https://", "http://", "s3://"]
                .iter()
                .any(|p| url.to_ascii_lowercase().starts_with(p));
            (!remote).then(|| (id.clone(), url.to_owned()))
        })
        .collect()
}

/// `canonical` with the `TemplateURL` of each nested stack in `urls`
/// (logical id to URL) replaced.
pub fn rewrite(canonical: &Json, urls: &BTreeMap<String, String>) -> Json {
    let mut out = canonical.clone();
    for (id, url) in urls {
        if let Some(p) = out
            .get_mut("Resources")
            .and_then(|r| r.get_mut(id))
            .and_then(|r| r.get_mut("Properties"))
            .and_then(Json::as_object_mut)
        {
            p.insert("TemplateURL".into(), Json::String(url.clone()));
        }
    }
    out
}

/// Uploads what is not in the bucket yet, after checking that each bucket
/// is in its stack's region. Returns how many objects were uploaded.
///
/// # Errors
/// A bucket in another region (a validation error naming both), or what S3
/// answers (a missing bucket, access denied).
pub async fn publish<C: Cloud>(cloud: &C, artifacts: &[Artifact]) -> CloudResult<usize> {
    let mut checked: Vec<&str> = Vec::new();
    let mut uploaded = 0;
    for a in artifacts {
        if !checked.contains(&a.bucket.as_str()) {
            let region = cloud.bucket_region(&a.bucket).await?;
            if region != a.region {
                return Err(CloudError::Validation(format!(
                    "artifact bucket {} is in {region}; CloudFormation reads templates from a bucket in the stack's region, {}",
                    a.bucket, a.region
                )));
            }
            checked.push(&a.bucket);
        }
        if cloud.put_artifact(&a.bucket, &a.key, &a.body).await? {
            uploaded += 1;
            tracing::info!(
                message = "Template uploaded.",
                bucket = %a.bucket,
                key = %a.key,
                source = %a.source.display(),
                bytes = a.body.len()
            );
        }
    }
    Ok(uploaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_content_addressed_and_urls_https() {
        let store = ArtifactStore {
            bucket: "team-artifacts".into(),
            prefix: "cfn/".into(),
            always: false,
        };
        let a = store.artifact("eu-west-1", "t.yaml".into(), "x".into());
        let b = store.artifact("eu-west-1", "u.yaml".into(), "x".into());
        assert_eq!(a.key, b.key);
        assert!(a.key.starts_with("cfn/") && a.key.ends_with(".template"));
        assert_eq!(
            a.url,
            format!(
                "https://team-artifacts.s3.eu-west-1.amazonaws.com/{}",
                a.key
            )
        );
        assert_ne!(
            a.key,
            store.artifact("eu-west-1", "t.yaml".into(), "y".into()).key
        );
        assert_eq!(
            url("a.b", "cn-north-1", "k"),
            "https://s3.cn-north-1.amazonaws.com.cn/a.b/k"
        );
    }

    #[test]
    fn bucket_names_follow_s3s_rules() {
        for good in ["abc", "my-bucket.v2", "0bucket"] {
            assert!(check_bucket_name(good).is_ok(), "{good}");
        }
        for bad in [
            "ab",
            "My-Bucket",
            "-bucket",
            "bucket-",
            "a..b",
            "192.168.1.1",
            "a_b",
        ] {
            assert!(check_bucket_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_nested_templates_are_found_and_rewritten() {
        let t = crate::yaml::parse_template(
            "Resources:\n  A: {Type: 'AWS::CloudFormation::Stack', Properties: {TemplateURL: child.yaml}}\n  B: {Type: 'AWS::CloudFormation::Stack', Properties: {TemplateURL: 'https://x.s3.amazonaws.com/k'}}\n  C: {Type: 'AWS::SNS::Topic'}\n",
        )
        .unwrap();
        assert_eq!(
            local_nested(&t),
            [("A".to_owned(), "child.yaml".to_owned())]
        );
        let out = rewrite(&t, &BTreeMap::from([("A".into(), "https://u".into())]));
        assert_eq!(
            out["Resources"]["A"]["Properties"]["TemplateURL"],
            "https://u"
        );
        assert_eq!(
            out["Resources"]["B"]["Properties"]["TemplateURL"],
            "https://x.s3.amazonaws.com/k"
        );
    }
}
