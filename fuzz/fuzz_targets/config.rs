//! Fuzz target: YAML config text through `Config::parse` (parse and validate) must never panic.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use bluegreen::config::Config;
use libfuzzer_sys::fuzz_target;

/// An empty folder the config's relative paths resolve against, made once per process.
fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        common::require_no_network();
        let dir =
            std::env::temp_dir().join(format!("bluegreen-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    })
}

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The validator reads the files a config names (token, secret, CA); a config naming
    // /dev/zero or a FIFO would block or fill memory, which is the operator's own doing.
    if ["dev/", "proc/", "sys/", "fd/"]
        .iter()
        .any(|p| text.contains(p))
    {
        return;
    }
    match Config::parse(text, base()) {
        Ok(_) => {}
        Err(issues) => {
            assert!(
                !issues.is_empty(),
                "an invalid config names at least one issue"
            );
            for issue in &issues {
                assert!(
                    !issue.message.is_empty(),
                    "issue without a message: {issue:?}"
                );
            }
        }
    }
});
