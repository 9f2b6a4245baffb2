//! `enforcer policy ...` as an operator meets it (issue 15): `check` resolves the
//! interfaces this host has and names the ones it could not check, bad files (binary,
//! broken TOML, too large for the maps) are reported by file, line, column and field,
//! and `--json` gives one document for `check`, `presets` and an apply with no daemon.

use std::process::Output;

use enforcer::lab::require_root;
use integration_tests::{Lab, UDP_9000_POLICY, enforcer_bin};
use serde_json::Value;

/// Two agents on the lab's two gateway veths, and one on an interface no host has.
const TWO_VETHS_POLICY: &str = r#"
[[agents]]
id = 1
name = "coder"
interfaces = ["gwa1"]

[[agents]]
id = 2
name = "browser"
interfaces = ["gwa2"]
[[agents.egress]]
action = "allow"
to = ["@private"]

[[agents]]
id = 3
name = "later"
interfaces = ["ghost0"]
"#;

/// `enforcer --config <the lab's> ARGS` in the gateway namespace.
fn run(lab: &Lab, args: &[&str]) -> Output {
    let config = lab.config_path();
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    lab.cli(&all)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The `{"error": ...}` document a failing command prints under `--json`, checked to carry
/// exit code 2 (bad input), as the process did.
fn json_error(lab: &Lab, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = run(lab, &all);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?}: {}",
        text(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {}", text(&out.stdout)));
    assert_eq!(v["error"]["exit_code"], 2, "{v}");
    v["error"].clone()
}

#[test]
fn check_resolves_this_hosts_interfaces_and_names_the_rest() {
    if !require_root("check_resolves_this_hosts_interfaces_and_names_the_rest") {
        return;
    }
    let lab = Lab::new(2);
    let file = lab.write_file("two.toml", TWO_VETHS_POLICY);
    let file = file.to_str().unwrap();

    // Two agents on two real interfaces pass (check used to resolve every name to
    // ifindex 1 and call them the same interface); the missing one is named.
    let out = run(&lab, &["policy", "check", file]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.starts_with(&format!("{file}: ok: 3 agents, ")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "{file}: not on this host: ghost0; checked when the daemon applies it"
        )),
        "{stdout}"
    );

    let v = lab.cli_json(&["policy", "check", file]);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["file"], file, "{v}");
    assert_eq!(v["agents"], 3, "{v}");
    assert_eq!(v["interface_entries"], 2, "gwa1 and gwa2 resolved: {v}");
    assert_eq!(
        v["unchecked_interfaces"],
        serde_json::json!(["ghost0"]),
        "{v}"
    );
    // @private: five IPv4 and two IPv6 prefixes for browser.
    assert_eq!(v["destination_entries"], 7, "{v}");
    assert_eq!(v["source_entries"], 0, "{v}");

    // One real interface named twice (by its name and an altname) is still refused, at
    // the second name, by line, column and field.
    let ip = lab
        .gw
        .command("ip")
        .args([
            "link", "property", "add", "dev", "gwa1", "altname", "coderalt",
        ])
        .status()
        .unwrap();
    assert!(ip.success(), "ip link property add altname");
    let same = lab.write_file(
        "same.toml",
        &TWO_VETHS_POLICY.replace("[\"gwa2\"]", "[\"coderalt\"]"),
    );
    let same = same.to_str().unwrap();
    let out = run(&lab, &["policy", "check", same]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "{same}:10:15: agents[1].interfaces[0]: interface \"gwa1\" of agent \"coder\" and \
             interface \"coderalt\" of agent \"browser\" are the same interface (ifindex "
        )),
        "{stderr}"
    );
    let e = json_error(&lab, &["policy", "check", same]);
    let issue = &e["issues"][0];
    assert_eq!(issue["field"], "agents[1].interfaces[0]", "{e}");
    assert_eq!(
        (issue["line"].clone(), issue["column"].clone()),
        (10.into(), 15.into()),
        "{e}"
    );
}

#[test]
fn apply_with_no_daemon_writes_the_pinned_maps_and_says_so_in_json() {
    if !require_root("apply_with_no_daemon_writes_the_pinned_maps_and_says_so_in_json") {
        return;
    }
    let mut lab = Lab::new(2);
    lab.write_policy(UDP_9000_POLICY);
    lab.start_daemon();
    let before = lab.status().generation;
    lab.stop_daemon(libc::SIGTERM);

    // A missing interface is pending on apply, as the daemon treats it, not an error.
    let file = lab.write_file("two.toml", TWO_VETHS_POLICY);
    let v = lab.cli_json(&["policy", "apply", file.to_str().unwrap()]);
    assert_eq!(v["to"], "pinned maps", "{v}");
    let generation = v["generation"].as_u64().expect("a generation");
    assert!(generation > before, "{v} after generation {before}");
    assert_eq!(
        v["pending_interfaces"],
        serde_json::json!(["ghost0"]),
        "{v}"
    );
    assert_eq!(lab.status().generation, generation);

    // Without --json the line is as it was.
    let out = run(&lab, &["policy", "apply", file.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "applied to the pinned maps (no daemon running): generation {}\n",
            lab.status().generation
        )
    );
    assert!(lab.status().generation > generation);
}

