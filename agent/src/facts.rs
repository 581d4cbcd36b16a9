//! What the agent knows of its host: the [`Facts`] sent in `hello`, in enrollment and in answer to
//! the `facts` op.
//!
//! Facts are gathered fresh on each call from the kernel (`uname`, `getifaddrs`, `/proc`) and from
//! the [`Platform`] detected at start. Gathering never fails: a fact that cannot be read is left
//! empty or zero, because a host that cannot report its uptime must still be able to say hello.
//! Each `/proc` reader is a pure function over the file's text so its parsing is tested on fixed
//! inputs; one test gathers the real facts of the test machine and cross-checks them against
//! independent sources.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use comodit_protocol::Facts;

use crate::platform::Platform;

/// Gathers the facts of this host. `capabilities` (the collections and ops this agent serves) is
/// passed in by the agent core, which knows what it serves; it is reported as given.
pub fn gather(platform: &Platform, capabilities: Vec<String>) -> Facts {
    let uts = uname().unwrap_or_default();
    Facts {
        hostname: uts.nodename,
        os_family: platform.family.as_str().to_owned(),
        os_distribution: platform.distribution.clone(),
        os_version: platform.version.clone(),
        kernel: uts.release,
        architecture: uts.machine,
        cpus: cpus(),
        memory_bytes: std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| parse_meminfo(&t))
            .unwrap_or(0),
        addresses: select_addresses(interface_addresses()),
        uptime_s: std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|t| parse_uptime(&t))
            .unwrap_or(0),
        package_manager: platform.package_manager.map(|p| p.as_str().to_owned()),
        init_system: platform.init_system.map(|i| i.as_str().to_owned()),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        capabilities,
    }
}

/// The parts of `uname(2)` that are facts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Uname {
    nodename: String,
    release: String,
    machine: String,
}

fn uname() -> Option<Uname> {
    // SAFETY: utsname is plain C data; zeroed is a valid value and uname fills it.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } != 0 {
        return None;
    }
    // The kernel NUL-terminates every field; a zeroed array is also a valid empty string.
    let field = |f: &[libc::c_char]| -> String {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Some(Uname {
        nodename: field(&uts.nodename),
        release: field(&uts.release),
        machine: field(&uts.machine),
    })
}

/// CPUs this agent may run on: the affinity mask, reduced by a cgroup CPU quota if there is one
/// (what `available_parallelism` computes). At least 1.
fn cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// `MemTotal` of `/proc/meminfo`, in bytes. The kernel writes it in KiB (`kB`).
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let rest = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim();
    let mut words = rest.split_whitespace();
    let value: u64 = words.next()?.parse().ok()?;
    match words.next() {
        Some("kB") => value.checked_mul(1024),
        // No unit: already bytes (never written by Linux, but unambiguous).
        None => Some(value),
        Some(_) => None,
    }
}

/// Seconds since boot, the first number of `/proc/uptime` (`"12345.67 23456.78"`), rounded down.
pub fn parse_uptime(text: &str) -> Option<u64> {
    let first = text.split_whitespace().next()?;
    let whole = first.split('.').next()?;
    whole.parse().ok()
}

/// The addresses worth reporting, as sorted, deduplicated text: every address except loopback,
/// unspecified, multicast and IPv6 link-local (`fe80::/10`, meaningless without the interface it
/// is scoped to, and present on every interface). Loopback is reported only when nothing else is,
/// so the list is never empty on a host with a network stack.
pub fn select_addresses(addrs: impl IntoIterator<Item = IpAddr>) -> Vec<String> {
    let (loopback, mut others): (Vec<IpAddr>, Vec<IpAddr>) = addrs
        .into_iter()
        .filter(|a| !a.is_unspecified() && !a.is_multicast())
        .filter(|a| !matches!(a, IpAddr::V6(v6) if is_link_local_v6(v6)))
        .partition(|a| a.is_loopback());
    if others.is_empty() {
        others = loopback;
    }
    // IpAddr orders IPv4 before IPv6, then numerically.
    others.sort();
    others.dedup();
    others.iter().map(|a| a.to_string()).collect()
}

fn is_link_local_v6(a: &Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

/// The IPv4 and IPv6 addresses of every interface that is up.
fn interface_addresses() -> Vec<IpAddr> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list that we walk read-only and free exactly once below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_flags & libc::IFF_UP as libc::c_uint == 0 {
            continue;
        }
        // SAFETY: ifa_addr is non-null and points to a sockaddr whose family says which
        // sockaddr_* it really is.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        match family {
            libc::AF_INET => {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            }
            libc::AF_INET6 => {
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                // Only the 16 address bytes: the scope id stays out of the text.
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
            _ => {}
        }
    }
    // SAFETY: `head` came from a successful getifaddrs and no reference into it outlives this.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The hostname as the C library sees it, to cross-check `uname` in tests.
