//! The image `bluegreen demo --docker` runs: this very binary (whose `example-app` is the demo's service) and the shared libraries it loads, `FROM scratch`, built through the Engine API.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::Docker;
use bollard::query_parameters::{
    BuildImageOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    RemoveImageOptionsBuilder, TagImageOptionsBuilder,
};
use futures_util::StreamExt;

/// The demo's image repository; each version the demo releases is a tag of the same image
/// (the version an instance reports comes from its command line).
pub const REPOSITORY: &str = "bluegreen-demo-app";
pub const TAGS: [&str; 4] = ["1.0", "2.0", "3.0", "4.0"];

/// Builds `REPOSITORY:1.0` from `binary` and its shared libraries, and tags it 2.0 and 3.0.
pub async fn build(docker: &Docker, binary: &Path) -> Result<(), String> {
    let mut files = vec![(PathBuf::from("bluegreen"), binary.to_path_buf(), 0o755)];
    for library in shared_libraries(binary)? {
        let inside = library.strip_prefix("/").unwrap_or(&library).to_path_buf();
        files.push((inside, library, 0o755));
    }
    let dockerfile = "FROM scratch\nCOPY . /\nENTRYPOINT [\"/bluegreen\", \"example-app\"]\nCMD [\"--listen\", \"0.0.0.0:8080\"]\n";
    // Plain ustar entries: some engines refuse GNU sparse ones.
    let mut context = tar::Builder::new(Vec::new());
    let mut add = |name: &Path, bytes: &[u8], mode: u32| {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(mode);
        header.set_cksum();
        context
            .append_data(&mut header, name, bytes)
            .map_err(|e| format!("cannot pack {}: {e}", name.display()))
    };
    add(Path::new("Dockerfile"), dockerfile.as_bytes(), 0o644)?;
    for (inside, outside, mode) in &files {
        let bytes = std::fs::read(outside)
            .map_err(|e| format!("cannot read {}: {e}", outside.display()))?;
        add(inside, &bytes, *mode)?;
    }
    let context = context
        .into_inner()
        .map_err(|e| format!("cannot pack the image: {e}"))?;
    let first = format!("{REPOSITORY}:{}", TAGS[0]);
    let options = BuildImageOptionsBuilder::default()
        .dockerfile("Dockerfile")
        .t(&first)
        .rm(true)
        .forcerm(true)
        .build();
    let mut steps =
        std::pin::pin!(docker.build_image(options, None, Some(bollard::body_full(context.into()))));
    while let Some(step) = steps.next().await {
        let step = step.map_err(|e| format!("building {first}: {e}"))?;
        if let Some(error) = step.error_detail.and_then(|d| d.message) {
            return Err(format!("building {first}: {error}"));
        }
    }
    for tag in &TAGS[1..] {
        let options = TagImageOptionsBuilder::default()
            .repo(REPOSITORY)
            .tag(tag)
            .build();
        docker
            .tag_image(&first, Some(options))
            .await
            .map_err(|e| format!("tagging {REPOSITORY}:{tag}: {e}"))?;
    }
    Ok(())
}

/// Removes the containers of `service` (they outlive the daemon) and the demo's images.
pub async fn remove(docker: &Docker, service: &str) {
    let filters = HashMap::from([(
        "label".to_string(),
        vec![format!("bluegreen.service={service}")],
    )]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    for container in docker
        .list_containers(Some(options))
        .await
        .unwrap_or_default()
    {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        let _ = docker
            .remove_container(container.id.as_deref().unwrap_or_default(), Some(options))
            .await;
    }
    for tag in TAGS {
        let options = RemoveImageOptionsBuilder::default().force(true).build();
        let _ = docker
            .remove_image(&format!("{REPOSITORY}:{tag}"), Some(options), None)
            .await;
    }
}

/// The shared libraries `binary` loads, as the dynamic loader resolves them (`ldd`): the
/// loader itself and each `=> /path` it prints.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, String> {
    let output = std::process::Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| {
            format!(
                "cannot run ldd to list the libraries {} needs: {e}",
                binary.display()
            )
        })?;
    let text = String::from_utf8_lossy(&output.stdout);
    if text.contains("not a dynamic executable") || text.contains("statically linked") {
        return Ok(Vec::new());
    }
    let libraries: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved.trim(),
                None => line.trim(),
            };
            let path = path.split(" (").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect();
    if libraries.is_empty() {
        return Err(format!(
            "ldd listed no libraries for {}: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(libraries)
}
