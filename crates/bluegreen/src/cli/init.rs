//! `bluegreen init`: a commented starting config that runs the example app under the process provider.

use std::path::Path;

use crate::exit::{self, CliError};

/// The config `init` writes; `{bluegreen}` becomes the path of this binary.
pub const TEMPLATE: &str = r#"# bluegreen config: two environments (blue and green) of one service behind one router.
# Every key is described in docs/config.md. Start the daemon with `bluegreen up`.
service: example

router:
  listen: 127.0.0.1:8080             # where users' traffic arrives
  admin: .bluegreen/admin.sock       # unix socket (mode 0600) for the CLI
  drain_timeout: 30s                 # how long the old color's requests may finish after a switch

# The shared spec of both environments. The process provider starts `instances` copies of
# `command` on free ports ({port}, {version} and {color} are filled in), restarts them when
# they crash, and keeps their output under .bluegreen/logs/.
app:
  provider: process
  command: "{bluegreen} example-app --listen 127.0.0.1:{port} --color {color} --app-version {version}"
  instances: 2
  ready_timeout: 30s

# Per-color overrides (`bluegreen diff blue green` lists them; `release` warns about them).
environments:
  blue: {}
  green: {}

health: { path: /healthz, interval: 1s, timeout: 1s, healthy_threshold: 2, unhealthy_threshold: 3 }

# Smoke tests of the idle color, sent through the router's preview route before any switch.
test:
  checks:
    - { path: /healthz, status: 200 }
    - { path: /, status: 200, body_contains: "{version}", max_latency: 500ms }

release:
  strategy: canary-10-1m             # or instant, linear-10-every-1m, or a name below
  monitor_window: 1m                 # analysis keeps watching after 100 %
  scale_down_delay: 10m              # the old color stays warm (instant rollback) this long
  pipeline: [deploy, test, switch, cleanup]

strategies:
  careful: { type: canary, steps: [5, 25, 50], wait: 2m }

# The new color is compared with the old on the router's own numbers; a breach rolls back.
analysis:
  interval: 1s
  min_requests: 50                   # a step goes on only once the new color had this many requests
  # on_too_few_requests: proceed     # for a quiet staging setup: go on unjudged instead of waiting
  error_rate: { max_percent: 5, max_increase_percent: 2 }
  latency_p99: { max_increase: 500ms }

# hooks: { pre_deploy: ./hooks/pre-deploy, migrate_expand: ./hooks/migrate, on_rollback: ./hooks/page }
# webhook: { url: "http://127.0.0.1:9000/bluegreen" }
"#;

pub fn render(binary: &Path) -> String {
    let quoted = shlex::try_quote(&binary.to_string_lossy())
        .map(|q| q.into_owned())
        .unwrap_or_else(|_| binary.display().to_string());
    TEMPLATE.replace("{bluegreen}", &quoted)
}

pub fn write(path: &Path, force: bool) -> Result<(), CliError> {
    if path.exists() && !force {
        return Err(CliError::new(
            exit::REFUSED,
            format!(
                "{} already exists; pass --force to overwrite it, or --config to write elsewhere",
                path.display()
            ),
        ));
    }
    let binary = std::env::current_exe()
        .map_err(|e| CliError::new(exit::FAILURE, format!("cannot find this binary: {e}")))?;
    std::fs::write(path, render(&binary)).map_err(|e| {
        CliError::new(
            exit::FAILURE,
            format!("cannot write {}: {e}", path.display()),
        )
    })?;
    println!(
        "wrote {}; next: `bluegreen up`, then `bluegreen deploy --environment blue --version 1.0` and `bluegreen release --version 2.0`",
        path.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn the_init_config_loads() {
        let text = render(Path::new("/usr/bin/bluegreen"));
        let config = Config::parse(&text, Path::new("/srv")).unwrap_or_else(|issues| {
            panic!("{issues:?}");
        });
        let green = config
            .controller
            .environment(bluegreen_router::Color::Green);
        assert_eq!(green.instances, 2);
        let crate::config::controller::ProviderSpec::Process { command } = &green.provider else {
            panic!(
                "the example runs on the process provider: {:?}",
                green.provider
            );
        };
        assert_eq!(command[0], "/usr/bin/bluegreen");
        assert_eq!(config.controller.strategy.steps.len(), 2);
    }
}
