//! `artemis-sync check-config`, `fstab`, usage errors and `demo`.

use std::fs;
use std::path::Path;

use crate::util::*;

/// A minimal EFS config; `extra` lines start at line 7 of the file.
fn efs_config(extra: &str) -> String {
    format!(
        "[node]\nbase_dir = \"/opt/corda\"\n\n[storage]\nbackend = \"efs\"\nsource = \"{EFS_SOURCE}\"\n{extra}"
    )
}

fn azure_smb_config(cred: &Path) -> String {
    format!(
        "[node]\nbase_dir = \"/opt/corda\"\n\n[storage]\nbackend = \"azure-smb\"\n\
         source = \"//acct.file.core.windows.net/corda\"\ncredentials_file = {}\n",
        toml_path(cred)
    )
}

#[test]
fn issue2_check_config_prints_the_effective_config_with_defaults() {
    let fx = Fixture::new();
    let path = fx.write("agent.toml", efs_config(""));
    let out = artemis_sync(&path, ["check-config"]);
    out.code(0).stdout_has(&[
        &format!("# {}: valid\n", path.display()),
        "base_dir = \"/opt/corda\"",
        "mode = \"shared\"",
        "backend = \"efs\"",
        &format!("source = \"{EFS_SOURCE}\""),
        "mount_point = \"/var/lib/artemis-sync/share\"",
        "options = \"\"",
        "mount_attempts = 8",
        "mount_retry_max_ms = 20000",
        "mount_timeout_s = 180",
        "allow_local_locks = false",
    ]);
    assert!(out.stdout.starts_with("# "), "{out}");
    // The printed config is itself a valid config that prints the same.
    let again = fx.write("effective.toml", &out.stdout);
    let out2 = artemis_sync(&again, ["check-config"]);
    out2.code(0);
    let body = |s: &str| s.split_once('\n').map(|(_, b)| b.to_owned()).unwrap();
    assert_eq!(body(&out2.stdout), body(&out.stdout));
    // Nothing was written next to the config.
    assert_eq!(names(&fx.root), ["agent.toml", "effective.toml"]);
}

#[test]
fn check_config_missing_file_exits_3_naming_the_path() {
    let fx = Fixture::new();
    let path = fx.path("no-such/agent.toml");
    artemis_sync(&path, ["check-config"]).code(3).stderr_has(&[
        &path.display().to_string(),
        "cannot read config file",
        "No such file",
    ]);
}

#[test]
fn check_config_invalid_configs_exit_3_naming_file_key_and_line() {
    let fx = Fixture::new();
    let real = fx.mkdir("real-share");
    let symlink = fx.path("share-link");
    std::os::unix::fs::symlink(&real, &symlink).unwrap();
    let cases: Vec<(&str, String, Vec<String>)> = vec![
        (
            "unknown key",
            efs_config("mount_pont = \"/x\"\n"),
            vec!["mount_pont".into(), "line 7".into(), "unknown field".into()],
        ),
        (
            "wrong type",
            efs_config("mount_attempts = \"many\"\n"),
            vec![
                "mount_attempts".into(),
                "line 7".into(),
                "invalid type".into(),
            ],
        ),
        (
            "relative base_dir",
            efs_config("").replace("\"/opt/corda\"", "\"opt/corda\""),
            vec![
                "`node.base_dir`".into(),
                "\"opt/corda\"".into(),
                "absolute".into(),
            ],
        ),
        (
            "relative mount_point",
            efs_config("mount_point = \"share\"\n"),
            vec![
                "`storage.mount_point`".into(),
                "\"share\"".into(),
                "absolute".into(),
            ],
        ),
        (
            "unknown backend",
            efs_config("").replace("\"efs\"", "\"gluster\""),
            vec!["gluster".into(), "line 5".into(), "azure-smb".into()],
        ),
        (
            "mount_point is a symlink",
            efs_config(&format!("mount_point = {}\n", toml_path(&symlink))),
            vec![
                "`storage.mount_point`".into(),
                symlink.display().to_string(),
                "is a symlink".into(),
                "systemd cannot mount on a symlink".into(),
            ],
        ),
        (
            "= inside an option value",
            efs_config("options = \"sec=a=b\"\n"),
            vec![
                "`storage.options`".into(),
                "sec=a=b".into(),
                "may not contain `=`".into(),
            ],
        ),
        (
            "nolock",
            efs_config("options = \"nolock\"\n"),
            vec!["`storage.options`".into(), "nolock".into()],
        ),
        (
            "source of the wrong form",
            efs_config("").replace(EFS_SOURCE, "//srv/share"),
            vec![
                "`storage.source`".into(),
                "//srv/share".into(),
                "host:/path".into(),
            ],
        ),
        (
            "timeout shorter than the retries",
            efs_config("mount_attempts = 20\nmount_timeout_s = 10\n"),
            vec![
                "`storage.mount_timeout_s`".into(),
                "= 10".into(),
                "20 attempts".into(),
            ],
        ),
        (
            "missing [node]",
            "[storage]\nbackend = \"premounted\"\n".into(),
            vec!["missing field `node`".into()],
        ),
    ];
    for (i, (name, text, needles)) in cases.iter().enumerate() {
        let path = fx.write(&format!("case{i}.toml"), text);
        let out = artemis_sync(&path, ["check-config"]);
        assert_eq!(out.status.code(), Some(3), "case {name:?}:\n{out}");
        assert!(
            out.stdout.is_empty(),
            "case {name:?} printed a config:\n{out}"
        );
        let mut all = needles.clone();
        all.push(path.display().to_string());
        for n in &all {
            assert!(
                out.stderr.contains(n.as_str()),
                "case {name:?}: stderr lacks {n:?}:\n{out}"
            );
        }
    }
    // The symlink and its target were left alone.
    assert_eq!(fs::read_link(&symlink).unwrap(), real);
}

