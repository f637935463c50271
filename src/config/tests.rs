//! The config's unit tests: loading, defaults, and every check of `validate` through the
//! message it gives.

use super::*;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(Path::new("/etc/artemis-sync/agent.toml"), text)
}

const EFS: &str = r#"
[node]
base_dir = "/opt/corda"
[storage]
backend = "efs"
source = "fs-0123abcd.efs.eu-west-1.amazonaws.com:/"
"#;

#[test]
fn minimal_efs_config_gets_defaults() {
    let c = load(EFS).unwrap();
    assert_eq!(c.storage.mode, Mode::Shared);
    assert_eq!(c.storage.mount_point, Path::new(DEFAULT_MOUNT_POINT));
    assert_eq!(c.storage.mount_attempts, DEFAULT_MOUNT_ATTEMPTS);
    assert_eq!(c.artemis_link(), Path::new("/opt/corda/artemis"));
    // the printed effective config loads back to the same thing
    let again = load(&c.to_toml()).unwrap();
    assert_eq!(again.to_toml(), c.to_toml());
}

#[test]
fn unknown_key_is_named_with_its_line() {
    let err = load(&format!("{EFS}mount_pont = \"/x\"\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/etc/artemis-sync/agent.toml"), "{err}");
    assert!(err.contains("mount_pont"), "{err}");
    assert!(err.contains("line 7"), "{err}");
}

#[test]
fn wrong_type_is_named() {
    let err = load(&EFS.replace("[storage]", "[storage]\nmount_attempts = \"many\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 5") && err.contains("invalid type"),
        "{err}"
    );
}

