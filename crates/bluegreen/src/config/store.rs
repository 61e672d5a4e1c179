//! The `store:` section: where the state lives — SQLite under `state_dir` (the default), or a fleet's etcd cluster.

use std::time::Duration;

use serde::Deserialize;

use super::Validator;
use crate::duration::HumanDuration;

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStore {
    etcd: Option<RawEtcd>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawEtcd {
    #[serde(default)]
    endpoints: Vec<String>,
    prefix: Option<String>,
    user: Option<String>,
    password_file: Option<String>,
    timeout: Option<HumanDuration>,
    confirm_timeout: Option<HumanDuration>,
    tls: Option<RawEtcdTls>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawEtcdTls {
    ca_file: Option<String>,
    cert_file: Option<String>,
    key_file: Option<String>,
}

/// Where the controller keeps its state.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreSettings {
    /// `state_dir/state.db`: one machine.
    Sqlite,
    /// A fleet's shared state.
    Etcd(EtcdSettings),
}

/// How to reach the etcd cluster, and under which prefix this service's keys live.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdSettings {
    /// `http://host:port` of each member (any reachable one serves).
    pub endpoints: Vec<String>,
    /// `/bluegreen/<service>` unless given; no trailing `/`.
    pub prefix: String,
    /// User and password, when the cluster has auth enabled.
    pub user: Option<(String, String)>,
    /// For connecting and for each request.
    pub timeout: Duration,
    /// How long a switch waits for every live router to apply it before naming the ones that
    /// have not.
    pub confirm_timeout: Duration,
    /// https to the members: the CA that signed their certificates, and this router's own
    /// certificate and key when the cluster asks clients for one.
    pub tls: Option<EtcdTls>,
}

/// PEM text, read when the config is loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdTls {
    pub ca: String,
    pub identity: Option<(String, String)>,
}

/// How long a request to etcd may take unless `store.etcd.timeout` says otherwise.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a switch waits for the fleet's routers unless `store.etcd.confirm_timeout` says.
const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(10);

impl Validator<'_> {
    pub(super) fn store(&mut self, raw: Option<RawStore>, service: &str) -> StoreSettings {
        let Some(etcd) = raw.and_then(|raw| raw.etcd) else {
            return StoreSettings::Sqlite;
        };
        if etcd.endpoints.is_empty() {
            self.issue(
                "store.etcd.endpoints",
                "is empty; list the cluster's client URLs, e.g. [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]",
            );
        }
        let tls = etcd.tls.and_then(|tls| self.etcd_tls(tls));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let mut endpoints = Vec::new();
        for (i, endpoint) in etcd.endpoints.iter().enumerate() {
            let key = format!("store.etcd.endpoints[{i}]");
            let address = match endpoint.split_once("://") {
                Some((given @ ("http" | "https"), rest)) if given == scheme => rest,
                Some(("https", _)) => {
                    self.issue(
                        key,
                        "https needs store.etcd.tls: { ca_file: … } (the CA that signed the members' certificates)",
                    );
                    continue;
                }
                Some(("http", _)) => {
                    self.issue(
                        key,
                        "http with store.etcd.tls set; write https://host:port, or remove store.etcd.tls",
                    );
                    continue;
                }
                Some((scheme, _)) => {
                    self.issue(
                        key,
                        format!("unknown scheme {scheme:?}; use http://host:port"),
                    );
                    continue;
                }
                None => endpoint.as_str(),
            };
            let port_ok = address.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !port_ok || address.contains('/') {
                self.issue(
                    key,
                    format!("{endpoint:?} is not host:port; e.g. http://10.0.0.1:2379"),
                );
                continue;
            }
            endpoints.push(format!("{scheme}://{address}"));
        }
        let prefix = match etcd.prefix {
            None => format!("/bluegreen/{service}"),
            Some(prefix) => {
                let trimmed = prefix.trim_end_matches('/').to_string();
                if !trimmed.starts_with('/') || trimmed.len() < 2 {
                    self.issue(
                        "store.etcd.prefix",
                        format!("{prefix:?} is not a key prefix; give one starting with /, e.g. /bluegreen/{service}"),
                    );
                }
                trimmed
            }
        };
        let user = match (etcd.user, etcd.password_file) {
            (None, None) => None,
            (Some(user), Some(file)) => {
                let path = self.resolve(&file);
                match std::fs::read_to_string(&path) {
                    Ok(password) => {
                        Some((user, password.trim_end_matches(['\n', '\r']).to_string()))
                    }
                    Err(e) => {
                        self.issue(
                            "store.etcd.password_file",
                            format!("cannot read {}: {e}", path.display()),
                        );
                        None
                    }
                }
            }
            (Some(_), None) => {
                self.issue(
                    "store.etcd.password_file",
                    "is required with store.etcd.user: a file holding the user's password",
                );
                None
            }
            (None, Some(_)) => {
                self.issue(
                    "store.etcd.user",
                    "is required with store.etcd.password_file: the etcd user the password is for",
                );
                None
            }
        };
        let timeout = etcd.timeout.map_or(DEFAULT_TIMEOUT, |t| t.0);
        if timeout.is_zero() {
            self.issue("store.etcd.timeout", "must be longer than 0s, e.g. 5s");
        }
        let confirm_timeout = etcd
            .confirm_timeout
            .map_or(DEFAULT_CONFIRM_TIMEOUT, |t| t.0);
        if confirm_timeout.is_zero() {
            self.issue(
                "store.etcd.confirm_timeout",
                "must be longer than 0s, e.g. 10s",
            );
        }
        StoreSettings::Etcd(EtcdSettings {
            endpoints,
            prefix,
            user,
            timeout,
            confirm_timeout,
            tls,
        })
    }

    /// The text of `store.etcd.tls.<key>`'s file, or an issue naming the key.
    fn read_pem(&mut self, key: &str, file: &str) -> Option<String> {
        let path = self.resolve(file);
        match std::fs::read_to_string(&path) {
            Ok(text) => Some(text),
            Err(e) => {
                self.issue(
                    format!("store.etcd.tls.{key}"),
                    format!("cannot read {}: {e}", path.display()),
                );
                None
            }
        }
    }

    /// The CA (required) and this router's certificate and key (both, or neither), read now.
    fn etcd_tls(&mut self, tls: RawEtcdTls) -> Option<EtcdTls> {
        let ca = match tls.ca_file {
            Some(file) => self.read_pem("ca_file", &file),
            None => {
                self.issue(
                    "store.etcd.tls.ca_file",
                    "is required: the PEM file of the CA that signed the etcd members' certificates",
                );
                None
            }
        };
        let identity = match (tls.cert_file, tls.key_file) {
            (None, None) => Some(None),
            (Some(cert), Some(key)) => {
                let (cert, key) = (
                    self.read_pem("cert_file", &cert),
                    self.read_pem("key_file", &key),
                );
                cert.zip(key).map(Some)
            }
            (Some(_), None) | (None, Some(_)) => {
                self.issue(
                    "store.etcd.tls",
                    "cert_file and key_file go together: this router's client certificate and its key",
                );
                None
            }
        };
        Some(EtcdTls {
            ca: ca?,
            identity: identity?,
        })
    }
}
