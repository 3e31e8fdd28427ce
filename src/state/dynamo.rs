//! [`Store`] on DynamoDB: one table, string keys `pk` (partition) and `sk`
//! (sort), on-demand capacity, TTL on `expires_at`. Conditions are
//! DynamoDB condition expressions, so the check and the write are one
//! atomic operation on the server.

use std::collections::HashMap;

use aws_sdk_dynamodb as ddb;
use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_smithy_runtime_api::client::result::SdkError;

use super::{Expect, Item, StateError, Store};

/// The table's attribute that DynamoDB's TTL reads.
pub const TTL_ATTRIBUTE: &str = "expires_at";

/// The state table on DynamoDB.
#[derive(Clone)]
pub struct DynamoStore {
    client: ddb::Client,
    table: String,
}

/// Classifies a DynamoDB error.
fn error<E, R>(table: &str, err: SdkError<E, R>) -> StateError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let code = err.code().unwrap_or_default().to_owned();
    match code.as_str() {
        "ConditionalCheckFailedException" | "TransactionConflictException" => {
            StateError::Conflict(table.to_owned())
        }
        "ResourceNotFoundException" => StateError::NoTable(table.to_owned()),
        _ => StateError::Other(format!("{table}: {}", crate::cloud::aws::classify(err))),
    }
}

impl DynamoStore {
    /// A store on `table`, with the standard AWS configuration (the
    /// management account's credentials; `AWS_ENDPOINT_URL` for an
    /// emulator). Retries: the SDK's standard mode, since these are few
    /// and small calls outside the stack operations' budget.
    pub async fn connect(table: &str) -> DynamoStore {
        // Bounded calls: a hung request must not stall lease renewals
        // (every round renews within a few seconds, or lets the lease lapse
        // on its own clock).
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(std::time::Duration::from_secs(3))
            .operation_attempt_timeout(std::time::Duration::from_secs(3))
            .operation_timeout(std::time::Duration::from_secs(8))
            .build();
        let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .timeout_config(timeouts)
            .load()
            .await;
        DynamoStore::new(&config, table)
    }

    /// A store on `table` with this configuration.
    pub fn new(config: &aws_config::SdkConfig, table: &str) -> DynamoStore {
        DynamoStore {
            client: ddb::Client::new(config),
            table: table.to_owned(),
        }
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table (on-demand, `pk`/`sk`, TTL on `expires_at`) and
    /// waits until it is active. An existing table is checked for the key
    /// schema and left as it is. Returns whether it created it.
    pub async fn create_table(&self) -> Result<bool, StateError> {
        use ddb::types::{
            AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
            TableStatus, TimeToLiveSpecification,
        };
        let key = |name: &str, kind| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
                .expect("complete")
        };
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("complete")
        };
        let created = match self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(key("pk", KeyType::Hash))
            .key_schema(key("sk", KeyType::Range))
            .attribute_definitions(attr("pk"))
            .attribute_definitions(attr("sk"))
            .send()
            .await
        {
            Ok(_) => true,
            Err(e) if e.code() == Some("ResourceInUseException") => false,
            Err(e) => return Err(error(&self.table, e)),
        };
        // Until ACTIVE, the table takes no writes (and no TTL setting).
        let mut wait = std::time::Duration::from_millis(200);
        loop {
            let out = self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
                .map_err(|e| error(&self.table, e))?;
            let table = out
                .table()
                .ok_or_else(|| StateError::Other("DescribeTable: no table".into()))?;
            let keys: Vec<(&str, &KeyType)> = table
                .key_schema()
                .iter()
                .map(|k| (k.attribute_name(), k.key_type()))
                .collect();
            if keys != [("pk", &KeyType::Hash), ("sk", &KeyType::Range)] {
                return Err(StateError::Other(format!(
                    "{} exists with another key schema ({keys:?}); the state table needs pk (HASH) and sk (RANGE), both strings",
                    self.table
                )));
            }
            if table.table_status() == Some(&TableStatus::Active) {
                break;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(std::time::Duration::from_secs(5));
        }
        let ttl = self
            .client
            .describe_time_to_live()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| error(&self.table, e))?;
        let enabled = ttl.time_to_live_description().is_some_and(|d| {
            d.attribute_name() == Some(TTL_ATTRIBUTE)
                && matches!(
                    d.time_to_live_status(),
                    Some(ddb::types::TimeToLiveStatus::Enabled)
                        | Some(ddb::types::TimeToLiveStatus::Enabling)
                )
        });
        if !enabled {
            self.client
                .update_time_to_live()
                .table_name(&self.table)
                .time_to_live_specification(
                    TimeToLiveSpecification::builder()
                        .attribute_name(TTL_ATTRIBUTE)
                        .enabled(true)
                        .build()
                        .expect("complete"),
                )
                .send()
                .await
                .map_err(|e| error(&self.table, e))?;
        }
        Ok(created)
    }
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The condition expression (and its values) of a write that expects the
/// item as `expect` says: one place for PutItem and DeleteItem.
fn condition(expect: Expect) -> (Option<String>, Option<HashMap<String, AttributeValue>>) {
    match expect {
        Expect::Any => (None, None),
        Expect::Absent => (Some("attribute_not_exists(pk)".into()), None),
        Expect::Version(v) => (
            Some("version = :v".into()),
            Some(HashMap::from([(":v".to_owned(), n(v))])),
        ),
    }
}

