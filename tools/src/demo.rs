//! `artemis-sync-demo`: a walk through both modes on local directories, with no config, no root
//! and no network beyond loopback, saying what it does at each step.
//!
//! Shared mode: it shows the mount a boot would run for an EFS and an Azure share (`-f`,
//! nothing mounted), then takes a Corda base directory whose `artemis/` holds a small
//! synthetic journal, refuses to link over it, migrates it into a "premounted" share with
//! every file verified, and runs `doctor`.
//!
//! Replicated mode: it starts a hot and a cold agent (real `artemis-sync agent` processes,
//! PSK-authenticated, on 127.0.0.1), runs an Artemis-like writer on the hot side while
//! printing throughput and replication lag every second, then has the hot agent `verify` the
//! two trees.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use artemis_sync::config::Config;
use artemis_sync::daemon::protocol::{Reply, Request};
use artemis_sync::link::{self, LinkOptions, LinkOutcome};
use artemis_sync::shared::mount::{mount, MountRequest};
use artemis_sync::sys::{RealSys, Sys};

use crate::workload::{quantile, Report};

/// Size of each synthetic journal file: Artemis' default `journal-file-size`.
pub const DEMO_JOURNAL_FILE_BYTES: usize = 10 << 20;
/// Synthetic journal files written.
pub const DEMO_JOURNAL_FILES: usize = 3;

/// Errors of the demo, each naming the step it stopped at.
#[derive(Debug, displaydoc::Display, thiserror::Error)]
pub enum DemoError {
    /// demo step `{step}`: {message}
    Step { step: &'static str, message: String },
}

fn step<E: std::error::Error + 'static>(step: &'static str) -> impl FnOnce(E) -> DemoError {
    move |e| DemoError::Step {
        step,
        message: artemis_sync::error_chain(&e),
    }
}

/// Runs the demo in `dir` (created if missing), narrating to `out`.
pub fn run(dir: &Path, out: &mut dyn Write) -> Result<(), DemoError> {
    let sys = RealSys::from_env();
    fs::create_dir_all(dir).map_err(step("create demo directory"))?;
    let dir = &dir.canonicalize().map_err(step("resolve demo directory"))?;
    if fs::read_dir(dir)
        .map_err(step("list demo directory"))?
        .next()
        .is_some()
    {
        return Err(DemoError::Step {
            step: "demo directory",
            message: format!(
                "{} is not empty; give an empty or new directory",
                dir.display()
            ),
        });
    }
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    say(
        out,
        format!(
            "artemis-sync-demo: shared-storage mode on local directories under {}\n",
            dir.display()
        ),
    );

    show_boot_mounts(&sys, out)?;
    let (share, base) = make_unshared_node(dir, out)?;
    let (config_path, config) = write_config(dir, &base, &share, out)?;
    link_steps(&config.artemis_link(), &share, out)?;
    doctor_step(&config, &config_path, &sys, out)?;
    let summary = replicated(dir, out)?;
    say(out, format!("\nDone: the journal lives in the share, reached through the link, nothing was deleted; {summary}."));
    Ok(())
}

/// Step 1: the mounts a boot would run for EFS and Azure Files over NFS (`-f`: nothing mounted).
fn show_boot_mounts(sys: &RealSys, out: &mut dyn Write) -> Result<(), DemoError> {
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    say(out, "1. At boot, mount(8) runs /sbin/mount.artemis-sync for an fstab line of type artemis-sync.".into());
    say(
        out,
        "   With -f it prints the mount it would run. For AWS EFS and Azure Files over NFS:".into(),
    );
    for (spec, opts) in [
        ("fs-0123abcd.efs.eu-west-1.amazonaws.com:/", "backend=efs"),
        (
            "acct.file.core.windows.net:/acct/corda",
            "backend=azure-nfs",
        ),
    ] {
        let mut req =
            MountRequest::from_helper_args(spec, Path::new("/var/lib/artemis-sync/share"), opts)
                .map_err(step("mount -f"))?;
        req.fake = true;
        let _ = write!(out, "   $ ");
        mount(sys, &req, out).map_err(step("mount -f"))?;
    }

    Ok(())
}