#[test]
fn check_config_refuses_a_readable_credentials_file() {
    let fx = Fixture::new();
    let cred = fx.write("azure.cred", "username=acct\npassword=s3cret\n");
    chmod(&cred, 0o644);
    let path = fx.write("agent.toml", azure_smb_config(&cred));
    if !is_root() {
        // a file this user owns is refused for its owner before its mode is looked at
        artemis_sync(&path, ["check-config"])
            .code(3)
            .stderr_has(&[
                "`storage.credentials_file`",
                "not root",
                &format!("chown root:root {}", cred.display()),
            ])
            .nowhere("s3cret");
        skip(
            "check_config_refuses_a_readable_credentials_file",
            "the mode check needs a root-owned file (not root)",
        );
        return;
    }
    artemis_sync(&path, ["check-config"])
        .code(3)
        .stderr_has(&[
            &path.display().to_string(),
            "`storage.credentials_file`",
            "mode 0644",
            &format!("chmod 600 {}", cred.display()),
        ])
        .nowhere("s3cret");
    assert_eq!(
        fs::read_to_string(&cred).unwrap(),
        "username=acct\npassword=s3cret\n"
    );
    chmod(&cred, 0o600);
    artemis_sync(&path, ["check-config"])
        .code(0)
        .stdout_has(&[&format!("credentials_file = {}", toml_path(&cred))])
        .nowhere("s3cret");
}

#[test]
fn check_config_reads_the_file_from_c_and_from_the_environment() {
    let fx = Fixture::new();
    let good = fx.write("good.toml", efs_config(""));
    let missing = fx.path("missing.toml");
    // ARTEMIS_SYNC_CONFIG alone
    run(main_cmd()
        .env("ARTEMIS_SYNC_CONFIG", &good)
        .arg("check-config"))
    .code(0)
    .stdout_has(&[&format!("# {}: valid", good.display())]);
    run(main_cmd()
        .env("ARTEMIS_SYNC_CONFIG", &missing)
        .arg("check-config"))
    .code(3)
    .stderr_has(&[&missing.display().to_string()]);
    // -c, before or after the subcommand, wins over the environment
    run(main_cmd()
        .env("ARTEMIS_SYNC_CONFIG", &missing)
        .arg("-c")
        .arg(&good)
        .arg("check-config"))
    .code(0)
    .stdout_has(&[&format!("# {}: valid", good.display())]);
    run(main_cmd()
        .env("ARTEMIS_SYNC_CONFIG", &missing)
        .arg("check-config")
        .arg("--config")
        .arg(&good))
    .code(0);
    // neither: the default path is named
    if !Path::new("/etc/artemis-sync/agent.toml").exists() {
        run(main_cmd().arg("check-config"))
            .code(3)
            .stderr_has(&["/etc/artemis-sync/agent.toml"]);
    }
}

#[test]
fn check_config_accepts_the_shipped_example() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/agent.toml");
    if !example.exists() {
        skip(
            "check_config_accepts_the_shipped_example",
            &format!("{} is absent", example.display()),
        );
        return;
    }
    artemis_sync(&example, ["check-config"]).code(0);
}

