//! A workload source holding a list set by its owner: for tests, and for nodes whose
//! replicas are known up front.

use std::sync::{Arc, Mutex};

use super::{Replica, WorkloadSource};
use crate::error::Error;

/// A shared, replaceable list of replicas.
#[derive(Clone, Default)]
pub struct FixedWorkloads {
    list: Arc<Mutex<Vec<Replica>>>,
}

impl FixedWorkloads {
    pub fn new(list: Vec<Replica>) -> Self {
        Self {
            list: Arc::new(Mutex::new(list)),
        }
    }

    /// Replaces the list; the agent picks it up at its next poll.
    pub fn set(&self, list: Vec<Replica>) {
        *self.list.lock().unwrap_or_else(|p| p.into_inner()) = list;
    }
}

impl WorkloadSource for FixedWorkloads {
    async fn replicas(&self) -> Result<Vec<Replica>, Error> {
        Ok(self.list.lock().unwrap_or_else(|p| p.into_inner()).clone())
    }
}
