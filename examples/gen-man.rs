//! Generates the man pages and shell completions that the deb and rpm packages ship, from the
//! same clap definitions the binaries parse with (`artemis_sync::cli`), so they cannot drift.
//!
//! ```sh
//! cargo run --release --example gen-man -- target/packaging/gen
//! ```
//!
//! writes into that directory:
//!
//! - `man/artemis-sync.8`, `man/mount.artemis-sync.8`, and one page per subcommand,
//!   `man/artemis-sync-<subcommand>.8` (their options: `link --migrate`, `doctor --json`, ...);
//! - `completions/artemis-sync.bash`, `completions/_artemis-sync` (zsh),
//!   `completions/artemis-sync.fish`, and the same three for `mount.artemis-sync`.
//!
//! `packaging/build.sh` runs it and compresses the pages; Cargo.toml's package metadata lists
//! where each file is installed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use artemis_sync::cli::{Cli, MountHelperArgs};
use artemis_sync::config;
use clap::{Command, CommandFactory};
use clap_complete::Shell;

/// The section both binaries' pages go in: system administration commands.
const SECTION: &str = "8";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: gen-man OUT_DIR");
        return ExitCode::from(2);
    };
    match generate(Path::new(&out)) {
        Ok(files) => {
            for f in files {
                println!("{}", f.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gen-man: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes every page and completion script under `out`; returns the files written.
fn generate(out: &Path) -> std::io::Result<Vec<PathBuf>> {
    let man_dir = out.join("man");
    let comp_dir = out.join("completions");
    fs::create_dir_all(&man_dir)?;
    fs::create_dir_all(&comp_dir)?;
    let mut written = Vec::new();

    // The `help` subcommand is left out of the pages: it prints what the pages say.
    let mut cli = Cli::command().disable_help_subcommand(true);
    // Building propagates the global options (-c, --log-level) to the subcommands and gives
    // each its display name `artemis-sync-<sub>` (the page title) and bin name
    // `artemis-sync <sub>` (the synopsis).
    cli.build();
    let mut helper = MountHelperArgs::command();
    helper.build();

    written.push(write_page(&man_dir, &cli, "artemis-sync")?);
    written.push(write_page(&man_dir, &helper, "mount.artemis-sync")?);
    for sub in cli.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("artemis-sync-{}", sub.get_name());
        written.push(write_page(&man_dir, sub, &name)?);
    }

    for (cmd, bin) in [(&cli, "artemis-sync"), (&helper, "mount.artemis-sync")] {
        for (shell, file) in [
            (Shell::Bash, format!("{bin}.bash")),
            (Shell::Zsh, format!("_{bin}")),
            (Shell::Fish, format!("{bin}.fish")),
        ] {
            let path = comp_dir.join(file);
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd.clone(), bin, &mut buf);
            write_file(&path, &buf)?;
            written.push(path);
        }
    }
    Ok(written)
}

/// Renders `cmd` as `<dir>/<name>.8`: clap_mangen's sections, then the command's
/// `after_help` (exit codes, environment) as EXIT STATUS and ENVIRONMENT, kept as laid out,
/// then FILES and SEE ALSO.
fn write_page(dir: &Path, cmd: &Command, name: &str) -> std::io::Result<PathBuf> {
    let after_help = cmd.get_after_help().map(|h| h.to_string());
    let man = clap_mangen::Man::new(cmd.clone().after_help(None::<&str>))
        .title(name.to_uppercase())
        .section(SECTION)
        .source(format!("artemis-sync {}", env!("CARGO_PKG_VERSION")))
        .manual("System Administration");
    let mut buf = Vec::new();
    man.render(&mut buf)?;
    let mut extra = String::new();
    for block in after_help.iter().flat_map(|h| h.split("\n\n")) {
        let (head, body) = block.split_once('\n').unwrap_or((block, ""));
        let heading = match head.trim_end_matches(':') {
            h if h.starts_with("Exit codes") => "EXIT STATUS".to_owned(),
            h => h.to_uppercase(),
        };
        extra.push_str(&format!(
            ".SH \"{heading}\"\n.nf\n{}\n.fi\n",
            roff_lines(body)
        ));
    }
    let (files, see_also) = if name == "mount.artemis-sync" {
        (
            vec![
                "/sbin/mount.artemis-sync",
                "/etc/fstab",
                "/usr/share/doc/artemis-sync/fstab.examples",
            ],
            "artemis-sync(8), mount(8), fstab(5), systemd.mount(5), mount.nfs(8), mount.cifs(8)",
        )
    } else {
        (
            vec![
                config::DEFAULT_CONFIG_PATH,
                "/lib/systemd/system/artemis-sync.service",
                config::DEFAULT_CONTROL_SOCKET,
                config::DEFAULT_MOUNT_POINT,
                "/usr/share/doc/artemis-sync/README.md",
            ],
            "artemis-sync(8), mount.artemis-sync(8), fstab(5), systemd.unit(5)",
        )
    };
    let files = files.join("\n");
    extra.push_str(&format!(".SH FILES\n.nf\n{}\n.fi\n", roff_lines(&files)));
    let see_also: Vec<&str> = see_also
        .split(", ")
        .filter(|s| !s.starts_with(&format!("{name}(")))
        .collect();
    extra.push_str(&format!(
        ".SH \"SEE ALSO\"\n{}\n",
        roff_lines(&see_also.join(", "))
    ));
    buf.extend_from_slice(extra.as_bytes());
    let path = dir.join(format!("{name}.{SECTION}"));
    write_file(&path, &buf)?;
    Ok(path)
}

/// `text` as roff input lines: backslashes and hyphens escaped, no line taken as a request.
fn roff_lines(text: &str) -> String {
    text.lines()
        .map(|l| {
            let l = l.replace('\\', "\\e").replace('-', "\\-");
            if l.starts_with(['.', '\'']) {
                format!("\\&{l}")
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Writes `bytes` to `path` through a temporary file, so a half-written page never stays.
fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}
