//! The JSON types of the OpenFaaS wire contract (spec section 2) plus Tally's additive
//! fields. Unknown fields are ignored; wrong types are reported with the field's path.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::names::{FunctionName, Namespace};

/// Resource quantities in Kubernetes notation (`128Mi`, `500m`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
}

/// Deploy / update body (`POST`/`PUT /system/functions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionDeployment {
    pub service: FunctionName,
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Namespace>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_process: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_root_filesystem: Option<bool>,
}

impl FunctionDeployment {
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env_vars.as_ref()?.get(key).map(String::as_str)
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.as_ref()?.get(key).map(String::as_str)
    }
}

/// Measured usage, returned by describe with `usage=1`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionUsage {
    /// CPU in milli-cores, averaged over the last sampling interval.
    pub cpu: f64,
    pub total_memory_bytes: f64,
}

/// List / describe item (`GET /system/functions`, `GET /system/function/NAME`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionStatus {
    pub name: String,
    pub image: String,
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_process: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env_vars: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_root_filesystem: Option<bool>,
    pub invocation_count: f64,
    pub replicas: u64,
    pub available_replicas: u64,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<FunctionUsage>,
    /// Tally: `fork` or `http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Tally: why replicas are not available (crash loop, missing command, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `POST /system/scale-function/NAME` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ScaleRequest {
    #[serde(default)]
    pub service_name: Option<String>,
    pub replicas: u64,
    #[serde(default)]
    pub namespace: Option<String>,
}

/// `DELETE /system/functions` body.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeleteRequest {
    pub function_name: FunctionName,
    #[serde(default)]
    pub namespace: Option<Namespace>,
}

/// One line of `/system/logs` (NDJSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub name: String,
    pub namespace: String,
    pub instance: String,
    pub timestamp: String,
    pub text: String,
}
