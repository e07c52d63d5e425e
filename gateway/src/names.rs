//! Validated names: function names and namespaces (DNS-1123 labels) and the
//! `name.namespace` form used on invocation routes. Validated once at the edge.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a name was refused; the message is shown to the caller as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {why}")]
pub struct NameError {
    what: &'static str,
    value: String,
    why: &'static str,
}

fn check_label(what: &'static str, value: &str) -> Result<(), NameError> {
    let fail = |why| {
        Err(NameError {
            what,
            value: value.chars().take(80).collect(),
            why,
        })
    };
    if value.is_empty() {
        return fail("must not be empty");
    }
    if value.len() > 63 {
        return fail("must be at most 63 characters (a DNS-1123 label)");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return fail("may contain only lowercase letters, digits and '-' (a DNS-1123 label)");
    }
    if value.starts_with('-') || value.ends_with('-') {
        return fail("must start and end with a letter or digit (a DNS-1123 label)");
    }
    Ok(())
}

macro_rules! label_newtype {
    ($name:ident, $what:literal) => {
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, NameError> {
                let value = value.into();
                check_label($what, &value)?;
                Ok(Self(value))
            }

            /// Whether `value` would be accepted, without taking a copy of it.
            pub fn check(value: &str) -> Result<(), NameError> {
                check_label($what, value)
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = NameError;
            fn try_from(value: String) -> Result<Self, NameError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(value: &str) -> Result<Self, NameError> {
                Self::new(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

label_newtype!(FunctionName, "function name");
label_newtype!(Namespace, "namespace");

/// A function in a namespace: the key of everything the provider keeps.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionRef {
    pub namespace: Namespace,
    pub name: FunctionName,
}

impl FunctionRef {
    /// Parses `name` or `name.namespace` (split at the last dot) as on `/function/…`.
    pub fn parse_qualified(value: &str, default_ns: &Namespace) -> Result<Self, NameError> {
        match value.rsplit_once('.') {
            Some((name, ns)) => Ok(Self {
                name: FunctionName::new(name)?,
                namespace: Namespace::new(ns)?,
            }),
            None => Ok(Self {
                name: FunctionName::new(value)?,
                namespace: default_ns.clone(),
            }),
        }
    }

    /// The `fn.namespace` form used as the `function_name` metric label.
    pub fn metric_label(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }
}

impl fmt::Display for FunctionRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_follow_dns_1123() {
        assert!(FunctionName::new("env").is_ok());
        assert!(FunctionName::new("a-1").is_ok());
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"x".repeat(64)] {
            assert!(FunctionName::new(bad).is_err(), "{bad:?} accepted");
        }
        let err = FunctionName::new("Bad_Name").unwrap_err().to_string();
        assert!(err.contains("lowercase"), "{err}");
    }

    #[test]
    fn qualified_names_split_at_the_last_dot() {
        let default = Namespace::new("openfaas-fn").unwrap();
        let r = FunctionRef::parse_qualified("env", &default).unwrap();
        assert_eq!(r.metric_label(), "env.openfaas-fn");
        let r = FunctionRef::parse_qualified("env.staging", &default).unwrap();
        assert_eq!((r.name.as_str(), r.namespace.as_str()), ("env", "staging"));
        assert!(FunctionRef::parse_qualified("a.b.c", &default).is_err());
    }
}
