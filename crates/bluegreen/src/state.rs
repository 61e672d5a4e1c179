//! The router's switch state on disk: written atomically, read back on start, older versions accepted.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bluegreen_router::{Color, Split};
use serde::{Deserialize, Serialize};

pub const SCHEMA_VERSION: u32 = 1;

/// What must survive a restart: the split in service, the color a rollback returns to, and
/// upstreams set at runtime.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterState {
    #[serde(default)]
    pub schema: u32,
    pub split: Split,
    /// The color that last had all traffic before the current state; `None` until a change.
    #[serde(default)]
    pub rollback_to: Option<Color>,
    /// Upstreams set with `bluegreen upstreams`; they win over the config's.
    #[serde(default)]
    pub upstreams: UpstreamOverrides,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpstreamOverrides {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blue: Option<Vec<SocketAddr>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub green: Option<Vec<SocketAddr>>,
}

impl UpstreamOverrides {
    pub fn get(&self, color: Color) -> Option<&Vec<SocketAddr>> {
        match color {
            Color::Blue => self.blue.as_ref(),
            Color::Green => self.green.as_ref(),
        }
    }

    pub fn set(&mut self, color: Color, addrs: Vec<SocketAddr>) {
        match color {
            Color::Blue => self.blue = Some(addrs),
            Color::Green => self.green = Some(addrs),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read state {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "state {path} is not valid (move it aside to start from the config's initial_live): {source}"
    )]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "state {path} has schema {found}, newer than this binary understands ({SCHEMA_VERSION}); upgrade bluegreen"
    )]
    TooNew { path: PathBuf, found: u32 },
    #[error("cannot write state {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(dir: &Path) -> StateFile {
        StateFile {
            path: dir.join("router-state.json"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn load(&self) -> Result<Option<RouterState>, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StateError::Read {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let state: RouterState =
            serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: self.path.clone(),
                source,
            })?;
        if state.schema > SCHEMA_VERSION {
            return Err(StateError::TooNew {
                path: self.path.clone(),
                found: state.schema,
            });
        }
        Ok(Some(state))
    }

    /// Temp file, fsync, rename, fsync the folder: a crash leaves the old state or the new one.
    pub fn save(&self, state: &RouterState) -> Result<(), StateError> {
        let write_error = |source| StateError::Write {
            path: self.path.clone(),
            source,
        };
        let mut state = state.clone();
        state.schema = SCHEMA_VERSION;
        let json = serde_json::to_vec_pretty(&state).expect("state serializes");
        let temp = self.path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temp).map_err(write_error)?;
        file.write_all(&json).map_err(write_error)?;
        file.sync_all().map_err(write_error)?;
        std::fs::rename(&temp, &self.path).map_err(write_error)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(write_error)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("bluegreen-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn saved_state_loads_back() {
        let file = StateFile::new(&temp_dir("roundtrip"));
        assert_eq!(file.load().unwrap(), None);
        let state = RouterState {
            schema: SCHEMA_VERSION,
            split: Split::all(Color::Green),
            rollback_to: Some(Color::Blue),
            upstreams: UpstreamOverrides {
                blue: None,
                green: Some(vec!["127.0.0.1:9005".parse().unwrap()]),
            },
        };
        file.save(&state).unwrap();
        assert_eq!(file.load().unwrap(), Some(state));
    }

    #[test]
    fn a_state_without_schema_or_rollback_color_still_loads() {
        let file = StateFile::new(&temp_dir("old"));
        std::fs::write(file.path(), r#"{"split":{"green_percent":40}}"#).unwrap();
        let state = file.load().unwrap().unwrap();
        assert_eq!(state.split, Split::green_percent(40).unwrap());
        assert_eq!(state.rollback_to, None);
    }

    #[test]
    fn a_newer_or_broken_state_is_refused_with_a_reason() {
        let file = StateFile::new(&temp_dir("bad"));
        std::fs::write(file.path(), r#"{"schema":99,"split":{"green_percent":0}}"#).unwrap();
        assert!(matches!(
            file.load(),
            Err(StateError::TooNew { found: 99, .. })
        ));
        std::fs::write(file.path(), "{not json").unwrap();
        assert!(matches!(file.load(), Err(StateError::Corrupt { .. })));
    }
}
