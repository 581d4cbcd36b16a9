//! Which Linux this is, and therefore which provider serves each collection.
//!
//! Read once at start from `/etc/os-release` and the tools on the PATH; the result picks the
//! package manager (apt, dnf, yum, zypper, apk) and init system (systemd, OpenRC, SysV) that the
//! providers drive. The JSON of a resource never depends on it.

use std::path::Path;

use crate::providers::cmd::Runner;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OsFamily {
    Debian,
    Rhel,
    Suse,
    Alpine,
    Arch,
    Unknown,
}

impl OsFamily {
    pub fn as_str(&self) -> &'static str {
        match self {
            OsFamily::Debian => "debian",
            OsFamily::Rhel => "rhel",
            OsFamily::Suse => "suse",
            OsFamily::Alpine => "alpine",
            OsFamily::Arch => "arch",
            OsFamily::Unknown => "unknown",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackageManager {
    Apt,
    Dnf,
    Yum,
    Zypper,
    Apk,
}

impl PackageManager {
    pub fn as_str(&self) -> &'static str {
        match self {
            PackageManager::Apt => "apt",
            PackageManager::Dnf => "dnf",
            PackageManager::Yum => "yum",
            PackageManager::Zypper => "zypper",
            PackageManager::Apk => "apk",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitSystem {
    Systemd,
    OpenRc,
    SysV,
}

impl InitSystem {
    pub fn as_str(&self) -> &'static str {
        match self {
            InitSystem::Systemd => "systemd",
            InitSystem::OpenRc => "openrc",
            InitSystem::SysV => "sysv",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub family: OsFamily,
    /// `ID` of os-release (`debian`, `ubuntu`, `rocky`, `alpine`, ...).
    pub distribution: String,
    /// `VERSION_ID` of os-release.
    pub version: String,
    pub package_manager: Option<PackageManager>,
    pub init_system: Option<InitSystem>,
}

impl Platform {
    /// Detects the running host.
    pub fn detect(runner: &dyn Runner) -> Platform {
        let os_release = std::fs::read_to_string("/etc/os-release")
            .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
            .unwrap_or_default();
        // systemd is the init system only if it is PID 1 (a container or chroot may ship
        // systemctl without running it).
        let systemd_running = Path::new("/run/systemd/system").is_dir();
        let openrc_running = Path::new("/run/openrc").is_dir();
        Platform::from_parts(
            &os_release,
            |p| runner.exists(p),
            systemd_running,
            openrc_running,
        )
    }

    /// Pure detection from the os-release text and what is present, for tests.
    pub fn from_parts(
        os_release: &str,
        has_tool: impl Fn(&str) -> bool,
        systemd_running: bool,
        openrc_running: bool,
    ) -> Platform {
        let field = |key: &str| -> String {
            os_release
                .lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().trim_matches('"').trim_matches('\'').to_owned())
                .unwrap_or_default()
        };
        let id = field("ID");
        let like = field("ID_LIKE");
        let words: Vec<&str> = std::iter::once(id.as_str())
            .chain(like.split_whitespace())
            .collect();
        let is = |names: &[&str]| words.iter().any(|w| names.contains(w));
        let family = if is(&["debian", "ubuntu"]) {
            OsFamily::Debian
        } else if is(&[
            "rhel",
            "fedora",
            "centos",
            "rocky",
            "almalinux",
            "amzn",
            "ol",
        ]) {
            OsFamily::Rhel
        } else if is(&[
            "suse",
            "opensuse",
            "sles",
            "opensuse-leap",
            "opensuse-tumbleweed",
        ]) {
            OsFamily::Suse
        } else if is(&["alpine"]) {
            OsFamily::Alpine
        } else if is(&["arch"]) {
            OsFamily::Arch
        } else {
            OsFamily::Unknown
        };
        let package_manager = match family {
            OsFamily::Debian if has_tool("dpkg-query") => Some(PackageManager::Apt),
            OsFamily::Rhel if has_tool("dnf") => Some(PackageManager::Dnf),
            OsFamily::Rhel if has_tool("yum") => Some(PackageManager::Yum),
            OsFamily::Suse if has_tool("zypper") => Some(PackageManager::Zypper),
            OsFamily::Alpine if has_tool("apk") => Some(PackageManager::Apk),
            // An unknown family still gets a manager when exactly the tool is there.
            _ if has_tool("dpkg-query") && has_tool("apt-get") => Some(PackageManager::Apt),
            _ if has_tool("dnf") => Some(PackageManager::Dnf),
            _ if has_tool("zypper") => Some(PackageManager::Zypper),
            _ if has_tool("apk") => Some(PackageManager::Apk),
            _ => None,
        };
        let init_system = if systemd_running {
            Some(InitSystem::Systemd)
        } else if openrc_running || (has_tool("openrc") && has_tool("rc-service")) {
            Some(InitSystem::OpenRc)
        } else if Path::new("/etc/init.d").is_dir() {
            Some(InitSystem::SysV)
        } else {
            None
        };
        Platform {
            family,
            distribution: if id.is_empty() { "unknown".into() } else { id },
            version: field("VERSION_ID"),
            package_manager,
            init_system,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nID=debian\n";
    const ROCKY: &str =
        "NAME=\"Rocky Linux\"\nVERSION_ID=\"9.3\"\nID=\"rocky\"\nID_LIKE=\"rhel centos fedora\"\n";
    const UBUNTU: &str = "ID=ubuntu\nID_LIKE=debian\nVERSION_ID=\"24.04\"\n";
    const ALPINE: &str = "ID=alpine\nVERSION_ID=3.20.0\n";
    const SLES: &str = "ID=\"opensuse-leap\"\nID_LIKE=\"suse opensuse\"\nVERSION_ID=\"15.5\"\n";

    #[test]
    fn families_and_tools() {
        let p = Platform::from_parts(DEBIAN, |t| t == "dpkg-query", true, false);
        assert_eq!(p.family, OsFamily::Debian);
        assert_eq!(p.version, "12");
        assert_eq!(p.package_manager, Some(PackageManager::Apt));
        assert_eq!(p.init_system, Some(InitSystem::Systemd));

        let p = Platform::from_parts(UBUNTU, |t| t == "dpkg-query", true, false);
        assert_eq!(
            (p.family, p.distribution.as_str()),
            (OsFamily::Debian, "ubuntu")
        );

        let p = Platform::from_parts(ROCKY, |t| t == "dnf" || t == "yum", true, false);
        assert_eq!(p.family, OsFamily::Rhel);
        assert_eq!(p.package_manager, Some(PackageManager::Dnf));
        let p = Platform::from_parts(ROCKY, |t| t == "yum", true, false);
        assert_eq!(p.package_manager, Some(PackageManager::Yum));

        let p = Platform::from_parts(ALPINE, |t| t == "apk", false, true);
        assert_eq!(p.package_manager, Some(PackageManager::Apk));
        assert_eq!(p.init_system, Some(InitSystem::OpenRc));

        let p = Platform::from_parts(SLES, |t| t == "zypper", true, false);
        assert_eq!(p.family, OsFamily::Suse);
        assert_eq!(p.package_manager, Some(PackageManager::Zypper));

        let p = Platform::from_parts("", |_| false, false, false);
        assert_eq!(p.family, OsFamily::Unknown);
        assert_eq!(p.package_manager, None);
    }
}