#[test]
fn doctor_reports_a_missing_config_as_one_failed_check() {
    let fx = Fixture::new();
    let path = fx.path("missing.toml");
    let out = artemis_sync(&path, ["doctor", "--json"]);
    out.code(4);
    let report: serde_json::Value =
        serde_json::from_str(&out.stdout).expect("doctor --json is JSON");
    assert_eq!(report["ok"], false, "{out}");
    let checks = report["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 1, "{out}");
    assert_eq!(checks[0]["name"], "config");
    assert_eq!(checks[0]["status"], "fail");
    let detail = checks[0]["detail"].as_str().unwrap();
    assert!(detail.contains(path.to_str().unwrap()), "{out}");
    assert_eq!(checks[0]["fix"], format!("edit {}", path.display()));
    artemis_sync(&path, ["doctor"])
        .code(4)
        .stdout_has(&["FAIL  config", &format!("fix: edit {}", path.display())]);
}

#[test]
fn usage_errors_exit_2() {
    run(main_cmd().arg("frobnicate"))
        .code(2)
        .stderr_has(&["frobnicate"]);
    run(main_cmd().args(["link", "--bogus"]))
        .code(2)
        .stderr_has(&["--bogus"]);
    run(&mut main_cmd()).code(2);
    run(main_cmd().arg("--help"))
        .code(0)
        .stdout_has(&["Exit codes:", "5  refused"]);
}

#[test]
fn issue2_fstab_prints_the_exact_line_for_efs() {
    let fx = Fixture::new();
    let path = fx.write("agent.toml", efs_config(""));
    let out = artemis_sync(&path, ["fstab"]);
    out.code(0);
    assert_eq!(
        out.stdout,
        format!(
            "{EFS_SOURCE} /var/lib/artemis-sync/share artemis-sync \
             backend=efs,_netdev,nofail,x-systemd.mount-timeout=180 0 0\n"
        ),
        "{out}"
    );
}

#[test]
fn fstab_appends_user_options_and_non_default_retries() {
    let fx = Fixture::new();
    let path = fx.write(
        "agent.toml",
        efs_config("mount_point = \"/srv/artemis share\"\noptions = \"timeo=300,noac\"\nmount_attempts = 5\n"),
    );
    let out = artemis_sync(&path, ["fstab"]);
    out.code(0);
    assert_eq!(
        out.stdout,
        format!(
            "{EFS_SOURCE} /srv/artemis\\040share artemis-sync \
             backend=efs,_netdev,nofail,x-systemd.mount-timeout=180,mount_attempts=5,timeo=300,noac 0 0\n"
        ),
        "{out}"
    );
}

#[test]
fn fstab_carries_the_azure_credentials_file() {
    if !require_root(
        "fstab_carries_the_azure_credentials_file",
        "the credentials file must be owned by root",
    ) {
        return;
    }
    let fx = Fixture::new();
    let cred = fx.write("azure.cred", "username=acct\npassword=s3cret\n");
    chmod(&cred, 0o600);
    let path = fx.write("agent.toml", azure_smb_config(&cred));
    let out = artemis_sync(&path, ["fstab"]);
    out.code(0).nowhere("s3cret");
    assert_eq!(
        out.stdout,
        format!(
            "//acct.file.core.windows.net/corda /var/lib/artemis-sync/share artemis-sync \
             backend=azure-smb,_netdev,nofail,x-systemd.mount-timeout=180,credentials={} 0 0\n",
            cred.display()
        ),
        "{out}"
    );
}

#[test]
fn fstab_for_a_premounted_share_is_a_clear_error() {
    let fx = Fixture::new();
    let share = fx.mkdir("share");
    let path = fx.write("agent.toml", premounted_config(&fx.mkdir("corda"), &share));
    let out = artemis_sync(&path, ["fstab"]);
    out.failed().code(1).stderr_has(&[
        "premounted",
        "nothing to mount",
        &share.display().to_string(),
    ]);
    assert!(
        out.stdout.is_empty(),
        "no fstab line may be printed:\n{out}"
    );
}

#[test]
fn issue2_fstab_line_drives_the_helper() {
    // The line `fstab` prints, handed to the helper the way mount(8) does, gives the EFS mount.
    let fx = Fixture::new();
    let share = fx.mkdir("share");
    let path = fx.write(
        "agent.toml",
        efs_config(&format!("mount_point = {}\n", toml_path(&share))),
    );
    let out = artemis_sync(&path, ["fstab"]);
    out.code(0);
    let fields: Vec<&str> = out.stdout.split_whitespace().collect();
    assert_eq!(fields.len(), 6, "{out}");
    assert_eq!(fields[2], "artemis-sync");
    let marker = fx.path("mount-ran");
    let recorder = write_script(
        &fx.path("record-mount"),
        &format!("touch {}", marker.display()),
    );
    let helper = run(helper_cmd()
        .env("ARTEMIS_SYNC_MOUNT_PROGRAM", &recorder)
        .args([fields[0], fields[1], "-f", "-o", fields[3]]));
    helper.code(0).stdout_has(&[&format!(
        "-t nfs4 -o {EFS_OPTIONS} {EFS_SOURCE} {}",
        share.display()
    )]);
    assert!(
        !helper.stdout.contains("_netdev") && !helper.stdout.contains("x-systemd"),
        "{helper}"
    );
    assert!(!marker.exists(), "-f ran the mount program");
}
