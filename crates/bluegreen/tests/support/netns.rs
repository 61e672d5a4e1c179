//! Test hosts: network namespaces on a bridge, each with its own address, loopback and processes, and a route to one address the test can cut.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Child, Command, Stdio};

/// `count` hosts `10.201.N.11`, `.12`, … on a bridge whose side in this (the test's)
/// namespace is `10.201.N.1`; `10.201.N.2` is a second address on it for services only some
/// hosts may reach (`cut_from`). Everything is removed when dropped.
pub struct Hosts {
    pub names: Vec<String>,
    pub addresses: Vec<IpAddr>,
    /// The bridge's second address (the etcd cluster's, in the fleet test).
    pub service: IpAddr,
    bridge: String,
    processes: Vec<Child>,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Hosts {
    pub fn create(count: usize) -> Hosts {
        // Unique per test process and per set of hosts in it (tests run concurrently).
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nth = MADE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let tag = (std::process::id() % 10_000) * 10 + nth % 10;
        let subnet = 1 + ((std::process::id() + nth * 97) % 250) as u8;
        let bridge = format!("bg{tag}br");
        let gateway = Ipv4Addr::new(10, 201, subnet, 1);
        let service = Ipv4Addr::new(10, 201, subnet, 2);
        let mut hosts = Hosts {
            names: Vec::new(),
            addresses: Vec::new(),
            service: service.into(),
            bridge: bridge.clone(),
            processes: Vec::new(),
        };
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{gateway}/24"), "dev", &bridge]);
        ip(&["addr", "add", &format!("{service}/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        for i in 0..count {
            let name = format!("bg{tag}h{i}");
            let outside = format!("bg{tag}v{i}");
            let address = Ipv4Addr::new(10, 201, subnet, 11 + i as u8);
            ip(&["netns", "add", &name]);
            hosts.names.push(name.clone());
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ]);
            ip(&["link", "set", &outside, "master", &bridge, "up"]);
            let inside = |args: &[&str]| {
                let mut all = vec!["netns", "exec", &name, "ip"];
                all.extend_from_slice(args);
                ip(&all);
            };
            inside(&["link", "set", "lo", "up"]);
            inside(&["addr", "add", &format!("{address}/24"), "dev", "eth0"]);
            inside(&["link", "set", "eth0", "up"]);
            hosts.addresses.push(address.into());
        }
        hosts
    }

    /// The prefix that runs a program on host `i`.
    pub fn on(&self, i: usize) -> [&str; 4] {
        ["ip", "netns", "exec", &self.names[i]]
    }

    /// Starts `program args` on host `i`; stopped when the hosts are dropped.
    pub fn spawn(&mut self, i: usize, program: &str, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.names[i], program])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ip netns exec runs");
        self.processes.push(child);
    }

    /// Host `i` can no longer reach the service address (a blackhole route: packets vanish,
    /// as when a network link fails), or can again.
    pub fn cut_from_service(&self, i: usize, cut: bool) {
        let verb = if cut { "add" } else { "del" };
        ip(&[
            "netns",
            "exec",
            &self.names[i],
            "ip",
            "route",
            verb,
            "blackhole",
            &format!("{}/32", self.service),
        ]);
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}
