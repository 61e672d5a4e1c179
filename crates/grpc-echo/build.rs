//! Generates the echo service's and the gRPC health protocol's code from proto/ (protoc, which
//! etcd-client's build needs as well).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .compile_protos(&["proto/echo.proto", "proto/health.proto"], &["proto"])?;
    Ok(())
}
