//! The daemon as a systemd service: the unit passes `systemd-analyze verify` and agrees with
//! the default configuration, the default policy passes `enforcer policy check`, `cargo
//! xtask install` lays everything out without overwriting an operator's files, and the
//! daemon reports readiness, reloads and stops over `$NOTIFY_SOCKET`.
//!
//! None of this needs systemd as PID 1: verification is offline, and the readiness test
//! plays systemd's part with a datagram socket of its own.

use std::{
    env, fs,
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use enforcer::{lab::unique_name, node::config::Config};
use integration_tests::{Lab, enforcer_bin};
use xtask::install::{self, Install, Outcome, Step};

/// Where the unit expects the binary (`cargo xtask install` puts it there).
const INSTALLED_EXEC_START: &str =
    "ExecStart=/usr/local/bin/enforcer run --config /etc/enforcer/enforcer.toml";

fn packaging(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("packaging")
        .join(name)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A scratch directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(prefix: &str) -> Self {
        let dir = env::temp_dir().join(unique_name(prefix));
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The unit's `Key=value` assignments in order, without comments and section headers.
fn directives(unit: &str) -> Vec<(&str, &str)> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', ';', '[']))
        .map(|l| {
            l.split_once('=')
                .unwrap_or_else(|| panic!("not Key=value: {l}"))
        })
        .collect()
}

/// Every value assigned to `key`, split on whitespace (systemd's list syntax).
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    directives(unit)
        .into_iter()
        .filter(|(k, _)| *k == key)
        .flat_map(|(_, v)| v.split_whitespace())
        .collect()
}

/// `systemd-analyze`, if installed. Missing under CI it is a failure, never a skip:
/// `cargo xtask setup` installs it (Debian's `systemd` package).
fn systemd_analyze() -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    let found = env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/bin")])
        .map(|dir| dir.join("systemd-analyze"))
        .find(|candidate| candidate.is_file());
    if found.is_none() {
        if env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "systemd-analyze not found: `cargo xtask setup` installs Debian's systemd \
                 package; CI must verify the unit, not skip it"
            );
        }
        eprintln!("skipping: systemd-analyze not found (apt-get install systemd)");
    }
    found
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let unit = read(&packaging("enforcer.service"));
    assert_eq!(
        unit.matches(INSTALLED_EXEC_START).count(),
        1,
        "the unit should start the installed binary with the installed config"
    );
    // `verify` fails when an Exec*= binary does not exist, and this machine need not have
    // the service installed. So verify a copy whose ExecStart= names the binary cargo
    // built (target/<profile>/enforcer) and is otherwise exactly as shipped. The copy keeps
    // the name `enforcer.service`: verify takes the unit's name and type from the file name.
    // It needs no running systemd (it loads the units in a manager of its own).
    let scratch = Scratch::new("enf-verify");
    let copy = scratch.0.join("enforcer.service");
    fs::write(
        &copy,
        unit.replace(
            INSTALLED_EXEC_START,
            &format!(
                "ExecStart={} run --config /etc/enforcer/enforcer.toml",
                enforcer_bin().display()
            ),
        ),
    )
    .unwrap();
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{}{stderr}", String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "systemd-analyze verify failed");
    // verify exits 0 after unknown keys or unparsable values: it only warns, naming the
    // file and line. Any warning about this unit fails the test.
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("enforcer.service"))
        .collect();
    assert!(
        warnings.is_empty(),
        "systemd-analyze warned about the unit: {warnings:#?}"
    );
}

