//! faas-cli's `stack.yml`: reading its functions and deploying them the way faas-cli
//! does (PUT to update, POST when the function does not exist yet).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Debug, Deserialize)]
pub struct Stack {
    pub functions: BTreeMap<String, StackFunction>,
}

#[derive(Debug, Deserialize)]
pub struct StackFunction {
    pub image: String,
    #[serde(default)]
    pub fprocess: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub requests: Option<BTreeMap<String, String>>,
}

pub fn load(path: &Path) -> Result<Stack> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// The `FunctionDeployment` body faas-cli would send for `f`.
pub fn deployment(name: &str, f: &StackFunction) -> Value {
    json!({
        "service": name,
        "image": f.image,
        "namespace": f.namespace,
        "envProcess": f.fprocess,
        "envVars": f.environment,
        "labels": f.labels,
        "annotations": f.annotations,
        "limits": f.limits,
        "requests": f.requests,
    })
}

/// Deploys like faas-cli: PUT first, POST when the gateway answers 404.
pub fn deploy(gateway: &str, auth: &str, body: &Value) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{gateway}/system/functions");
    let send = |method: &str| -> Result<(u16, String)> {
        let req = match method {
            "PUT" => agent.put(&url),
            _ => agent.post(&url),
        };
        let mut resp = req.header("Authorization", auth).send_json(body)?;
        let status = resp.status().as_u16();
        Ok((status, resp.body_mut().read_to_string().unwrap_or_default()))
    };
    let (mut status, mut text) = send("PUT")?;
    if status == 404 {
        (status, text) = send("POST")?;
    }
    if !(200..300).contains(&status) {
        bail!("deploying {}: {status} {text}", body["service"]);
    }
    Ok(())
}