#[test]
fn binary_input_is_bad_input_naming_the_file_and_byte() {
    if !require_root("binary_input_is_bad_input_naming_the_file_and_byte") {
        return;
    }
    let lab = Lab::new(1);
    let file = lab.dir.join("policy.bin");
    // 13 good bytes, then a byte no UTF-8 text holds.
    std::fs::write(&file, b"agents = []\n#\xff\x00\x01binary").unwrap();
    let file = file.to_str().unwrap();
    let expected =
        format!("{file}:2:2: not UTF-8 text (byte 0xff at offset 13); a policy is a TOML file\n");
    for command in ["check", "apply"] {
        let out = run(&lab, &["policy", command, file]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "policy {command}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stderr), expected, "policy {command}");
    }
    let e = json_error(&lab, &["policy", "check", file]);
    assert_eq!(e["issues"][0]["file"], file, "{e}");
    assert_eq!(e["issues"][0]["line"], 2, "{e}");
}

#[test]
fn capacity_errors_name_file_line_column_and_field() {
    if !require_root("capacity_errors_name_file_line_column_and_field") {
        return;
    }
    let lab = Lab::new(1);
    // The lab's configuration holds agent ids up to 64.
    let file = lab.write_file(
        "big.toml",
        "[[agents]]\nid = 1\nname = \"a\"\nprefixes = [\"10.0.0.1\"]\n\n\
         [[agents]]\nid = 1000\nname = \"b\"\nprefixes = [\"10.0.0.2\", \"10.0.0.3\"]\n",
    );
    let file = file.to_str().unwrap();
    let out = run(&lab, &["policy", "check", file]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "{file}:7:6: agents[1].id: agent \"b\" has id 1000, but the maps hold agent ids up \
             to 64 (max_agents)\n"
        )
    );
    let e = json_error(&lab, &["policy", "check", file]);
    assert_eq!(e["issues"][0]["field"], "agents[1].id", "{e}");
    assert_eq!(e["issues"][0]["line"], 7, "{e}");
    assert_eq!(e["issues"][0]["column"], 6, "{e}");
    // The daemon refuses to start on it with the same located line (a bound on the run
    // in case it started anyway).
    std::fs::copy(file, lab.config_path().with_file_name("policy.toml")).unwrap();
    let out = lab
        .gw
        .command("timeout")
        .arg("30")
        .arg(enforcer_bin())
        .args(["--config", lab.config_path().to_str().unwrap(), "run"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).ends_with(
            "policy.toml:7:6: agents[1].id: agent \"b\" has id 1000, but the maps hold agent \
             ids up to 64 (max_agents)\n"
        ),
        "{}",
        text(&out.stderr)
    );

    // Room for two source hosts: the third, agents[1].prefixes[1], is the one that does
    // not fit.
    let config = std::fs::read_to_string(lab.config_path()).unwrap();
    let small = lab.write_file(
        "small.toml",
        &config.replace("[limits]\n", "[limits]\nmax_source_prefixes = 2\n"),
    );
    let fits = lab.write_file(
        "fits.toml",
        &std::fs::read_to_string(file).unwrap().replace("1000", "2"),
    );
    let out = lab.cli(&[
        "--config",
        small.to_str().unwrap(),
        "policy",
        "check",
        fits.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        format!(
            "{}:9:25: agents[1].prefixes[1]: policy needs 3 IPv4 source host entries, but the \
             maps hold 2 (max_source_prefixes)\n",
            fits.display()
        )
    );
}

#[test]
fn every_syntax_error_is_reported() {
    if !require_root("every_syntax_error_is_reported") {
        return;
    }
    let lab = Lab::new(1);
    let file = lab.write_file(
        "broken.toml",
        "[[agents]]\nid = = 1\nname = \"a\"\nprefixes = [\"10.0.0.1\"]\nmode = enforce\n\
         [[agents]]\nid = 2\nname = \"b\" x\n",
    );
    let file = file.to_str().unwrap();
    let out = run(&lab, &["policy", "check", file]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    let located: Vec<&str> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix(file)?.split(": ").next())
        .collect();
    assert_eq!(located, [":2:6", ":5:8", ":8:12"], "{stderr}");
    assert!(
        stderr.ends_with("3 syntax errors; later ones may follow from earlier ones\n"),
        "{stderr}"
    );
    let e = json_error(&lab, &["policy", "check", file]);
    let lines: Vec<u64> = e["issues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [2, 5, 8], "{e}");
}

#[test]
fn presets_list_rfc6598_in_private_with_descriptions() {
    if !require_root("presets_list_rfc6598_in_private_with_descriptions") {
        return;
    }
    let lab = Lab::new(1);
    let v = lab.cli_json(&["policy", "presets"]);
    let private = &v["@private"];
    let prefixes: Vec<&str> = private["prefixes"]
        .as_array()
        .unwrap_or_else(|| panic!("{v}"))
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    assert!(prefixes.contains(&"100.64.0.0/10"), "{v}");
    assert!(prefixes.contains(&"10.0.0.0/8"), "{v}");
    assert!(
        private["description"]
            .as_str()
            .unwrap()
            .contains("RFC 6598"),
        "{v}"
    );
    assert_eq!(
        v["@shared"]["prefixes"],
        serde_json::json!(["100.64.0.0/10"]),
        "{v}"
    );
    assert_eq!(
        v["@any"]["prefixes"],
        serde_json::json!(["0.0.0.0/0", "::/0"]),
        "{v}"
    );

    let out = run(&lab, &["policy", "presets"]);
    let stdout = text(&out.stdout);
    let line = stdout
        .lines()
        .find(|l| l.starts_with("@private "))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.ends_with(", 100.64.0.0/10"), "{stdout}");
    assert!(stdout.contains("RFC 6598"), "{stdout}");
}