#[test]
fn unit_agrees_with_the_default_configuration() {
    let unit = read(&packaging("enforcer.service"));
    let config = Config::load(&packaging("enforcer.toml")).unwrap();
    let one = |key: &str| -> &str {
        let found = values(&unit, key);
        assert_eq!(found.len(), 1, "{key}= should have one value: {found:?}");
        found[0]
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert_eq!(one("KillSignal"), "SIGTERM");
    assert_eq!(config.policy, Path::new("/etc/enforcer/policy.toml"));
    // The sandbox makes /sys read-only: pins can only be written where the unit allows it.
    // '-' because the directory only exists once ExecStartPre has made it.
    let bpffs = format!("-{}", config.bpffs.display());
    assert!(
        values(&unit, "ReadWritePaths").contains(&bpffs.as_str()),
        "ReadWritePaths= should include {bpffs}"
    );
    let start_pre = directives(&unit)
        .into_iter()
        .find(|(k, _)| *k == "ExecStartPre")
        .map(|(_, v)| v);
    assert_eq!(
        start_pre,
        Some(format!("+/bin/mkdir -p {}", config.bpffs.display()).as_str()),
        "the bpffs directory must exist before the sandbox is set up"
    );
    assert_eq!(
        config.runtime_dir,
        Path::new("/run").join(one("RuntimeDirectory")),
        "runtime_dir should be the unit's RuntimeDirectory="
    );
    // What must survive a reboot (the control plane's last bundle, mode overrides) must
    // not be on the tmpfs /run.
    assert_eq!(
        config.state_dir,
        Path::new("/var/lib").join(one("StateDirectory")),
        "state_dir should be the unit's StateDirectory="
    );
    // The audit log is a log: in LogsDirectory=, where logrotate finds it.
    assert_eq!(
        config.audit_log.parent(),
        Some(Path::new("/var/log").join(one("LogsDirectory")).as_path()),
        "audit_log should be in the unit's LogsDirectory="
    );
    // `policy apply` writes the policy file before enforcing it.
    let policy_dir = format!("-{}", config.policy.parent().unwrap().display());
    assert!(
        values(&unit, "ReadWritePaths").contains(&policy_dir.as_str()),
        "ReadWritePaths= should include {policy_dir}"
    );
    // The service's own sockets reach loopback, where /metrics listens, and nothing else.
    assert_eq!(one("IPAddressDeny"), "any");
    assert_eq!(one("IPAddressAllow"), "localhost");
    assert!(
        config.metrics_listen.is_some_and(|a| a.ip().is_loopback()),
        "{:?}",
        config.metrics_listen
    );
    let mut caps = values(&unit, "CapabilityBoundingSet");
    caps.sort_unstable();
    assert_eq!(caps, ["CAP_BPF", "CAP_NET_ADMIN", "CAP_PERFMON"]);
    assert!(values(&unit, "SystemCallFilter").contains(&"bpf"));
}

/// Runs `enforcer policy check FILE --config packaging/enforcer.toml`; returns its stdout.
fn policy_check(file: &Path) -> String {
    let out = Command::new(enforcer_bin())
        .args(["policy", "check"])
        .arg(file)
        .arg("--config")
        .arg(packaging("enforcer.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "policy check {} failed: {stdout}{}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn default_policy_and_its_example_pass_policy_check() {
    let default = packaging("policy.toml");
    assert!(policy_check(&default).contains("ok: 0 agents"));
    // The commented example must not rot: uncommented, it is a valid one-agent policy.
    let text = read(&default);
    let (head, example) = text
        .split_once("Uncomment and adapt:\n")
        .expect("packaging/policy.toml introduces its example with \"Uncomment and adapt:\"");
    let uncommented: String = example
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l.trim_start_matches('#')))
        .map(|l| format!("{l}\n"))
        .collect();
    let scratch = Scratch::new("enf-policy");
    let file = scratch.0.join("policy.toml");
    fs::write(&file, format!("{head}\n{uncommented}")).unwrap();
    assert!(policy_check(&file).contains("ok: 1 agents"));
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn outcomes(steps: &[Step], root: &Path) -> Vec<(String, Outcome)> {
    steps
        .iter()
        .map(|s| {
            let relative = s.path.strip_prefix(root).unwrap();
            (relative.display().to_string(), s.outcome)
        })
        .collect()
}

#[test]
fn install_lays_out_the_service_and_keeps_operator_files() {
    let scratch = Scratch::new("enf-install");
    let root = scratch.0.join("root");
    let spec = Install {
        root: root.clone(),
        binary: enforcer_bin(),
        packaging: packaging(""),
    };
    let expect = |binary, unit, config| {
        vec![
            ("usr/local/bin/enforcer".to_string(), binary),
            ("etc/systemd/system/enforcer.service".to_string(), unit),
            ("etc/enforcer".to_string(), config_dir(config)),
            ("etc/enforcer/enforcer.toml".to_string(), config),
            ("etc/enforcer/policy.toml".to_string(), config),
            ("var/lib/enforcer".to_string(), config_dir(config)),
        ]
    };

    let first = install::install_files(&spec).unwrap();
    assert_eq!(
        outcomes(&first, &root),
        expect(Outcome::Created, Outcome::Created, Outcome::Created)
    );
    let bin = root.join("usr/local/bin/enforcer");
    let unit = root.join("etc/systemd/system/enforcer.service");
    let config = root.join("etc/enforcer/enforcer.toml");
    let policy = root.join("etc/enforcer/policy.toml");
    assert_eq!(fs::read(&bin).unwrap(), fs::read(enforcer_bin()).unwrap());
    assert_eq!(mode(&bin), 0o755);
    for (installed, shipped) in [
        (&unit, "enforcer.service"),
        (&config, "enforcer.toml"),
        (&policy, "policy.toml"),
    ] {
        assert_eq!(read(installed), read(&packaging(shipped)));
        assert_eq!(mode(installed), 0o644, "{}", installed.display());
    }
    let state = root.join("var/lib/enforcer");
    assert!(state.is_dir());
    assert_eq!(mode(&state), 0o750);

    // The operator edits the configuration and policy, and (wrongly) the unit itself.
    let edited_config = format!("{}interfaces = [\"eth9\"]\n", read(&config))
        .replace("interfaces = []", "# interfaces moved below");
    fs::write(&config, &edited_config).unwrap();
    fs::write(&policy, "[defaults]\nunknown = \"drop\"\n").unwrap();
    fs::write(&unit, "[Service]\nExecStart=/bin/false\n").unwrap();

    let second = install::install_files(&spec).unwrap();
    assert_eq!(
        outcomes(&second, &root),
        expect(Outcome::Unchanged, Outcome::Updated, Outcome::Kept)
    );
    assert_eq!(read(&config), edited_config, "config was overwritten");
    assert_eq!(read(&policy), "[defaults]\nunknown = \"drop\"\n");
    assert_eq!(read(&unit), read(&packaging("enforcer.service")));

    let third = install::install_files(&spec).unwrap();
    assert_eq!(
        outcomes(&third, &root),
        expect(Outcome::Unchanged, Outcome::Unchanged, Outcome::Kept)
    );
    // A staging root never touches this machine's systemd.
    install::activate(&root).unwrap();
}

/// Directories report `Created` the first time and `Unchanged` after; files that are the
/// operator's report `Kept`.
fn config_dir(config: Outcome) -> Outcome {
    match config {
        Outcome::Kept => Outcome::Unchanged,
        other => other,
    }
}

/// Receives one notification and splits it into its `KEY=VALUE` assignments. The timeout
/// only keeps a daemon that never notifies from hanging the test.
fn next_notification(socket: &UnixDatagram) -> Vec<(String, String)> {
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("no notification from the daemon within 30 s");
    String::from_utf8(buf[..n].to_vec())
        .unwrap()
        .lines()
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("not KEY=VALUE: {l}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

fn value<'a>(message: &'a [(String, String)], key: &str) -> Option<&'a str> {
    message
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

#[test]
fn daemon_notifies_ready_reloading_and_stopping() {
    if !enforcer::lab::require_root("daemon_notifies_ready_reloading_and_stopping") {
        return;
    }
    let mut lab = Lab::new(1);
    lab.write_policy(
        "[[agents]]\nid = 1\nname = \"coder\"\ninterfaces = [\"gwa1\"]\negress_default = \"allow\"\n",
    );
    // A socket path, not an abstract address: abstract addresses belong to a network
    // namespace, and the daemon runs in the gateway's.
    let path = lab.dir.join("notify.sock");
    let systemd = UnixDatagram::bind(&path).unwrap();
    lab.start_daemon_with_env([("NOTIFY_SOCKET", &path)]);

    let ready = next_notification(&systemd);
    assert_eq!(value(&ready, "READY"), Some("1"), "{ready:?}");
    assert!(
        value(&ready, "STATUS").is_some_and(|s| !s.is_empty()),
        "READY=1 should come with a STATUS line: {ready:?}"
    );

    lab.signal_daemon(libc::SIGHUP);
    let reloading = next_notification(&systemd);
    assert_eq!(value(&reloading, "RELOADING"), Some("1"), "{reloading:?}");
    let usec = value(&reloading, "MONOTONIC_USEC").expect("RELOADING=1 carries MONOTONIC_USEC");
    assert!(usec.parse::<u64>().is_ok(), "MONOTONIC_USEC={usec}");
    let reloaded = next_notification(&systemd);
    assert_eq!(value(&reloaded, "READY"), Some("1"), "{reloaded:?}");
    assert!(value(&reloaded, "STATUS").is_some(), "{reloaded:?}");

    lab.stop_daemon(libc::SIGTERM);
    let stopping = next_notification(&systemd);
    assert_eq!(value(&stopping, "STOPPING"), Some("1"), "{stopping:?}");
}

/// Runs `cmd` and returns its stdout, failing the test with its stderr if it fails.
fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `cargo xtask package` builds a .deb that holds what an edge server needs and nothing of
/// the build machine: the binary at /usr/sbin (it runs from the unpacked tree and reports
/// the package's version), the unit pointing at it, the default configuration as
/// conffiles, a man page per command, completions, and maintainer scripts that are valid
/// shell and never detach the pinned program. It must install on Debian 12: no glibc symbol
/// newer than 2.36.
#[test]
fn package_holds_the_service_and_installs_on_debian_12() {
    let scratch = Scratch::new("enf-package");
    let deb = xtask::package::build(&xtask::package::Package {
        binary: enforcer_bin(),
        packaging: packaging(""),
        out: scratch.0.join("out"),
    })
    .unwrap();
    let field = |name: &str| stdout_of(Command::new("dpkg-deb").arg("--field").arg(&deb).arg(name));
    assert_eq!(field("Package").trim(), "enforcer");
    let version = field("Version");
    let reported = stdout_of(Command::new(enforcer_bin()).arg("--version"));
    assert_eq!(reported.trim(), format!("enforcer {}", version.trim()));
    let depends = field("Depends");
    let glibc = depends
        .trim()
        .strip_prefix("libc6 (>= ")
        .and_then(|v| v.strip_suffix(')'))
        .unwrap_or_else(|| panic!("Depends: {depends}"));
    let parts: Vec<u32> = glibc.split('.').map(|p| p.parse().unwrap()).collect();
    assert!(
        parts <= vec![2, 36],
        "needs glibc {glibc}: Debian 12 has 2.36"
    );

    let contents = stdout_of(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let entry = |path: &str| {
        contents
            .lines()
            .find(|l| l.ends_with(&format!(" .{path}")))
            .unwrap_or_else(|| panic!("{path} not in the package:\n{contents}"))
            .to_owned()
    };
    assert!(entry("/usr/sbin/enforcer").starts_with("-rwxr-xr-x root/root"));
    for path in [
        "/lib/systemd/system/enforcer.service",
        "/etc/enforcer/enforcer.toml",
        "/etc/enforcer/policy.toml",
        "/usr/share/man/man1/enforcer.1.gz",
        "/usr/share/man/man1/enforcer-run.1.gz",
        "/usr/share/man/man1/enforcer-policy-apply.1.gz",
        "/usr/share/bash-completion/completions/enforcer",
        "/usr/share/zsh/vendor-completions/_enforcer",
        "/usr/share/fish/vendor_completions.d/enforcer.fish",
        "/usr/share/doc/enforcer/copyright",
        "/usr/share/doc/enforcer/schema/status.json",
    ] {
        assert!(entry(path).starts_with("-rw-r--r-- root/root"), "{path}");
    }
    assert!(
        !contents.contains("/usr/local/"),
        "nothing under /usr/local in a package:\n{contents}"
    );

    // The control files: conffiles, and scripts that parse and never detach.
    let control = scratch.0.join("control");
    stdout_of(
        Command::new("dpkg-deb")
            .arg("--control")
            .arg(&deb)
            .arg(&control),
    );
    assert_eq!(
        read(&control.join("conffiles")),
        "/etc/enforcer/enforcer.toml\n/etc/enforcer/policy.toml\n/etc/logrotate.d/enforcer\n"
    );
    for script in ["postinst", "prerm", "postrm"] {
        let path = control.join(script);
        stdout_of(Command::new("sh").arg("-n").arg(&path));
        let text = read(&path);
        assert!(!text.contains("detach"), "{script} detaches:\n{text}");
    }
    assert!(read(&control.join("postrm")).contains("rm -rf /var/lib/enforcer"));

    // Unpacked: the binary runs, the unit runs it from /usr/sbin, the man page renders the
    // CLI's own description.
    let tree = scratch.0.join("tree");
    stdout_of(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree));
    let unpacked = stdout_of(Command::new(tree.join("usr/sbin/enforcer")).arg("--version"));
    assert_eq!(unpacked, reported);
    let unit = read(&tree.join("lib/systemd/system/enforcer.service"));
    assert_eq!(
        values(&unit, "ExecStart").join(" "),
        "/usr/sbin/enforcer run --config /etc/enforcer/enforcer.toml"
    );
    let man = stdout_of(
        Command::new("gzip")
            .args(["-dc"])
            .arg(tree.join("usr/share/man/man1/enforcer-run.1.gz")),
    );
    assert!(man.contains(".TH enforcer-run 1"), "{man}");
    assert!(man.contains("Run the daemon"), "{man}");
}
