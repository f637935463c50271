//! Writes the seed corpus of every fuzz target into `fuzz/seeds/<target>/` from real
//! examples: frames and streams encoded by the library itself, a lease and a state file as the
//! agents write them, the packaged config, fstab options, this host's mountinfo, and control
//! protocol lines. Run once after a format change: `cargo run --bin make-seeds` in `fuzz/`.

use std::fs;
use std::path::Path;

use artemis_sync::lease::{Lease, LeaseState};
use artemis_sync::replicated::ops::Op;
use artemis_sync::replicated::pages::Attrs;
use artemis_sync::replicated::wire::{Frame, FrameWriter, HotState, VERSION};

fn frames() -> Vec<Frame> {
    let data = vec![7u8; 4096];
    let attrs = Attrs {
        mode: 0o644,
        uid: 1000,
        gid: 1000,
    };
    vec![
        Frame::Hello {
            version: VERSION,
            nonce: [1; 32],
        },
        Frame::Challenge {
            nonce: [2; 32],
            mac: [3; 32],
        },
        Frame::Proof { mac: [4; 32] },
        Frame::Intro {
            epoch: 9,
            hot: true,
            node: "vm1:/opt/corda".into(),
            page_size: 4096,
            ack_every: 4,
        },
        Frame::Welcome { epoch: 9 },
        Frame::IndexFile {
            path: "journal/a".into(),
            len: 5,
            attrs,
            allocated: true,
            pages: vec![[9; 16]],
        },
        Frame::IndexEnd,
        Frame::Batch {
            seq: 3,
            ops: vec![
                Op::SetFile {
                    path: "d/f".into(),
                    len: 4096,
                    mode: 0o600,
                },
                Op::Write {
                    path: "d/f".into(),
                    offset: 0,
                    hashes: vec![*blake3::hash(&data).as_bytes()],
                    data: data.into(),
                },
                Op::Rename {
                    from: "d/f".into(),
                    to: "d/g".into(),
                },
            ],
        },
        Frame::Ack { seq: 3 },
        Frame::Nack {
            seq: 4,
            reason: "bad page".into(),
        },
        Frame::Heartbeat(HotState {
            durable: true,
            block: false,
            caught_up: true,
            degraded_since_unix_ms: 0,
            unacked_ms: 12,
            peer_timeout_ms: 2000,
        }),
    ]
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::create_dir_all(dir).expect("create the corpus directory");
    fs::write(dir.join(name), bytes).expect("write a seed");
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let corpus = root.join("seeds");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    for (i, f) in frames().iter().enumerate() {
        let mut body = Vec::new();
        f.encode(&mut body).expect("encode");
        write(&corpus.join("wire_frame"), &format!("frame-{i}"), &body);
        // a stream of the frame, with the reader's mode byte first (3: MAC and authenticated)
        for mode in [0u8, 2, 3] {
            let mut w = FrameWriter::new(Vec::new());
            if mode & 1 == 1 {
                w.set_mac(artemis_sync::replicated::wire::FrameMac::new([7; 32], 0));
            }
            rt.block_on(w.send(f)).expect("send");
            let mut stream = vec![mode];
            stream.extend_from_slice(w.get_mut());
            write(&corpus.join("frame_stream"), &format!("frame-{i}-mode-{mode}"), &stream);
        }
        if i < 3 {
            let mut w = FrameWriter::new(Vec::new());
            rt.block_on(w.send(f)).expect("send");
            for mode in [0u8, 1] {
                let mut stream = vec![mode];
                stream.extend_from_slice(w.get_mut());
                write(&corpus.join("handshake"), &format!("frame-{i}-mode-{mode}"), &stream);
            }
        }
    }
    let lease = Lease {
        version: artemis_sync::lease::LEASE_VERSION,
        holder: "vm1:/opt/corda".into(),
        epoch: 4,
        renewals: 17,
        state: LeaseState::Held,
        update_interval_ms: 1000,
        wait_interval_ms: 5000,
        cold_lag_ms: Some(0),
        check: String::new(),
    };
    write(&corpus.join("lease_record"), "lease.json", &lease.encode());
    write(
        &corpus.join("state_file"),
        "state.json",
        b"{\n  \"epoch\": 3,\n  \"role\": \"hot\"\n}\n",
    );
    let agent_toml = fs::read(root.join("../packaging/agent.toml")).expect("packaging/agent.toml");
    write(&corpus.join("config"), "agent.toml", &agent_toml);
    write(
        &corpus.join("config"),
        "replicated.toml",
        b"[storage]\nmode = \"replicated\"\n\n[node]\nbase_dir = \"/opt/corda\"\n\n[replication]\nrole = \"hot\"\npeer = \"10.0.0.2:7500\"\nlisten = \"0.0.0.0:7500\"\ndata_dir = \"/var/lib/artemis-sync/data\"\npsk_file = \"/etc/artemis-sync/psk\"\n",
    );
    for (i, opts) in [
        "nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport,_netdev",
        "vers=3.0,credentials=/etc/smbcredentials/acct.cred,dir_mode=0777,file_mode=0777,serverino,nosharesock,actimeo=30",
        "tls,iam,accesspoint=fsap-0123456789abcdef0",
        "a,,b=c, d ",
    ]
    .iter()
    .enumerate()
    {
        write(&corpus.join("mount_options"), &format!("opts-{i}"), opts.as_bytes());
    }
    write(
        &corpus.join("mountinfo"),
        "host",
        b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
          25 22 0:22 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n\
          40 22 0:35 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,size=4096k\n\
          41 22 8:1 /srv/share /mnt/bind\\040dir rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
          42 22 0:50 / /var/lib/artemis-sync/journal rw,nosuid,nodev,relatime shared:30 - fuse.artemis-sync artemis-sync rw,user_id=0,group_id=0,allow_other\n",
    );
    write(
        &corpus.join("mountinfo"),
        "cifs",
        b"37 22 0:46 / /var/lib/artemis-sync/share rw,relatime shared:2 - cifs //acct.file.core.windows.net/corda rw,vers=3.0,cache=strict,serverino\n",
    );
    write(
        &corpus.join("mountinfo"),
        "nfs",
        b"36 35 0:45 / /var/lib/artemis-sync/share rw,relatime shared:1 - nfs4 fs-1.efs.eu-west-1.amazonaws.com:/ rw,vers=4.1,hard\n",
    );
    for (i, line) in [
        r#"{"v":1,"request":"status"}"#,
        r#"{"v":1,"request":"promote","force":true}"#,
        r#"{"v":1,"ok":{"reply":"released","epoch":3,"role":"hot","holdoff_ms":5000}}"#,
        r#"{"v":1,"error":"not hot"}"#,
    ]
    .iter()
    .enumerate()
    {
        write(&corpus.join("control_protocol"), &format!("line-{i}"), line.as_bytes());
    }
    println!("seeds written to {}", corpus.display());
}
