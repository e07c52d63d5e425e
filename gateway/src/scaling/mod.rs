//! Autoscaling: the `com.openfaas.scale.*` labels (validated at deploy), and the
//! AlertManager path (`POST /system/alert`), OpenFaaS's classic loop.

pub mod alerts;
pub mod autoscaler;
pub mod labels;
pub mod target;