#[cfg(test)]
fn gethostname() -> String {
    let mut buf = [0 as libc::c_char; 256];
    // SAFETY: the buffer is writable for its whole length; we NUL-terminate defensively.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr(), buf.len() - 1) };
    assert_eq!(rc, 0, "gethostname failed");
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::cmd::{Invocation, Runner, SystemRunner};
    use std::time::Duration;

    #[test]
    fn meminfo_is_read_in_kib() {
        let text =
            "MemTotal:       16303932 kB\nMemFree:         1234567 kB\nMemAvailable:   9999 kB\n";
        assert_eq!(parse_meminfo(text), Some(16_303_932 * 1024));
        // MemTotal need not be first, and only MemTotal counts.
        let text = "MemFree: 1 kB\nMemTotal: 2 kB\n";
        assert_eq!(parse_meminfo(text), Some(2048));
        assert_eq!(parse_meminfo("MemTotal: 4096\n"), Some(4096));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: lots kB\n"), None);
        assert_eq!(parse_meminfo("MemTotal: 1 MB\n"), None);
        assert_eq!(parse_meminfo("MemTotal:\n"), None);
        // Overflow is refused, not wrapped.
        assert_eq!(parse_meminfo(&format!("MemTotal: {} kB\n", u64::MAX)), None);
        assert_eq!(parse_meminfo(""), None);
    }

    #[test]
    fn uptime_is_rounded_down() {
        assert_eq!(parse_uptime("350735.47 234388.90\n"), Some(350_735));
        assert_eq!(parse_uptime("0.99 0.10"), Some(0));
        assert_eq!(parse_uptime("42"), Some(42));
        assert_eq!(parse_uptime(""), None);
        assert_eq!(parse_uptime("abc 1"), None);
        assert_eq!(parse_uptime("-1.0 2"), None);
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_skip_loopback_link_local_and_sort() {
        let got = select_addresses([
            ip("::1"),
            ip("fd00::2"),
            ip("127.0.0.1"),
            ip("fe80::fc:ff:fe00:1"),
            ip("febf::1"),
            ip("192.0.2.2"),
            ip("10.0.0.1"),
            ip("192.0.2.2"),
            ip("0.0.0.0"),
            ip("ff02::1"),
            ip("2001:db8::1"),
        ]);
        // febf:: is inside fe80::/10 too; IPv4 sorts before IPv6; duplicates collapse.
        assert_eq!(got, ["10.0.0.1", "192.0.2.2", "2001:db8::1", "fd00::2"]);
        // fec0:: is just outside fe80::/10 and stays.
        assert_eq!(select_addresses([ip("fec0::1")]), ["fec0::1"]);
    }

    #[test]
    fn addresses_fall_back_to_loopback_only_when_alone() {
        let got = select_addresses([ip("::1"), ip("127.0.0.1"), ip("fe80::1"), ip("127.0.0.1")]);
        assert_eq!(got, ["127.0.0.1", "::1"]);
        assert!(select_addresses([]).is_empty());
    }

    #[test]
    fn real_facts_of_this_machine_are_plausible() {
        let platform = Platform::detect(&SystemRunner);
        let caps = vec!["files".to_owned(), "run".to_owned()];
        let facts = gather(&platform, caps.clone());

        assert!(!facts.hostname.is_empty());
        assert_eq!(facts.hostname, gethostname());
        let proc_host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(facts.hostname, proc_host.trim());

        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        assert!(!facts.kernel.is_empty());
        assert_eq!(facts.kernel, release.trim());

        let uname_m = SystemRunner
            .run(&Invocation::new(&["uname", "-m"]), Duration::from_secs(10))
            .unwrap();
        assert_eq!(facts.architecture, uname_m.stdout.trim());

        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let online = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count() as u32;
        assert!(
            facts.cpus >= 1 && facts.cpus <= online,
            "{} cpus of {online}",
            facts.cpus
        );

        assert!(
            facts.memory_bytes > 64 * 1024 * 1024,
            "{}",
            facts.memory_bytes
        );
        assert!(facts.uptime_s > 0);

        // This machine is Debian 12 with dpkg; no init system is asserted (none runs here).
        assert_eq!(facts.os_family, "debian");
        assert_eq!(facts.os_distribution, "debian");
        assert_eq!(facts.os_version, platform.version);
        assert!(!facts.os_version.is_empty());
        assert_eq!(facts.package_manager.as_deref(), Some("apt"));
        assert_eq!(
            facts.init_system,
            platform.init_system.map(|i| i.as_str().to_owned())
        );
        assert_eq!(facts.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(facts.capabilities, caps);

        // Addresses: valid, sorted, no scope ids, and the same set `hostname -I` reports (it also
        // skips loopback and IPv6 link-local).
        assert!(!facts.addresses.is_empty());
        let parsed: Vec<IpAddr> = facts.addresses.iter().map(|a| a.parse().unwrap()).collect();
        assert!(
            parsed.windows(2).all(|w| w[0] < w[1]),
            "{:?}",
            facts.addresses
        );
        assert!(facts.addresses.iter().all(|a| !a.contains('%')));
        let out = SystemRunner
            .run(
                &Invocation::new(&["hostname", "-I"]),
                Duration::from_secs(10),
            )
            .unwrap();
        let mut expected: Vec<IpAddr> = out
            .stdout
            .split_whitespace()
            .map(|a| a.parse().unwrap())
            .collect();
        expected.sort();
        expected.dedup();
        if expected.is_empty() {
            assert!(parsed.iter().all(|a| a.is_loopback()), "{parsed:?}");
        } else {
            assert_eq!(parsed, expected);
        }

        // The JSON round-trips through the strict wire type.
        let json = serde_json::to_string(&facts).unwrap();
        assert_eq!(serde_json::from_str::<Facts>(&json).unwrap(), facts);
    }
}
