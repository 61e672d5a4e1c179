//! Helpers the fuzz targets share.

/// Config and admin inputs name hosts that `parse_socket_addr` resolves with getaddrinfo;
/// fuzzing must not send DNS queries off the machine, so these targets run in a network
/// namespace of their own (`unshare -rn`, see fuzz/run), where only a downed loopback exists.
pub fn require_no_network() {
    let devices = std::fs::read_to_string("/proc/self/net/dev").unwrap_or_default();
    let others: Vec<&str> = devices
        .lines()
        .skip(2)
        .filter_map(|line| line.split(':').next())
        .map(str::trim)
        .filter(|name| *name != "lo")
        .collect();
    assert!(
        others.is_empty() || std::env::var_os("BLUEGREEN_FUZZ_ALLOW_NETWORK").is_some(),
        "this target resolves fuzzed host names; run it under `unshare -rn` (fuzz/run does) \
         so no DNS query leaves the machine, or set BLUEGREEN_FUZZ_ALLOW_NETWORK=1 \
         (network interfaces seen: {others:?})"
    );
}