#[test]
fn unknown_backend_lists_the_known_ones() {
    let err = load(&EFS.replace("\"efs\"", "\"gluster\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("gluster") && err.contains("azure-smb"),
        "{err}"
    );
}

#[test]
fn relative_paths_are_refused() {
    let err = load(&EFS.replace("/opt/corda", "opt/corda"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`node.base_dir`") && err.contains("absolute"),
        "{err}"
    );
    let err = load(&format!("{EFS}mount_point = \"share\"\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`storage.mount_point`"), "{err}");
}

#[test]
fn source_must_match_the_backend() {
    let err = load(&EFS.replace("fs-0123abcd.efs.eu-west-1.amazonaws.com:/", "//h/s"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`storage.source`") && err.contains("host:/path"),
        "{err}"
    );
    assert!(nfs_host("[fd00::1]:/export").is_some());
    assert_eq!(
        smb_host("//acct.file.core.windows.net/share"),
        Some("acct.file.core.windows.net")
    );
    assert!(smb_host("//host").is_none());
}

#[test]
fn lock_breaking_and_secret_options_are_refused() {
    let err = load(&format!("{EFS}options = \"nolock\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`storage.options`") && err.contains("nolock"),
        "{err}"
    );
    let err = load(&format!("{EFS}options = \"a=b=c\"\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("may not contain `=`"), "{err}");
    let smb = EFS
        .replace("\"efs\"", "\"cifs\"")
        .replace("fs-0123abcd.efs.eu-west-1.amazonaws.com:/", "//srv/share");
    let err = load(&format!("{smb}options = \"username=u,password=hunter2\"\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("credentials file"), "{err}");
}

#[test]
fn options_may_not_override_what_the_config_writes() {
    for opts in [
        "backend=nfs",
        "mount_attempts=100",
        "x-systemd.mount-timeout=5",
        "credentials=/x",
    ] {
        let err = load(&format!("{EFS}options = \"{opts}\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`storage.options` may not set"),
            "{opts}: {err}"
        );
    }
}

/// A quoted value holding `,x-` is one option (an SELinux context), not an `x-*` one: the
/// check looked for `x-` after every comma of the printed options.
#[test]
fn a_quoted_value_holding_x_dash_is_not_an_x_option() {
    let quoted = r#"context=\"system_u:object_r:nfs_t:s0:c1,x-c2\""#;
    load(&format!("{EFS}options = \"{quoted}\"\n")).unwrap();
}

#[test]
fn azure_smb_needs_a_private_root_owned_credentials_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cred = dir.path().join("azure.cred");
    std::fs::write(&cred, "username=acct\npassword=secret\n").unwrap();
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o644)).unwrap();
    let smb = EFS.replace("\"efs\"", "\"azure-smb\"").replace(
        "fs-0123abcd.efs.eu-west-1.amazonaws.com:/",
        "//acct.file.core.windows.net/corda",
    );
    let err = load(&smb).unwrap_err().to_string();
    assert!(
        err.contains("`storage.credentials_file` is required"),
        "{err}"
    );
    let with = format!("{smb}credentials_file = {:?}\n", cred);
    let err = load(&with).unwrap_err().to_string();
    if crate::sys::is_root() {
        assert!(
            err.contains("mode 0644") && err.contains("chmod 600"),
            "{err}"
        );
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();
        load(&with).unwrap();
    } else {
        assert!(err.contains("not root"), "{err}");
    }
}

#[test]
fn mount_point_symlink_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("share");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let err = load(&format!("{EFS}mount_point = {link:?}\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is a symlink"), "{err}");
}

#[test]
fn timeout_must_cover_the_retries() {
    let err = load(&format!("{EFS}mount_attempts = 20\nmount_timeout_s = 10\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`storage.mount_timeout_s`"), "{err}");
}

#[test]
fn lock_defaults_derive_from_the_mount_point_and_host() {
    let c = load(EFS).unwrap();
    assert_eq!(
        c.lock.dir,
        Path::new("/var/lib/artemis-sync/share/.artemis-sync")
    );
    assert_eq!(c.lock.machine_name, host_name());
    assert_eq!(c.holder_id(), format!("{}:/opt/corda", host_name()));
    assert_eq!(
        (c.lock.update_interval_ms, c.lock.wait_interval_ms),
        (20_000, 40_000)
    );
}

#[test]
fn intervals_and_stop_timeout_must_fit() {
    let err = load(&format!(
        "{EFS}[lock]\nupdate_interval_ms = 5000\nwait_interval_ms = 5000\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`lock.wait_interval_ms`") && err.contains("must exceed"),
        "{err}"
    );
    // 40000 - 20000 - 4000 leaves 16000 ms: 15000 fits, 16000 does not
    let with = |stop: u64| EFS.replace("[node]", &format!("[node]\nstop_timeout_ms = {stop}"));
    load(&with(15_000)).unwrap();
    let err = load(&with(16_000)).unwrap_err().to_string();
    assert!(
        err.contains("`node.stop_timeout_ms`") && err.contains("16000 ms remain"),
        "{err}"
    );
}

#[test]
fn replicated_mode_needs_its_section_and_authentication() {
    let err = load(&EFS.replace("[storage]", "[storage]\nmode = \"replicated\""))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`storage.mode`") && err.contains("[replication]"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let psk = dir.path().join("psk");
    std::fs::write(
        &psk,
        "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o600)).unwrap();
    let base = "[node]\nbase_dir = \"/opt/corda\"\n[storage]\nmode = \"replicated\"\n[replication]\nrole = \"hot\"\n\
                data_dir = \"/var/lib/artemis-sync/artemis\"\nlisten = \"127.0.0.1:7410\"\npeer = \"127.0.0.2:7410\"\n";
    let err = load(base).unwrap_err().to_string();
    assert!(err.contains("needs authentication"), "{err}");
    let c = load(&format!("{base}psk_file = {psk:?}\n")).unwrap();
    assert_eq!(c.storage.backend(), Backend::Premounted);
    assert_eq!(c.replication.as_ref().unwrap().page_size, 4096);
    load(&c.to_toml()).unwrap();
    std::fs::set_permissions(&psk, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = load(&format!("{base}psk_file = {psk:?}\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`replication.psk_file`") && err.contains("chmod 600"),
        "{err}"
    );
    load(&format!("{base}insecure_loopback = true\n")).unwrap();
    let err = load(&format!(
        "{}insecure_loopback = true\n",
        base.replace("127.0.0.2", "10.0.0.2")
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("`replication.insecure_loopback`"), "{err}");
    let err = load(&format!(
        "{base}insecure_loopback = true\npage_size = 1000\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("`replication.page_size`"), "{err}");
    let err = load(
        &format!("{base}insecure_loopback = true\n")
            .replace("[storage]\n", "[storage]\nbackend = \"efs\"\n"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("`storage.backend`"), "{err}");
}

#[test]
fn issue12_fuse_capture_needs_a_mount_point_apart_from_data_dir() {
    let base = "[node]\nbase_dir = \"/opt/corda\"\n[storage]\nmode = \"replicated\"\n[replication]\nrole = \"hot\"\n\
                data_dir = \"/var/lib/artemis-sync/artemis\"\nlisten = \"127.0.0.1:7410\"\npeer = \"127.0.0.2:7410\"\n\
                insecure_loopback = true\n";
    // FUSE by default, served at the default mount point
    let c = load(base).unwrap();
    let r = c.replication.as_ref().unwrap();
    assert_eq!(r.capture, Capture::Fuse);
    assert_eq!(r.mount_point, Path::new("/var/lib/artemis-sync/journal"));
    let watch = load(&format!("{base}capture = \"watch\"\n")).unwrap();
    assert_eq!(watch.replication.as_ref().unwrap().capture, Capture::Watch);
    load(&watch.to_toml()).unwrap();
    let err = load(&format!("{base}mount_point = \"\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`replication.mount_point`") && err.contains("is required"),
        "{err}"
    );
    let err = load(&format!(
        "{base}capture = \"fuse\"\nmount_point = \"journal\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("`replication.mount_point`"), "{err}");
    for inside in [
        "/var/lib/artemis-sync/artemis/m",
        "/var/lib/artemis-sync",
        "/var/lib/artemis-sync/artemis",
    ] {
        let err = load(&format!(
            "{base}capture = \"fuse\"\nmount_point = \"{inside}\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("must be apart from data_dir"),
            "{inside}: {err}"
        );
    }
    let err = load(&format!(
        "{base}capture = \"fuse\"\nmount_point = \"/opt/corda/artemis\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("base_dir/artemis"), "{err}");
    let err = load(&format!(
        "{base}capture = \"watch\"\nmount_point = \"/srv/journal\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("only with capture"), "{err}");
    let err = load(&format!("{base}capture = \"inotify\"\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("capture"), "{err}");
    let c = load(&format!(
        "{base}capture = \"fuse\"\nmount_point = \"/var/lib/artemis-sync/journal\"\n"
    ))
    .unwrap();
    let r = c.replication.as_ref().unwrap();
    assert_eq!(r.capture, Capture::Fuse);
    assert_eq!((r.ack, r.peer_timeout_ms), (Ack::Async, 2000));
    load(&c.to_toml()).unwrap();
    let err = load(&format!("{base}capture = \"watch\"\nack = \"durable\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`replication.ack`") && err.contains("capture = \"fuse\""),
        "{err}"
    );
    let fuse = format!(
        "{base}capture = \"fuse\"\nmount_point = \"/var/lib/artemis-sync/journal\"\nack = \"durable\"\n"
    );
    let c = load(&format!("{fuse}on_peer_loss = \"block\"\n")).unwrap();
    let r = c.replication.as_ref().unwrap();
    assert_eq!((r.ack, r.on_peer_loss), (Ack::Durable, PeerLoss::Block));
    let err = load(&format!("{fuse}peer_timeout_ms = 0\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`replication.peer_timeout_ms`"), "{err}");
}

/// `username=acct%KEY` is a password to mount.cifs; the config accepted it and the fstab line
/// (world-readable /etc/fstab) carried it.
#[test]
fn issue2_a_password_in_the_user_name_is_refused_naming_the_key() {
    let text = r#"
[node]
base_dir = "/opt/corda"
[storage]
backend = "cifs"
source = "//srv/share"
options = "username=acct%S3cretKey"
"#;
    let err = load(text).unwrap_err().to_string();
    assert!(
        err.contains("storage.options") && err.contains("`username=`"),
        "{err}"
    );
}

/// The check that the retries fit in `mount_timeout_s` counted only the pauses: each attempt
/// also waits up to MOUNT_PROBE_TIMEOUT (3 s) for the server's port while the network is not
/// up, so a config it accepted could have systemd kill the helper while it still retried.
#[test]
fn issue2_the_mount_timeout_counts_the_reachability_probes() {
    // 8 attempts: 38.6 s of pauses at most, and 24 s of probes
    let err = load(&EFS.replace("[storage]", "[storage]\nmount_timeout_s = 40"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("storage.mount_timeout_s") && err.contains("reachability probes"),
        "{err}"
    );
    assert!(load(&EFS.replace("[storage]", "[storage]\nmount_timeout_s = 63")).is_ok());
}

/// A credentials file whose path holds a `,` or `=` loaded, but its path travels as the value
/// of a mount option (`credentials=` in the fstab line and on mount's command line), where a
/// `,` ends the value and a `=` makes the helper refuse the option string: the mount failed at
/// boot (`mount.cifs` read `credentials=/etc/artemis-sync/a`) instead of here.
#[test]
fn credentials_file_path_that_mount_options_cannot_carry_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cifs = EFS
        .replace("\"efs\"", "\"cifs\"")
        .replace("fs-0123abcd.efs.eu-west-1.amazonaws.com:/", "//srv/share");
    for name in ["a,b.cred", "a=b.cred"] {
        let cred = dir.path().join(name);
        std::fs::write(&cred, "username=acct\npassword=secret\n").unwrap();
        std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load(&format!("{cifs}credentials_file = {cred:?}\n"))
            .map(|c| crate::shared::mount::fstab_line(&c).unwrap())
            .unwrap_err()
            .to_string();
        let bad = if name.contains(',') { "`,`" } else { "`=`" };
        assert!(
            err.contains("`storage.credentials_file`") && err.contains(bad),
            "{name}: {err}"
        );
    }
}

/// A `"` in the credentials file's path passed every check, and `artemis-sync fstab` wrote it
/// into the options of the line: at boot the helper read it as a quote never closed and
/// refused the whole line (exit 1), as mount(8) refused `artemis-sync mount`'s options.
#[test]
fn issue2_a_credentials_file_path_with_a_quote_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cred = dir.path().join("azure\"1.cred");
    std::fs::write(&cred, "username=acct\npassword=secret\n").unwrap();
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cifs = EFS
        .replace("\"efs\"", "\"cifs\"")
        .replace("fs-0123abcd.efs.eu-west-1.amazonaws.com:/", "//srv/share");
    let loaded = load(&format!("{cifs}credentials_file = {cred:?}\n"));
    if let Ok(config) = &loaded {
        // what the helper makes of the line at boot
        let line = crate::shared::mount::fstab_line(config).unwrap();
        let opts = line.split(' ').nth(3).unwrap();
        let boot =
            crate::shared::mount::MountRequest::from_helper_args("//srv/share", dir.path(), opts);
        panic!(
            "accepted; at boot the helper says: {:?}",
            boot.err().map(|e| e.to_string())
        );
    }
    let err = loaded.unwrap_err().to_string();
    assert!(
        err.contains("`storage.credentials_file`") && err.contains("`\"`"),
        "{err}"
    );
}

/// mount.cifs takes `cred=` as `credentials=`: `[storage] options` could name a credentials
/// file that `credentials_file`'s checks (root-owned, mode 0600) never saw, and the helper
/// refused it only at boot.
#[test]
fn cred_option_is_reserved_like_credentials() {
    let cifs = EFS
        .replace("\"efs\"", "\"cifs\"")
        .replace("fs-0123abcd.efs.eu-west-1.amazonaws.com:/", "//srv/share");
    let err = load(&format!("{cifs}options = \"cred=/tmp/anyone-can-read\"\n"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`storage.options` may not set `cred`"),
        "{err}"
    );
}

/// A mount point (or replicated `data_dir`, FUSE `mount_point`) inside `base_dir/artemis`
/// loaded, though that directory is what becomes the link: `link` found it not empty, and
/// `link --migrate` copied the share into itself and failed.
#[test]
fn paths_inside_the_link_are_refused() {
    let err = load(&format!(
        "{EFS}mount_point = \"/opt/corda/artemis/share\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`storage.mount_point`") && err.contains("inside base_dir/artemis"),
        "{err}"
    );
    let base = "[node]\nbase_dir = \"/opt/corda\"\n[storage]\nmode = \"replicated\"\n[replication]\nrole = \"hot\"\n\
                listen = \"127.0.0.1:7410\"\npeer = \"127.0.0.2:7410\"\ninsecure_loopback = true\n";
    let err = load(&format!(
        "{base}data_dir = \"/opt/corda/artemis/data\"\ncapture = \"watch\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`replication.data_dir`") && err.contains("inside base_dir/artemis"),
        "{err}"
    );
    let err = load(&format!(
        "{base}data_dir = \"/var/lib/artemis-sync/artemis\"\nmount_point = \"/opt/corda/artemis/j\"\n"
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`replication.mount_point`") && err.contains("inside base_dir/artemis"),
        "{err}"
    );
}

/// `[node] command` and `systemd_unit` both set loaded, and the agent silently ran the unit
/// only: the command the operator wrote never ran.
#[test]
fn command_and_systemd_unit_together_are_refused() {
    let err = load(&EFS.replace(
        "[storage]",
        "command = [\"/opt/corda/bin/run-node\"]\nsystemd_unit = \"corda.service\"\n[storage]",
    ))
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`node.systemd_unit`") && err.contains("not both"),
        "{err}"
    );
}

/// An NFS host starting with `-` loaded, and `artemis-sync fstab` wrote it as the line's source:
/// at boot mount(8) took it for an option. The config names the key.
#[test]
fn issue2_a_source_whose_host_starts_with_a_dash_is_refused_naming_the_key() {
    let err = load(&EFS.replace("fs-0123abcd.efs.eu-west-1.amazonaws.com:/", "-v:/"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`storage.source`") && err.contains("starts with `-`"),
        "{err}"
    );
}

/// A mount point or a replicated `data_dir` at `base_dir` or above it loaded: a share mounted
/// over `/opt` hid the node's files, and a `data_dir` of `/opt` had the cold side make `/opt`
/// an exact copy of the hot side's, removing the node's own files. Each is refused naming its
/// key; a path beside or below `base_dir` (but not its link) still loads.
#[test]
fn issue7_a_mount_point_or_data_dir_at_or_above_base_dir_is_refused() {
    let repl = "[node]\nbase_dir = \"/opt/corda\"\n[storage]\nmode = \"replicated\"\n[replication]\nrole = \"hot\"\n\
                data_dir = \"DATA\"\nlisten = \"127.0.0.1:7410\"\npeer = \"127.0.0.2:7410\"\n\
                insecure_loopback = true\nmount_point = \"MP\"\n";
    let ok = |data: &str, mp: &str| load(&repl.replace("DATA", data).replace("MP", mp));
    for (data, mp, key, hides) in [
        (
            "/opt/corda",
            "/var/lib/j",
            "replication.data_dir",
            "remove the node's own files",
        ),
        (
            "/opt",
            "/var/lib/j",
            "replication.data_dir",
            "remove the node's own files",
        ),
        (
            "/",
            "/var/lib/j",
            "replication.data_dir",
            "remove the node's own files",
        ),
        (
            "/var/lib/d",
            "/opt/corda",
            "replication.mount_point",
            "hides the node's own files",
        ),
        (
            "/var/lib/d",
            "/opt/",
            "replication.mount_point",
            "hides the node's own files",
        ),
    ] {
        let err = ok(data, mp).unwrap_err().to_string();
        assert!(
            err.contains(&format!("`{key}`")) && err.contains(hides),
            "{data} {mp}: {err}"
        );
    }
    ok("/opt/corda/journal", "/var/lib/j").unwrap();
    ok("/var/lib/d", "/opt/corda2").unwrap();
    for mp in ["/opt/corda", "/opt", "/"] {
        let err = load(&EFS.replace("[storage]", &format!("[storage]\nmount_point = {mp:?}")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`storage.mount_point`") && err.contains("hides the node's own files"),
            "{mp}: {err}"
        );
    }
    load(&EFS.replace("[storage]", "[storage]\nmount_point = \"/opt/corda-share\"")).unwrap();
}
