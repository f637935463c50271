//! `artemis-sync demo`: a walk through the shared-storage path on local directories, with no
//! config, no root and no network. It shows the mount a boot would run for an EFS and an Azure
//! share (`-f`, nothing mounted), then takes a Corda base directory whose `artemis/` holds a
//! small synthetic journal, refuses to link over it, migrates it into a "premounted" share
//! with every file verified, and runs `doctor`, saying what it does at each step.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::link::{self, LinkOptions, LinkOutcome};
use crate::mount::{mount, MountRequest};
use crate::sys::{RealSys, Sys};

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
        message: crate::error_chain(&e),
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
            "artemis-sync demo: shared-storage mode on local directories under {}\n",
            dir.display()
        ),
    );

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
        mount(&sys, &req, out).map_err(step("mount -f"))?;
    }

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
                seed as u8
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

    let config_path = dir.join("agent.toml");
    let config_text = format!(
        "# written by artemis-sync demo\n[node]\nbase_dir = {base:?}\n\n[storage]\nmode = \"shared\"\n\
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

    let link_path = config.artemis_link();
    say(
        out,
        "\n4. `artemis-sync link` refuses to put a link where a journal is:".into(),
    );
    match link::link(&link_path, &share, LinkOptions::default()) {
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
        &link_path,
        &share,
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
    let target = fs::read_link(&link_path).map_err(step("read link"))?;
    say(
        out,
        format!("   {} -> {}", link_path.display(), target.display()),
    );
    let mut identical = 0;
    for i in 1..=DEMO_JOURNAL_FILES {
        let rel = PathBuf::from(format!("journal/activemq-data-{i}.amq"));
        let a = link::hash_file(&link_path.join(&rel)).map_err(step("verify"))?;
        let b = link::hash_file(&report.aside.join(&rel)).map_err(step("verify"))?;
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
    match link::link(&link_path, &share, LinkOptions::default()).map_err(step("link again"))? {
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

    say(out, "\n7. `artemis-sync doctor`:".into());
    let report = crate::doctor::run(Ok(&config), &config_path, &sys as &dyn Sys);
    for line in report.to_text().lines() {
        say(out, format!("   {line}"));
    }
    if !report.ok {
        return Err(DemoError::Step {
            step: "doctor",
            message: "a check failed".into(),
        });
    }
    say(out, "\nDone: the journal now lives in the share, reached through the link, and nothing was deleted.".into());
    Ok(())
}
