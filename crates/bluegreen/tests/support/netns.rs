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
    subnet: u8,
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
            subnet,
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

    /// Host `i` and the service address can no longer reach each other (blackhole routes
    /// both ways: packets vanish, as when a network link fails), or can again. The test's own
    /// requests to the host come from the bridge's first address and still pass.
    pub fn cut_from_service(&self, i: usize, cut: bool) {
        let verb = if cut { "add" } else { "del" };
        let (service, host) = (self.service.to_string(), self.addresses[i].to_string());
        ip(&[
            "netns",
            "exec",
            &self.names[i],
            "ip",
            "route",
            verb,
            "blackhole",
            &format!("{service}/32"),
        ]);
        // The way back: what the service sends the host goes by a table of its own whose
        // only route is a blackhole.
        let table = self.table(i);
        ip(&[
            "route",
            verb,
            "blackhole",
            &format!("{host}/32"),
            "table",
            &table,
        ]);
        ip(&["rule", verb, "from", &service, "to", &host, "table", &table]);
    }

    /// The routing table `cut_from_service` uses for host `i`'s way back.
    fn table(&self, i: usize) -> String {
        (50_000 + u32::from(self.subnet) * 16 + i as u32).to_string()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        for (i, host) in self.addresses.iter().enumerate() {
            // A cut the test did not restore (it failed): its rule must not outlive it.
            let table = self.table(i);
            let service = self.service.to_string();
            let _ = Command::new("ip")
                .args([
                    "rule",
                    "del",
                    "from",
                    &service,
                    "to",
                    &host.to_string(),
                    "table",
                    &table,
                ])
                .stderr(Stdio::null())
                .status();
        }
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}