/// Step 2: a Corda base directory whose real `artemis/` holds a small synthetic journal;
/// returns the share and the base directory.
fn make_unshared_node(dir: &Path, out: &mut dyn Write) -> Result<(PathBuf, PathBuf), DemoError> {
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    let share = dir.join("share");
    let base = dir.join("corda");
    let artemis = base.join("artemis");
    fs::create_dir_all(&share).map_err(step("create share"))?;
    fs::create_dir_all(artemis.join("journal")).map_err(step("create base dir"))?;
    fs::create_dir_all(artemis.join("bindings")).map_err(step("create base dir"))?;
    say(
        out,
        format!(
            "\n2. A Corda node that has run without a share has a real {} directory.",
            artemis.display()
        ),
    );
    say(
        out,
        format!(
            "   Writing {DEMO_JOURNAL_FILES} journal files of {} MiB and a bindings file into it.",
            DEMO_JOURNAL_FILE_BYTES >> 20
        ),
    );
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 1..=DEMO_JOURNAL_FILES {
        let data: Vec<u8> = (0..DEMO_JOURNAL_FILE_BYTES)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed.to_le_bytes()[0]
            })
            .collect();
        fs::write(artemis.join(format!("journal/activemq-data-{i}.amq")), data)
            .map_err(step("write journal"))?;
    }
    fs::write(
        artemis.join("bindings/activemq-bindings-1.bindings"),
        vec![0u8; 1 << 20],
    )
    .map_err(step("write bindings"))?;

    Ok((share, base))
}

/// Step 3: the config of a premounted share, shown.
fn write_config(
    dir: &Path,
    base: &Path,
    share: &Path,
    out: &mut dyn Write,
) -> Result<(PathBuf, Config), DemoError> {
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    let config_path = dir.join("agent.toml");
    let config_text = format!(
        "# written by artemis-sync-demo\n[node]\nbase_dir = {base:?}\n\n[storage]\nmode = \"shared\"\n\
         backend = \"premounted\"   # the demo's share is a plain directory\nmount_point = {share:?}\n\n\
         [lock]\nallow_local_locks = true   # one host only\n"
    );
    fs::write(&config_path, &config_text).map_err(step("write config"))?;
    let config = Config::load(&config_path).map_err(step("load config"))?;
    say(
        out,
        format!("\n3. The config ({}):\n", config_path.display()),
    );
    for line in config_text.lines().skip(1) {
        say(out, format!("   {line}"));
    }

    Ok((config_path, config))
}

/// Steps 4 to 6: `link` refuses the journal directory, `link --migrate` moves it into the share
/// with every file verified, and a second `link` changes nothing.
fn link_steps(link_path: &Path, share: &Path, out: &mut dyn Write) -> Result<(), DemoError> {
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    say(
        out,
        "\n4. `artemis-sync link` refuses to put a link where a journal is:".into(),
    );
    match link::link(link_path, share, LinkOptions::default()) {
        Err(e) => say(out, format!("   refused: {e}")),
        Ok(o) => {
            return Err(DemoError::Step {
                step: "link",
                message: format!("expected a refusal, got {o:?}"),
            })
        }
    }

    say(out, "\n5. `artemis-sync link --migrate` copies into the share, verifies every file by blake3, keeps the old directory aside:".into());
    let report = match link::link(
        link_path,
        share,
        LinkOptions {
            migrate: true,
            force: false,
        },
    )
    .map_err(step("link --migrate"))?
    {
        LinkOutcome::Migrated(r) => r,
        other => {
            return Err(DemoError::Step {
                step: "link --migrate",
                message: format!("unexpected outcome {other:?}"),
            })
        }
    };
    say(
        out,
        format!(
            "   {} files ({} MiB) copied and verified; old directory kept at {}",
            report.copied,
            report.bytes >> 20,
            report.aside.display()
        ),
    );
    let target = fs::read_link(link_path).map_err(step("read link"))?;
    say(
        out,
        format!("   {} -> {}", link_path.display(), target.display()),
    );
    let mut identical = 0;
    for i in 1..=DEMO_JOURNAL_FILES {
        let rel = PathBuf::from(format!("journal/activemq-data-{i}.amq"));
        let a = link::file_digest(&link_path.join(&rel)).map_err(step("verify"))?;
        let b = link::file_digest(&report.aside.join(&rel)).map_err(step("verify"))?;
        if a != b {
            return Err(DemoError::Step {
                step: "verify",
                message: format!("{} differs through the link", rel.display()),
            });
        }
        identical += 1;
    }
    say(out, format!("   read back through the link: {identical}/{DEMO_JOURNAL_FILES} journal files identical to the originals"));

    say(out, "\n6. A second `artemis-sync link` is a no-op:".into());
    match link::link(link_path, share, LinkOptions::default()).map_err(step("link again"))? {
        LinkOutcome::AlreadyLinked => say(
            out,
            format!(
                "   {} already links to the share; nothing to do",
                link_path.display()
            ),
        ),
        other => {
            return Err(DemoError::Step {
                step: "link again",
                message: format!("expected no change, got {other:?}"),
            })
        }
    }

    Ok(())
}

