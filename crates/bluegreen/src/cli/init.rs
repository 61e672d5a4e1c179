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

/// The `app` section `init --docker IMAGE` writes instead of the example app's.
const DOCKER_APP: &str = r#"# The shared spec of both environments: `instances` containers of `image:VERSION` per color,
# each published on a free port of 127.0.0.1 that the router routes to (docs/containers.md).
app:
  provider: docker
  image: {image}            # no tag: `bluegreen deploy --version 2.0` runs {image}:2.0
  port: 8080                         # the port the app listens on inside the container
  instances: 2
  pull: if-missing                   # never: only images the engine has; always: pull at each deploy
  ready_timeout: 60s
  # env: { LOG_LEVEL: info }
  # cpus: 0.5
  # memory: 256m
  # retain: 3                        # stopped containers of the last 3 versions, for `rollback --to`

"#;

pub fn render(binary: &Path) -> String {
    let quoted = shlex::try_quote(&binary.to_string_lossy())
        .map(|q| q.into_owned())
        .unwrap_or_else(|_| binary.display().to_string());
    TEMPLATE.replace("{bluegreen}", &quoted)
}

/// The config for containers of `image`: the example's, with the docker provider's `app`, and
/// health and smoke tests any HTTP service answers.
pub fn render_docker(image: &str) -> String {
    let template = render(Path::new("bluegreen"));
    let start = template
        .find("# The shared spec of both environments.")
        .expect("the template has an app section");
    let end = template
        .find("# Per-color overrides")
        .expect("the template has environments");
    let app = DOCKER_APP.replace("{image}", image);
    // The service is named after the image (`registry.example/team/web` → `web`), which also
    // names its containers (`web-green-2.0-1`).
    let service = image.rsplit('/').next().unwrap_or(image);
    format!("{}{app}{}", &template[..start], &template[end..])
        .replace("service: example\n", &format!("service: {service}\n"))
        .replace(
            "health: { path: /healthz,",
            "# health: the path your app answers 2xx on
health: { path: /,",
        )
        .replace(
            "    - { path: /, status: 200, body_contains: \"{version}\", max_latency: 500ms }\n",
            "",
        )
        .replace(
            "    - { path: /healthz, status: 200 }",
            "    - { path: /, status: 200, max_latency: 500ms }",
        )
}

pub fn write(path: &Path, force: bool, docker: Option<&str>) -> Result<(), CliError> {
    if path.exists() && !force {
        return Err(CliError::new(
            exit::REFUSED,
            format!(
                "{} already exists; pass --force to overwrite it, or --config to write elsewhere",
                path.display()
            ),
        ));
    }
    let text = match docker {
        Some(image) => {
            let text = render_docker(image);
            // Checked as `up` would, so a bad image name is refused here and nothing is written.
            let base = path.parent().unwrap_or(Path::new("."));
            if let Err(issues) = crate::config::Config::parse(&text, base) {
                let issues: Vec<String> = issues
                    .iter()
                    .map(|i| i.to_string().replace("app.image", "--docker"))
                    .collect();
                return Err(CliError::new(exit::USAGE, issues.join("\n")));
            }
            text
        }
        None => {
            let binary = std::env::current_exe().map_err(|e| {
                CliError::new(exit::FAILURE, format!("cannot find this binary: {e}"))
            })?;
            render(&binary)
        }
    };
    std::fs::write(path, text).map_err(|e| {
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

    #[test]
    fn the_docker_init_config_loads_and_runs_the_image() {
        let text = render_docker("registry.example/team/web");
        let config = Config::parse(&text, Path::new("/srv")).unwrap_or_else(|issues| {
            panic!("{issues:?}\n{text}");
        });
        let green = config
            .controller
            .environment(bluegreen_router::Color::Green);
        let crate::config::controller::ProviderSpec::Docker(
            crate::config::controller::DockerSpec { image, port, .. },
        ) = &green.provider
        else {
            panic!("the docker provider: {:?}", green.provider);
        };
        assert_eq!((image.as_str(), *port), ("registry.example/team/web", 8080));
        assert_eq!(config.service, "web");
        assert!(!text.contains("example-app"), "{text}");
        assert!(
            !text.contains("{version}\", max_latency"),
            "no example-app check: {text}"
        );
    }
}
