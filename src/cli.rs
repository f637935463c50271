//! The command-line definitions of both binaries (clap derive), in the library so that the
//! man pages and shell completions are generated from the same definitions and cannot drift;
//! [`commands`] is what each command of `artemis-sync` does.
//!
//! The doc comments here are the `--help` text (clap) and the man pages, not rustdoc: `<host>`
//! and the like are placeholders for the reader, not HTML.
#![allow(rustdoc::invalid_html_tags)]

pub mod commands;
pub mod progress;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;

pub const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  runtime failure (I/O error, mount failed)
  2  usage error
  3  config file missing, unreadable or invalid
  4  a check failed (doctor, the checks after mount, an agent refusing a lock-unsafe share,
     verify finding differences)
  5  refused to protect data (journal directory in the way, conflicting file in the share,
     link pointing elsewhere without --force, not enough space)

Environment:
  ARTEMIS_SYNC_CONFIG         config file (default /etc/artemis-sync/agent.toml)
  ARTEMIS_SYNC_LOG            log filter, e.g. debug (default info)
  ARTEMIS_SYNC_MOUNT_PROGRAM  mount program (default: mount, from PATH)";

/// Keeps the ActiveMQ Artemis journal of a hot/cold Corda node pair on a network share (shared
/// mode) or streamed from the hot VM's disk to the cold VM's (replicated mode), with
/// `${BASE_DIR}/artemis` a link to it.
#[derive(Debug, Parser)]
#[command(name = "artemis-sync", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// Config file
    #[arg(short = 'c', long = "config", global = true, value_name = "FILE",
          env = "ARTEMIS_SYNC_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Log filter: error, warn, info, debug, trace (overrides ARTEMIS_SYNC_LOG)
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate the config and print it with every default filled in
    CheckConfig,
    /// Print the /etc/fstab line that mounts the configured share at boot
    Fstab,
    /// Mount the configured share now (already mounted from the same source is success), then check it
    Mount,
    /// Make ${BASE_DIR}/artemis a symlink to the mount point, atomically (replicated mode: to
    /// `[replication] mount_point`, or to `data_dir` with `capture = "watch"`)
    Link {
        /// Move the files of a real artemis/ directory into the share (verified by blake3; the
        /// old directory is kept aside as artemis.pre-artemis-sync.<timestamp>)
        #[arg(long)]
        migrate: bool,
        /// Replace a link that points somewhere else
        #[arg(long)]
        force: bool,
    },
    /// Check config, mount, lock safety, link, writability and free space; print the fixes
    Doctor {
        /// One JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Run the agent: hold the lock and lease on the share (replicated mode: the hot role), run
    /// the node only while holding them
    Agent,
    /// Show the running agent's role, lease holder, epoch, renewal age, node and node health
    Status {
        /// One JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Ask the running agent to stop its node and release the lease to the other VM
    Release,
    /// Replicated mode, on the cold host: become hot (new epoch), link ${BASE_DIR}/artemis to the
    /// data directory, start the node; reports how far behind the copy may be
    Promote {
        /// Promote even though the hot host is still connected and streaming
        #[arg(long)]
        force: bool,
    },
    /// Replicated mode, on the hot host: stop the node, drain the stream so the cold copy is
    /// identical, and turn cold
    Demote {
        /// Turn cold even if the stream cannot be drained (the cold copy may be behind)
        #[arg(long)]
        force: bool,
    },
    /// Replicated mode, on the hot host: compare the whole tree's digest with the cold copy
    /// (while streaming goes on) and name every differing file
    Verify {
        /// One JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Replicated mode, on the hot host: follow the initial sync or resync until the cold copy
    /// has caught up: a progress bar (bytes, files, rate, ETA) on a terminal, plain lines
    /// otherwise; exits 0 once in sync
    Progress {
        /// When the output is not a terminal, print a line this often (and at every change)
        #[arg(long, value_name = "MS", default_value_t = 5000)]
        interval_ms: u64,
    },
    /// Both modes: forget the node health watchdog's give-up, so this VM contends for the lease
    /// again (without waiting for `[node] cooldown_ms`)
    Resume,
    /// Certificates for mutual TLS between the two hosts of a pair
    Certs {
        #[command(subcommand)]
        action: CertsAction,
    },
    /// The lease in the pair's database (`[lease] backend = "postgres"`)
    Lease {
        #[command(subcommand)]
        action: LeaseAction,
    },
}

/// `artemis-sync lease ...`
#[derive(Debug, Subcommand)]
pub enum LeaseAction {
    /// Create the lease table if it is missing (idempotent; run once, from either VM)
    Init,
}

/// `artemis-sync certs ...`
#[derive(Debug, Subcommand)]
pub enum CertsAction {
    /// Make a private CA and one certificate per host (ca.pem, ca.key, <host>.pem, <host>.key)
    Init {
        /// Where to write them (never overwrites)
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// The hosts' names, comma-separated
        #[arg(long, value_delimiter = ',', default_value = "hot,cold")]
        hosts: Vec<String>,
    },
}

pub const MOUNT_HELPER_EXIT_CODES: &str = "\
Exit codes (as mount(8)):
  0   mounted, already mounted from the same source, or remounted
  1   usage: bad arguments or options, unknown backend, lock-breaking or secret option
  32  mount failure: mount point missing, mounted from elsewhere, remount of what is not
      mounted, server unreachable, mount failed

Environment:
  ARTEMIS_SYNC_MOUNT_PROGRAM  the mount program to run (default: mount, from PATH)
  ARTEMIS_SYNC_LOG            log filter (default: warn; -v gives info)";

/// mount(8) helper for fstab entries of type `artemis-sync`: mounts an EFS, Azure Files,
/// NFS, CIFS or bind share with the backend's recommended options, retrying while the
/// server is not reachable yet.
#[derive(Debug, Parser)]
#[command(name = "mount.artemis-sync", version, after_help = MOUNT_HELPER_EXIT_CODES)]
pub struct MountHelperArgs {
    /// What to mount: `host:/path` (NFS, EFS), `//host/share` (SMB), or a directory (bind)
    pub spec: String,
    /// The mount point, an existing directory
    pub dir: PathBuf,
    /// Mount options: `backend=efs|azure-smb|azure-nfs|nfs|cifs|bind` plus ordinary mount
    /// options, which override the backend's defaults; `mount_attempts=N` and
    /// `mount_retry_max_ms=MS` bound the retries; `remount` changes the options of the share
    /// mounted on DIR (once, no retries), and fails if it is not mounted there
    #[arg(short = 'o', value_name = "OPTS")]
    pub options: Option<String>,
    /// Sloppy: tolerate unknown options (passed on to mount)
    #[arg(short = 's')]
    pub sloppy: bool,
    /// Fake: print the mount command that would run, and mount nothing
    #[arg(short = 'f')]
    pub fake: bool,
    /// Do not write to the mount table (passed on to mount)
    #[arg(short = 'n')]
    pub no_mtab: bool,
    /// Verbose: say what is being run
    #[arg(short = 'v')]
    pub verbose: bool,
    /// Filesystem type as mount(8) passes it (`artemis-sync`); informational
    #[arg(short = 't', value_name = "TYPE")]
    pub fs_type: Option<String>,
    /// Mount namespace (mount --namespace); not supported
    #[arg(short = 'N', value_name = "NS")]
    pub namespace: Option<String>,
}