fn item_of(table: &str, attrs: &HashMap<String, AttributeValue>) -> Result<Item, StateError> {
    let corrupt = |what: &str| StateError::Corrupt(format!("{table}: an item without {what}"));
    let text = |k: &str| attrs.get(k).and_then(|v| v.as_s().ok()).cloned();
    let number = |k: &str| {
        attrs
            .get(k)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let body = text("body").ok_or_else(|| corrupt("body"))?;
    Ok(Item {
        pk: text("pk").ok_or_else(|| corrupt("pk"))?,
        sk: text("sk").ok_or_else(|| corrupt("sk"))?,
        version: number("version").ok_or_else(|| corrupt("version"))?,
        body: serde_json::from_str(&body)
            .map_err(|e| StateError::Corrupt(format!("{table}: body: {e}")))?,
        expires_at: number(TTL_ATTRIBUTE),
    })
}

impl Store for DynamoStore {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StateError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("pk", s(pk))
            .key("sk", s(sk))
            // A conditional write follows most reads: it must see the last
            // write.
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| error(&self.table, e))?;
        out.item().map(|i| item_of(&self.table, i)).transpose()
    }

    async fn put(&self, item: &Item, expect: Expect) -> Result<(), StateError> {
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item("pk", s(&item.pk))
            .item("sk", s(&item.sk))
            .item("version", n(item.version))
            .item("body", s(&item.body.to_string()));
        if let Some(t) = item.expires_at {
            req = req.item(TTL_ATTRIBUTE, n(t));
        }
        let (condition, values) = condition(expect);
        req.set_condition_expression(condition)
            .set_expression_attribute_values(values)
            .send()
            .await
            .map_err(|e| error(&self.table, e))?;
        Ok(())
    }

    async fn delete(&self, pk: &str, sk: &str, expect: Expect) -> Result<(), StateError> {
        let req = self
            .client
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(pk))
            .key("sk", s(sk));
        let (condition, values) = condition(expect);
        req.set_condition_expression(condition)
            .set_expression_attribute_values(values)
            .send()
            .await
            .map_err(|e| error(&self.table, e))?;
        Ok(())
    }

    async fn query(&self, pk: &str, prefix: &str) -> Result<Vec<Item>, StateError> {
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                .expression_attribute_values(":pk", s(pk))
                .expression_attribute_values(":prefix", s(prefix))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| error(&self.table, e))?;
            for i in page.items() {
                out.push(item_of(&self.table, i)?);
            }
            match page.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(out),
            }
        }
    }
}