/// Step 7: `doctor` on what the demo built; every check must pass.
fn doctor_step(
    config: &Config,
    config_path: &Path,
    sys: &RealSys,
    out: &mut dyn Write,
) -> Result<(), DemoError> {
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    say(out, "\n7. `artemis-sync doctor`:".into());
    let report = artemis_sync::doctor::run(Ok(config), config_path, sys as &dyn Sys);
    for line in report.to_text().lines() {
        say(out, format!("   {line}"));
    }
    if !report.ok {
        return Err(DemoError::Step {
            step: "doctor",
            message: "a check failed".into(),
        });
    }
    Ok(())
}

/// A lag as the demo prints it.
fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.2} ms", d.as_secs_f64() * 1e3))
}

/// How long the demo's writer runs.
pub const DEMO_WRITE_SECONDS: u64 = 4;
/// The demo writer's records per second.
pub const DEMO_RATE_PER_S: u32 = 1000;

/// Kills the demo's agents if the demo stops early.
struct Agents(Vec<(&'static str, std::process::Child)>);

impl Agents {
    fn stop(&mut self) {
        for (_, c) in &mut self.0 {
            // SAFETY: kill has no memory-safety preconditions; the pid is our live child.
            unsafe {
                libc::kill(
                    libc::pid_t::try_from(c.id()).expect("a child's pid came from a pid_t"),
                    libc::SIGTERM,
                );
            }
        }
        for (_, c) in &mut self.0 {
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.0.clear();
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn replicated(dir: &Path, out: &mut dyn Write) -> Result<String, DemoError> {
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    let root = dir.join("replicated");
    say(
        out,
        format!(
            "\n8. Replicated mode, for VMs without a network filesystem, under {}:",
            root.display()
        ),
    );
    say(
        out,
        "   a hot and a cold agent on 127.0.0.1, authenticated by a pre-shared key.".into(),
    );
    fs::create_dir_all(&root).map_err(step("create replicated dir"))?;
    let psk = write_psk(&root)?;
    let (mut agents, configs) = start_agents(&root, &psk, out)?;
    wait_answering(&configs)?;
    let report = write_and_measure(&root, out)?;
    verify_step(&root, out)?;
    agents.stop();
    say(
        out,
        "   both agents stopped (the hot one drained its stream first).".into(),
    );
    Ok(format!(
        "the replicated copy is identical, {} records streamed with p50 lag {}",
        report.records,
        ms(quantile(&report.lags, 0.5))
    ))
}

/// A fresh pre-shared key for the demo's pair, in a 0600 file under `root`.
fn write_psk(root: &Path) -> Result<PathBuf, DemoError> {
    let psk = root.join("psk");
    let key = artemis_sync::replicated::wire::nonce().map_err(step("make a key"))?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&psk)
            .map_err(step("write psk"))?;
        f.write_all(hex.as_bytes()).map_err(step("write psk"))?;
    }
    Ok(psk)
}

/// The two sides' names and directories.
type Sides = Vec<(&'static str, PathBuf)>;

/// Starts a cold and a hot agent under `root`, each handed its listener.
fn start_agents(
    root: &Path,
    psk: &Path,
    out: &mut dyn Write,
) -> Result<(Agents, Sides), DemoError> {
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    // bound here and handed to each agent as its fd 3, so no other process can take the ports
    // in between (see artemis_sync::daemon::listen_fds)
    let hot_listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(step("bind ports"))?;
    let cold_listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(step("bind ports"))?;
    let ports = (
        hot_listener
            .local_addr()
            .map_err(step("bind ports"))?
            .port(),
        cold_listener
            .local_addr()
            .map_err(step("bind ports"))?
            .port(),
    );
    let exe = crate::agent_binary();
    let mut agents = Agents(Vec::new());
    let mut configs = Vec::new();
    for (name, role, listen, peer, listener) in [
        ("cold", "cold", ports.1, ports.0, &cold_listener),
        ("hot", "hot", ports.0, ports.1, &hot_listener),
    ] {
        let side = root.join(name);
        fs::create_dir_all(side.join("base")).map_err(step("create side"))?;
        let cfg = side.join("agent.toml");
        let text = format!(
            "[node]\nbase_dir = {:?}\n\n[storage]\nmode = \"replicated\"\n\n[replication]\nrole = \"{role}\"\ndata_dir = {:?}\n\
             listen = \"127.0.0.1:{listen}\"\npeer = \"127.0.0.1:{peer}\"\npsk_file = {:?}\nstate_file = {:?}\ncapture = \"watch\"\n\n\
             [lock]\nmachine_name = \"{name}\"\n\n[agent]\ncontrol_socket = {:?}\n",
            side.join("base"), side.join("data"), psk, side.join("state.json"), side.join("agent.sock")
        );
        fs::write(&cfg, text).map_err(step("write config"))?;
        let log = fs::File::create(side.join("agent.log")).map_err(step("create log"))?;
        let child = artemis_sync::daemon::listen_fds::command_with_listener(&exe, listener)
            .arg("-c")
            .arg(&cfg)
            .arg("agent")
            .env("ARTEMIS_SYNC_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(step("start agent"))?;
        say(
            out,
            format!(
                "   {name:<4} agent pid {:<7} listens on 127.0.0.1:{listen}, log {}",
                child.id(),
                side.join("agent.log").display()
            ),
        );
        agents.0.push((name, child));
        configs.push((name, side));
    }
    Ok((agents, configs))
}

/// Waits until both agents answer on their control sockets.
fn wait_answering(configs: &Sides) -> Result<(), DemoError> {
    for (name, side) in configs {
        let sock = side.join("agent.sock");
        let deadline = Instant::now() + Duration::from_secs(10);
        while artemis_sync::daemon::control::request(
            &sock,
            &Request::Status,
            Duration::from_secs(1),
        )
        .is_err()
        {
            if Instant::now() > deadline {
                return Err(DemoError::Step {
                    step: "start agent",
                    message: format!("the {name} agent did not answer on {}", sock.display()),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Step 9: the Artemis-like writer on the hot side, with the lag to the cold disk each second.
fn write_and_measure(root: &Path, out: &mut dyn Write) -> Result<Report, DemoError> {
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    let hot_data = root.join("hot/data");
    let cold_data = root.join("cold/data");
    say(out, format!(
        "\n9. An Artemis-like writer on the hot side for {DEMO_WRITE_SECONDS} s: 10 MiB preallocated journal files \
         created as .tmp and renamed, {DEMO_RATE_PER_S} records/s of 4 KiB, each followed by fdatasync, paging files \
         created and deleted. Lag = the record on the cold disk minus the writer's fdatasync returning:"
    ));
    let cfg = crate::workload::WriterConfig {
        dir: hot_data.clone(),
        rate_per_s: Some(DEMO_RATE_PER_S),
        duration: Duration::from_secs(DEMO_WRITE_SECONDS),
        file_bytes: crate::workload::JOURNAL_FILE_BYTES,
        record_bytes: crate::workload::RECORD_BYTES,
        sample_every: 5,
        paging: true,
        keep_files: None,
        first_file: 1,
    };
    let report = crate::workload::run(&cfg, Some(&cold_data), |t| {
        let _ = writeln!(
            out,
            "   {:>2} s  {:>5} records  {:>5.1} MB/s  lag p50 {:>8}  p99 {:>8}",
            t.second,
            t.records,
            (t.records * crate::workload::RECORD_BYTES as u64) as f64 / 1e6,
            ms(quantile(&t.lags, 0.5)),
            ms(quantile(&t.lags, 0.99))
        );
    })
    .map_err(step("write"))?;
    let (p50, p99, max) = (
        quantile(&report.lags, 0.5),
        quantile(&report.lags, 0.99),
        report.lags.last().copied(),
    );
    say(out, format!(
        "   {} records ({:.1} MB) in {:.1} s; lag over {} samples: p50 {}, p99 {}, max {}; {} not seen",
        report.records,
        report.bytes as f64 / 1e6,
        report.elapsed.as_secs_f64(),
        report.lags.len(),
        ms(p50),
        ms(p99),
        ms(max),
        report.lost
    ));

    Ok(report)
}

/// Step 10: `verify` through the hot agent's control socket; the copies must be identical.
fn verify_step(root: &Path, out: &mut dyn Write) -> Result<(), DemoError> {
    let say = |out: &mut dyn Write, s: String| {
        let _ = writeln!(out, "{s}");
    };
    say(out, "\n10. `artemis-sync verify` on the hot host: digests of every file on both sides, at a barrier in the stream:".into());
    let hot_sock = root.join("hot/agent.sock");
    let reply = artemis_sync::daemon::control::request(
        &hot_sock,
        &Request::Verify,
        Duration::from_secs(120),
    )
    .map_err(step("verify"))?;
    let Reply::Verified(v) = reply else {
        return Err(DemoError::Step {
            step: "verify",
            message: format!("the agent answered verify with a {} reply", reply.name()),
        });
    };
    say(out, format!("   hot  {}", v.hot_root));
    say(out, format!("   cold {}", v.cold_root));
    if !v.identical {
        return Err(DemoError::Step {
            step: "verify",
            message: format!("the copies differ: {:?}", v.differing),
        });
    }
    say(out, format!("   identical: {} files", v.files));
    Ok(())
}
